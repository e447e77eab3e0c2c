"""Staged training (``stages:``): frozen prefixes keep their weights and BatchNorm statistics,
per-stage settings, stage index in records / checkpoints / summary, exact resume, config errors."""
from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certorch.config import config_from_dict
from certorch.errors import CertorchError
from certorch.models.registry import conv_net, register_model
from certorch.train import Trainer
from certorch.train.checkpoint import load_checkpoint, load_train_state
from certorch.train.objectives import LossOutput, Objective, register_objective
from certorch.train.staged import frozen_prefix, layers

torch.set_num_threads(1)


@register_model("_test_digits_bn", datasets=("digits",), description="test-only conv + BatchNorm net")
def _digits_bn(input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    # with Normalize: 0 Normalize, 1 conv, 2 BN2d, 3 ReLU, 4 Flatten, 5 Linear, 6 BN1d, 7 ReLU, 8 Linear
    return conv_net(input_shape, num_classes, [(4, 3, 1, 1)], [16], batchnorm=True)


SEEN: list[tuple[int, int, int, float]] = []


@register_objective("_test_stage_probe")
class _StageProbe(Objective):
    """Cross-entropy; records (stage, stage epoch, stage length, lr) of every step."""

    def loss(self, model, x, y, eps, state):
        SEEN.append((state.stage, state.epoch, state.total_epochs, state.lr))
        logits = model(x)
        return LossOutput(F.cross_entropy(logits, y), {}, logits.detach())


def quiet(_line: str) -> None:
    pass


def staged_cfg(**over) -> dict:
    cfg = {
        "name": "s",
        "device": "cpu",
        "batch_size": 32,
        "progress": False,
        "data": {"dataset": "digits", "subset": 128},
        "model": {"name": "_test_digits_bn"},
        "optim": {"name": "adam", "lr": 0.01},
        "eps": {"value": 0.05},
        "method": {"name": "pgd", "params": {"steps": 2}},
        "eval": {"size": 32, "steps": 2},
        "stages": [
            {"epochs": 2},
            {"epochs": 2, "freeze": "3", "optim": {"lr": 0.003}, "params": {"steps": 1}},
        ],
    }
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("stop", [1, 2, 3])  # mid stage 0, at the stage boundary, mid stage 1
def test_staged_resume_equals_uninterrupted(tmp_path, stop):
    cfg = config_from_dict(staged_cfg())
    full = Trainer(cfg, tmp_path / "full", log=quiet).fit()
    Trainer(cfg, tmp_path / "part", log=quiet).fit(stop_after=stop)
    resumed = Trainer(cfg, tmp_path / "part", resume=True, log=quiet).fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["stage"] for r in resumed.history] == [0, 0, 1, 1]
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]


def test_each_stages_last_checkpoint_survives_pruning(tmp_path):
    """checkpoint.keep bounds the rolling checkpoints, not the stage ends: the model of every
    stage stays on disk (the paper's metrics after every stage can be computed from it)."""
    from certorch.train.checkpoint import list_checkpoints

    cfg = config_from_dict(staged_cfg(stages=[{"epochs": 2}, {"epochs": 3, "freeze": "3"}], checkpoint={"keep": 1}))
    Trainer(cfg, tmp_path / "r", log=quiet).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "r" / "checkpoints")] == ["ckpt-0002.safetensors",
                                                                                  "ckpt-0005.safetensors"]


def test_frozen_prefix_keeps_weights_and_batchnorm_statistics(tmp_path):
    cfg = config_from_dict(staged_cfg(stages=[{"epochs": 1}, {"epochs": 2, "freeze": "3"}]))
    tr = Trainer(cfg, tmp_path / "r", log=quiet)
    model = tr.model
    modes: list[tuple[bool, bool]] = []  # (frozen BN2d.training, trained BN1d.training) at each forward
    model[2].register_forward_hook(lambda m, i, o: modes.append((m.training, model[6].training)))
    tr.fit(stop_after=1)
    after0 = {k: v.clone() for k, v in model.state_dict().items()}
    modes.clear()
    res = Trainer(cfg, tmp_path / "r", resume=True, log=quiet).fit()
    end = res.model.state_dict()
    frozen = [k for k in end if k.split(".")[0] in {"0", "1", "2", "3"}]
    assert {"1.weight", "2.running_mean", "2.running_var", "2.num_batches_tracked"} <= set(frozen)
    for k in frozen:
        assert torch.equal(end[k], after0[k]), k
    for k in ("5.weight", "6.running_mean", "8.weight"):
        assert not torch.equal(end[k], after0[k]), k
    assert all(p.requires_grad == (not n.split(".")[0] in {"1", "2"}) for n, p in res.model.named_parameters())


def test_frozen_modules_stay_in_eval_mode_and_out_of_the_optimizer(tmp_path):
    cfg = config_from_dict(staged_cfg(stages=[{"epochs": 1}, {"epochs": 1, "freeze": "3"}], eval={"size": 0}))
    tr = Trainer(cfg, tmp_path / "r", log=quiet)
    modes: list[tuple[int, bool, bool]] = []
    tr.model[2].register_forward_hook(lambda m, i, o: modes.append((tr.stage, m.training, tr.model[6].training)))
    tr.fit()
    train_steps = [(s, a, b) for s, a, b in modes if b]  # forwards of training steps (BN1d training)
    assert {(0, True, True), (1, False, True)} == set(train_steps)
    ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert ids == {id(p) for n, p in tr.model.named_parameters() if n.split(".")[0] not in {"1", "2"}}


def test_records_checkpoints_and_summary_carry_the_stage(tmp_path):
    SEEN.clear()
    cfg = config_from_dict(staged_cfg(
        method={"name": "_test_stage_probe"}, eval={"size": 0},
        stages=[{"epochs": 1, "name": "warm"}, {"epochs": 2, "freeze": 3, "optim": {"lr": 0.002},
                                                "lr_schedule": {"kind": "step", "milestones": [1.5], "gamma": 0.5}}],
    ))
    res = Trainer(cfg, tmp_path / "r", log=quiet).fit()
    assert [(r["epoch"], r["stage"]) for r in res.history] == [(1, 0), (2, 1), (3, 1)]
    assert [r["lr"] for r in res.history] == pytest.approx([0.01, 0.002, 0.001])  # restarted per stage
    assert {(s, e, n) for s, e, n, _ in SEEN} == {(0, 0, 1), (1, 0, 2), (1, 1, 2)}  # stage-relative time
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["epochs_done"] == 3
    assert [(s["name"], s["epochs_done"], s["final"]["epoch"]) for s in summary["stages"]] == [("warm", 1, 1), ("1", 2, 3)]
    _, state = load_train_state(load_checkpoint(tmp_path / "r"))
    assert state["stage"] == 1


def test_unstaged_records_have_no_stage_key(tmp_path):
    cfg = staged_cfg(epochs=1, eval={"size": 0})
    del cfg["stages"]
    res = Trainer(config_from_dict(cfg), tmp_path / "r", log=quiet).fit()
    assert "stage" not in res.history[0] and "stages" not in res.summary


def test_freeze_by_container_name_and_negative_index():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), nn.Linear(2, 1))
    assert [n for n, _ in layers(model)] == ["0", "1.0", "1.1", "2"]
    got = frozen_prefix(model, "1")
    assert model[1] in got and model[1][1] in got and model[2] not in got
    assert frozen_prefix(model, -2) == frozen_prefix(model, "1.1")


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"epochs": 1, "freeze": "nope"}]}, "stages[0].freeze: no layer named 'nope'"),
    ({"stages": [{"epochs": 1}, {"epochs": 1, "freeze": 42}]}, "stages[1].freeze: layer index 42 is out of range"),
    ({"stages": []}, "stages must not be empty"),
    ({"stages": [{"epochs": 0}]}, "stages[0]: epochs must be >= 1, got 0"),
    ({"stages": [{"freeze": "1"}]}, "missing required config key 'stages[0].epochs'"),
    ({"stages": [{"epochs": 1, "optim": {"lr": -1}}]}, "optim.lr must be > 0"),
    ({"stages": [{"epochs": 2}], "epochs": 5}, "epochs (5) must equal the sum of the stages' epochs (2)"),
    ({"stages": [{"epochs": 1, "params": {"stepz": 1}}]}, "stages[0].params"),
    ({"stages": [{"epochs": 1, "freeze": -1}]}, "leaves no parameter to train"),
])
def test_bad_stage_configs_are_one_line_errors(tmp_path, change, message):
    with pytest.raises(CertorchError) as err:
        Trainer(config_from_dict(staged_cfg(**change)), tmp_path / "bad", log=quiet)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_training_md_staged_example_runs(tmp_path, monkeypatch):
    """The staged MAAR example of docs/training.md runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "# staged MAAR on digits" in c)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"print": lambda *a, **k: None}
    exec(compile(code, "training.md", "exec"), scope)
    stages = scope["staged"].summary["stages"]
    assert [(s["name"], s["epochs_done"]) for s in stages] == [("input", 1), ("relu1", 1), ("relu2", 1)]
    assert (tmp_path / "runs" / "maar_digits" / "curves.png").is_file()


def test_resume_with_fewer_stages_than_the_checkpoint_is_a_one_line_error(tmp_path):
    staged = staged_cfg(stages=[{"epochs": 1}, {"epochs": 1, "freeze": "3"}], eval={"size": 0})
    Trainer(config_from_dict(staged), tmp_path / "r", log=quiet).fit()
    plain = {k: v for k, v in staged.items() if k != "stages"}
    with pytest.raises(CertorchError, match=r"saved in stage 1, but the config has 1 stage\(s\)"):
        Trainer(config_from_dict({**plain, "epochs": 3}), tmp_path / "r", resume=True, log=quiet).fit()
