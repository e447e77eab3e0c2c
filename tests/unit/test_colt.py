"""COLT / MAT / MAAR (issue 12): the latent attack stays inside the zonotope of its layer and
raises the loss; the MAAR consistency term; MAT's labels; each loss falls on a tiny problem;
a staged COLT run on digits resumes exactly; bad parameters are one-line errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certorch.bounds.api import bound
from certorch.config import config_from_dict
from certorch.errors import CertorchError
from certorch.graph.capture import capture
from certorch.models import build
from certorch.train import Trainer
from certorch.train.objectives import TrainState, build_objective
from certorch.train.objectives.colt import consistency_kl, latent_pgd, misclassification_weight

torch.set_num_threads(1)


def _digits_batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return build("digits_cnn", dataset="digits", width=2, hidden=8).double().eval()


def _exact_coefficients(res, region, es):
    """The PGD blocks laid out as the exact zonotope's generators (input block: every pixel;
    ReLU block: one generator per neuron that is unstable for some example)."""
    parts = [es[0].flatten(1)]
    k = 1
    for n in region.order:
        if n.index in region.relu:
            G = res.regions[n.name].blocks[n.index].flatten(2)  # (B, m, n) at the ReLU: one entry per generator
            parts.append(es[k].flatten(1)[:, G.abs().sum(0).argmax(1)])
            k += 1
    return torch.cat(parts, 1)


@pytest.mark.parametrize("layer", ["input", "2", "4", "7"])  # digits_cnn: ReLUs at 2 (conv), 4 (conv), 7 (FC)
def test_latent_attack_stays_inside_the_zonotope_of_its_layer(layer):
    model, (x, y) = _cnn(), _digits_batch()
    obj = build_objective("colt", {"projections": None})
    graph = capture(model, (1, 8, 8))
    node = graph.node(layer)
    region = obj.region(model, x, 0.1, node)
    torch.manual_seed(1)
    es = latent_pgd(region, obj.rest(model, graph, node), y, steps=5, step_size=0.5)
    assert all(bool((e.abs() <= 1).all()) for e in es)
    point = region.point(es)
    res = bound(model, x, 0.1, method="zonotope", return_intermediate=True)
    z = res.regions[layer]
    A = torch.cat([G for _, G in sorted(z.blocks.items())], 1)
    e = _exact_coefficients(res, region, es)
    assert e.shape[1] == A.shape[1]
    expected = z.center + torch.einsum("bm,bm...->b...", e, A)
    assert torch.allclose(point, expected, atol=1e-10, rtol=0)
    box = z.box()
    assert bool((point >= box.lower - 1e-10).all() and (point <= box.upper + 1e-10).all())


@pytest.mark.parametrize("layer", ["input", "2", "4"])
def test_latent_attack_raises_the_loss(layer):
    model, (x, y) = _cnn(), _digits_batch(32)
    obj = build_objective("colt", {"projections": None})
    graph = capture(model, (1, 8, 8))
    node = graph.node(layer)
    region, rest = obj.region(model, x, 0.2, node), obj.rest(model, graph, node)
    torch.manual_seed(2)
    es = latent_pgd(region, rest, y, steps=10, step_size=0.25)
    with torch.no_grad():
        center = F.cross_entropy(rest(region.point(region.coefficients(False))), y, reduction="none")
        attacked = F.cross_entropy(rest(region.point(es)), y, reduction="none")
    assert float(attacked.mean()) > float(center.mean()) + 1e-3
    assert float((attacked >= center - 1e-9).float().mean()) >= 0.9


@pytest.mark.parametrize("layer", ["input", "4", "7"])
def test_the_attacks_linear_part_plus_the_center_is_the_regions_point(layer):
    """``a + A e`` as the attack computes it (center once, ``linear`` per step) equals ``point(e)``."""
    model, (x, _) = _cnn(), _digits_batch()
    obj = build_objective("colt", {"projections": None})
    graph = capture(model, tuple(x.shape[1:]))
    region = obj.region(model, x, 0.1, graph.node(layer))
    es = region.coefficients(True, torch.Generator().manual_seed(0))
    a = region.point(region.coefficients(False))
    assert torch.allclose(a + region.linear(es), region.point(es), rtol=0, atol=1e-12)


def test_kl_is_zero_for_identical_distributions_and_the_soft_weight_is_one_minus_p_y():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.arange(8) % 5
    assert torch.allclose(consistency_kl(a, a), torch.zeros(8), atol=1e-6)
    assert torch.allclose(consistency_kl(a, a + 3.0), torch.zeros(8), atol=1e-6)  # same softmax
    ref = F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), reduction="none", log_target=True).sum(1)
    assert torch.allclose(consistency_kl(a, b), ref, atol=1e-6) and bool((ref > 0).all())
    assert torch.allclose(misclassification_weight(a, y), 1 - F.softmax(a, 1)[torch.arange(8), y])


def test_maar_adds_the_weighted_kl_term_to_colt():
    model, (x, y) = _cnn(), _digits_batch()
    st = TrainState(stage=1)
    torch.manual_seed(3)
    colt = build_objective("colt", {"projections": None, "steps": 3})(model, x, y, 0.1, st)
    torch.manual_seed(3)
    maar = build_objective("maar", {"projections": None, "steps": 3, "kl_weight": 2.5})(model, x, y, 0.1, st)
    assert float(maar.metrics["kl"]) > 0
    assert math.isclose(float((maar.loss - colt.loss).detach()), float(maar.metrics["kl_term"]), rel_tol=1e-6, abs_tol=1e-9)
    assert float(maar.metrics["kl_term"]) < 2.5 * float(maar.metrics["kl"])  # weights 1 - p_y < 1


def test_mat_labels_misclassified_examples_with_the_prediction():
    mat, colt = build_objective("mat"), build_objective("colt")
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    assert mat.attack_labels(logits, y).tolist() == [0, 1, 2]
    assert colt.attack_labels(logits, y).tolist() == [0, 0, 1]


def _separable(n: int = 64):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = 0.25 + 0.5 * y[:, None].float() + 0.05 * torch.randn(n, 4, generator=g)
    return x.clamp(0, 1), y


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("name", ["colt", "mat", "maar"])
def test_each_objective_loss_falls_over_20_steps_on_a_separable_problem(name, stage):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))  # latent layers: input, "1"
    obj = build_objective(name, {"steps": 4, "projections": 10})
    x, y = _separable()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for step in range(20):
        out = obj(model, x, y, 0.05, TrainState(step=step, stage=stage))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert math.isfinite(losses[-1]) and losses[-1] < 0.7 * losses[0]


def _colt_cfg(**over) -> dict:
    cfg = {
        "name": "c", "device": "cpu", "batch_size": 32, "progress": False,
        "data": {"dataset": "digits", "subset": 64},
        "model": {"name": "digits_cnn", "kwargs": {"width": 2, "hidden": 8}},
        "optim": {"name": "adam", "lr": 0.01},
        "eps": {"value": 0.05},
        "method": {"name": "maar", "params": {"steps": 2, "projections": 5, "eval_latent_steps": 2}},
        "eval": {"size": 16, "steps": 2},
        "stages": [{"epochs": 1}, {"epochs": 1, "freeze": "2"}],
    }
    cfg.update(over)
    return cfg


def test_staged_maar_run_resumes_exactly_and_logs_the_paper_metrics(tmp_path):
    cfg = config_from_dict(_colt_cfg())
    full = Trainer(cfg, tmp_path / "full", log=lambda s: None).fit()
    Trainer(cfg, tmp_path / "part", log=lambda s: None).fit(stop_after=1)
    resumed = Trainer(cfg, tmp_path / "part", resume=True, log=lambda s: None).fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    rec = full.history[-1]
    assert rec["stage"] == 1 and {"train_verified_error", "train_kl", "latent_acc", "nat_acc"} <= set(rec)
    first = {k: v for k, v in full.history[0].items()}
    assert first["stage"] == 0


def test_eval_bounds_add_the_certified_accuracy_of_each_bound_to_every_evaluation():
    """The paper's certified robustness after every stage: ``eval_bounds`` adds
    ``verified_acc_<bound>``, the fraction ``bounds.certified`` proves on the held-out batch."""
    import certorch.bounds as bounds

    model, (x, y) = _cnn(), _digits_batch(32)
    y = model(x).argmax(1)  # correctly classified, so that small eps certifies some
    obj = build_objective("colt", {"eval_bounds": ["ibp", "crown"]})
    got = obj.eval_metrics(model, x, y, 0.01)
    for m in ("ibp", "crown"):
        want = float(bounds.certified(model, x, y, 0.01, method=m).float().mean())
        assert got[f"verified_acc_{m}"] == want
    assert 0 < got["verified_acc_crown"] and "latent_acc" not in got


def test_report_shows_the_paper_metrics_after_each_stage(tmp_path, capsys):
    """``certorch report`` of a staged COLT run: one row per stage with its held-out clean, PGD,
    latent (Eq. 26) and CROWN-certified accuracy and the training verified error (Eq. 25)."""
    from certorch.cli.main import main

    params = {"steps": 2, "projections": 5, "eval_latent_steps": 2, "eval_bounds": ["crown"]}
    cfg = config_from_dict(_colt_cfg(method={"name": "colt", "params": params}))
    Trainer(cfg, tmp_path / "r", log=lambda s: None).fit()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.split("after each stage:\n")[1].splitlines()
    head = out[0].split()
    assert head[:2] == ["stage", "name"] and {"nat_acc", "pgd_acc", "latent_acc", "verified_acc_crown",
                                              "train_verified_error"} <= set(head)
    assert [line.split()[0] for line in out[2:]] == ["0", "1"]


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"epochs": 1}] * 5}, "5 stages but only 4 latent layers"),
    ({"method": {"name": "colt", "params": {"eval_bounds": ["nope"]}}}, "nope"),
    ({"method": {"name": "colt", "params": {"layers": ["input", "nope"]}}, "stages": [{"epochs": 1}] * 2},
     "colt: no layer named 'nope'"),
    ({"method": {"name": "colt", "params": {"layers": ["8"]}}, "stages": None}, "layer '8' is the output"),
    ({"method": {"name": "mat", "params": {"steps": 0}}}, "steps must be >= 1"),
    ({"method": {"name": "maar", "params": {"kl_weight": -1}}}, "kl_weight must be >= 0"),
    ({"method": {"name": "colt", "params": {"projection_dtype": "float16"}}}, "projection_dtype' must be one of auto, float32"),
])
def test_bad_colt_params_are_one_line_errors(tmp_path, change, message):
    with pytest.raises(CertorchError) as err:
        Trainer(config_from_dict(_colt_cfg(**change)), tmp_path / "bad", log=lambda s: None)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("params, expected", [
    ({"projection_dtype": "float32"}, torch.float32),
    ({"projection_dtype": "bfloat16"}, torch.bfloat16),
    ({"projection_dtype": None}, None),
    ({"projection_dtype": "bfloat16", "projections": None}, None),  # the exact region has no projections
])
def test_projection_dtype_resolves_to_a_torch_dtype(params, expected):
    assert build_objective("colt", params).projection_dtype(torch.device("cpu")) == expected


def test_auto_projection_dtype_is_the_hardwares():
    from certorch.domains.zonotope import auto_projection_dtype

    assert build_objective("colt", {}).projection_dtype(torch.device("cpu")) == auto_projection_dtype("cpu")


def test_bfloat16_projections_give_nearly_the_float32_region():
    """Same draws: the DeepZ lines of the region's ReLUs from bfloat16 projections are those from
    float32 ones up to rounding (median relative change of the slopes well under 1 %)."""
    model, (x, _) = _cnn(), _digits_batch()
    graph = capture(model, tuple(x.shape[1:]))
    regions = {}
    for name in ("float64", "bfloat16"):
        obj = build_objective("colt", {"projections": 50, "projection_dtype": name})
        torch.manual_seed(0)
        regions[name] = obj.region(model, x, 0.1, graph.node("7"))
    for k, (lam, mu) in regions["float64"].relu.items():
        lam16, mu16 = regions["bfloat16"].relu[k]
        assert lam16.dtype == torch.float64
        unstable = (mu > 0) & (mu16 > 0)
        assert unstable.any()
        assert ((lam16 - lam).abs() / lam.clamp_min(1e-12))[unstable].median() < 0.01


def test_part4_configs_load_with_the_paper_hyperparameters():
    from pathlib import Path

    from certorch.config import load_config

    files = sorted((Path(__file__).resolve().parents[2] / "configs" / "part4").glob("*.yaml"))
    assert len(files) == 12
    for f in files:
        cfg = load_config(f)
        obj = build_objective(cfg.method.name, cfg.method.params)
        obj.check(cfg)  # every stage has a latent layer of the model
        cpu = f.stem.endswith("-cpu")
        assert f.read_text().startswith("# CPU variant") == cpu, f.name
        p = cfg.method.params
        if cfg.model.name == "colt_mnist":
            assert (p["steps"], p["step_size"], cfg.optim.name) == (40, 0.035, "adam") and len(cfg.stages) == 3
            assert cpu or ({s.epochs for s in cfg.stages} == {300} and cfg.optim.lr == 1e-4
                           and cfg.lr_schedule.milestones[:2] == [110.0, 120.0] and cfg.lr_schedule.gamma == 0.5)
        else:
            assert (p["steps"], p["step_size"], cfg.optim.name, cfg.optim.lr) == (8, 0.25, "sgd", 0.03)
            assert len(cfg.stages) == 4 and cfg.optim.momentum == 0.9
            assert cpu or ({s.epochs for s in cfg.stages} == {200} and cfg.lr_schedule.milestones[:2] == [70.0, 80.0])
        assert [s.freeze for s in cfg.stages] == [None] + p["layers"][1:len(cfg.stages)]
        assert cfg.method.name != "maar" or p["kl_weight"] == 6.0
