"""Config parsing: YAML + dotted overrides, unknown keys, type and range errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from certorch.config import config_from_dict, config_to_yaml, load_config
from certorch.errors import CertorchError
from certorch.train.objectives import build_objective

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_yaml_values_and_overrides(tmp_path):
    p = write(tmp_path, "epochs: 5\noptim:\n  name: sgd\n  lr: 0.1\ndata:\n  dataset: mnist\n")
    cfg = load_config(p, ["epochs=1", "data.subset=2000", "optim.momentum=0.5", "method.params.steps=3"])
    assert cfg.name == "exp"  # file stem
    assert (cfg.epochs, cfg.data.subset, cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == (1, 2000, "sgd", 0.1, 0.5)
    assert cfg.method.params == {"steps": 3}


def test_unknown_nested_key_names_the_dotted_key():
    with pytest.raises(CertorchError, match=r"unknown config key 'optim\.lrr'") as e:
        config_from_dict({}, ["optim.lrr=0.1"])
    assert "\n" not in str(e.value)


def test_unknown_top_level_key_in_yaml(tmp_path):
    with pytest.raises(CertorchError, match="unknown config key 'epoch'"):
        load_config(write(tmp_path, "epoch: 3\n"))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("epochs=two", "'epochs' must be an integer"),
        ("optim.name=rmsprop", "'optim.name' must be one of sgd, adam, adamw"),
        ("data.augment=maybe", "'data.augment' must be true or false"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("eps.value=1.5", "eps must be <= 1"),
        ("eps.value=-0.1", "eps must be >= 0"),
        ("optim.betas=[0.9]", "must have 2 items"),
        ("data=3", "'data' must be a mapping"),
    ],
)
def test_type_and_range_errors(override, pattern):
    with pytest.raises(CertorchError, match=pattern):
        config_from_dict({}, [override])


def test_yaml11_float_string_is_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-3\n"))
    assert cfg.optim.lr == pytest.approx(1e-3)


def test_malformed_yaml_is_one_line_error(tmp_path):
    with pytest.raises(CertorchError, match="cannot parse config") as e:
        load_config(write(tmp_path, "epochs: [1, 2\n"))
    assert "\n" not in str(e.value)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = config_from_dict({"name": "r"}, ["eps.value=0.2", "lr_schedule.milestones=[3, 5]"])
    again = config_from_dict(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg


def test_objective_params_validated_by_objective():
    with pytest.raises(CertorchError, match=r"unknown config key 'method\.params\.stepz'"):
        build_objective("pgd", {"stepz": 3})
    with pytest.raises(CertorchError, match="steps must be >= 1"):
        build_objective("pgd", {"steps": 0})
    with pytest.raises(CertorchError, match="unknown method 'mixup'; valid: .*natural.*pgd"):
        build_objective("mixup", {})


@pytest.mark.parametrize("name", ["mnist_small_natural", "mnist_small_pgd", "digits_demo"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    build_objective(cfg.method.name, cfg.method.params)
    assert cfg.name == name


def test_demo_config_matches_yaml():
    from certorch.cli.demo import DEMO_CONFIG

    assert load_config(ROOT / "configs" / "digits_demo.yaml") == config_from_dict(DEMO_CONFIG)


@pytest.mark.parametrize("seed", [2**64, 2**63, 10**24, -1])
def test_seed_outside_range_refused(seed):
    with pytest.raises(CertorchError, match="seed") as e:
        config_from_dict({"seed": seed})
    assert "\n" not in str(e.value)


def test_largest_seed_accepted_and_seeds_everything():
    from certorch.train.state import seed_everything

    cfg = config_from_dict({"seed": 2**63 - 1})
    seed_everything(cfg.seed)


@pytest.mark.parametrize("override", ["batch_size=1e30", "eval.size=" + "9" * 40, "threads=100000"])
def test_integers_beyond_64_bits_or_sane_range_refused(override):
    with pytest.raises(CertorchError):
        config_from_dict({}, [override])


def test_huge_int_in_message_stays_one_short_line():
    with pytest.raises(CertorchError) as e:
        config_from_dict({"epochs": 10**5000})
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_yaml_alias_bomb_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]
    text = "method:\n  name: pgd\n  params:\n" + "".join(f"    {ln}\n" for ln in lines)
    with pytest.raises(CertorchError, match="too large"):
        load_config(write(tmp_path, text))


def test_self_referential_yaml_refused(tmp_path):
    with pytest.raises(CertorchError, match="nested more than|too large"):
        load_config(write(tmp_path, "method:\n  params:\n    loop: &l [*l]\n"))


def test_deeply_nested_yaml_is_one_line_error(tmp_path):
    with pytest.raises(CertorchError) as e:
        load_config(write(tmp_path, "model:\n  kwargs:\n    x: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert "\n" not in str(e.value)


def test_oversized_config_file_refused(tmp_path):
    p = write(tmp_path, "# " + "x" * (2 << 20) + "\nepochs: 1\n")
    with pytest.raises(CertorchError, match="too large"):
        load_config(p)
