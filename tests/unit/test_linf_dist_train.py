"""Training objectives for L_inf-dist nets: linf_hinge (Net) and linf_mlp (Net+MLP)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from certorch.config import load_config
from certorch.config.schema import LRScheduleConfig, config_from_dict
from certorch.errors import CertorchError
from certorch.models import build
from certorch.nn.linf_dist import get_p, linf_dist_layers, set_p
from certorch.nn.linf_dist_cert import certify, head_margin_lower_bound, lipschitz_factor, split_backbone_head
from certorch.train import Trainer
from certorch.train.objectives import TrainState, build_objective, list_objectives
from certorch.train.objectives.linf_dist import ibp_head_loss, p_at
from certorch.train.schedules import lr_factor, named_schedule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _state(t: float, obj, eps: float = 0.0) -> TrainState:
    cfg = config_from_dict({})
    values = {k: named_schedule(v, cfg.eps)(t) for k, v in obj.schedules().items()}
    return TrainState(t=t, epoch=int(t), eps=eps, values=values)


def test_registered_and_validated() -> None:
    assert {"linf_hinge", "linf_mlp"} <= set(list_objectives())
    h = build_objective("linf_hinge", {"theta": 0.45, "p_hold_epochs": 2, "p_ramp_epochs": 3})
    assert h.params.theta == 0.45 and h.params.p_ramp_epochs == 3
    assert build_objective("linf_mlp", {"kappa": 0.0}).params.kappa == 0.0
    for name, bad in [
        ("linf_hinge", {"theta": -1.0}),
        ("linf_hinge", {"p_start": 0.5}),
        ("linf_hinge", {"p_end": 4.0}),  # below p_start
        ("linf_hinge", {"p_hold_epochs": -1}),
        ("linf_mlp", {"kappa": 1.5}),
        ("linf_mlp", {"lp_weight_decay": -0.1}),
        ("linf_mlp", {"theta": 0.9}),  # unknown key for the MLP objective
    ]:
        with pytest.raises(CertorchError):
            build_objective(name, bad)


def test_every_config_builds() -> None:
    paths = sorted(CONFIGS.glob("linf_dist_*.yaml"))
    assert len(paths) == 8
    for path in paths:
        cfg = load_config(path)
        obj = build_objective(cfg.method.name, cfg.method.params)
        assert cfg.batch_size == 512 and cfg.optim.lr == 0.02 and obj.params.p_start == 8.0


def test_p_schedule_key_epochs() -> None:
    e1, e2 = 50.0, 300.0
    obj = build_objective("linf_hinge", {"p_hold_epochs": e1, "p_ramp_epochs": e2})
    for t in (0.0, 10.0, 49.99):
        assert obj.current_p(_state(t, obj)) == 8.0 == p_at(t, 8, 1000, e1, e2)
    mid = obj.current_p(_state(e1 + e2 / 2, obj))
    assert mid == pytest.approx(math.sqrt(8 * 1000), rel=1e-9)  # geometric
    assert obj.current_p(_state(e1 + e2 - 1e-9, obj)) == pytest.approx(1000.0, rel=1e-6)
    for t in (e1 + e2, e1 + e2 + 1, 400.0):
        assert math.isinf(obj.current_p(_state(t, obj)))
        assert math.isinf(p_at(t, 8, 1000, e1, e2))


def test_lr_hold_then_cosine() -> None:
    cfg = LRScheduleConfig(kind="cosine", hold_epochs=50)
    assert lr_factor(cfg, 0.0, 400) == 1.0 and lr_factor(cfg, 50.0, 400) == 1.0
    assert lr_factor(cfg, 225.0, 400) == pytest.approx(0.5)
    assert lr_factor(cfg, 400.0, 400) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(LRScheduleConfig(kind="cosine"), 200.0, 400) == pytest.approx(0.5)  # default unchanged


def _digits_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("name,model", [("linf_hinge", "linf_dist_net"), ("linf_mlp", "linf_dist_net_mlp")])
def test_one_step_decreases_loss(name: str, model: str) -> None:
    torch.manual_seed(0)
    net = build(model, dataset="digits", width=32, depth=3)
    obj = build_objective(name, {"p_hold_epochs": 1, "p_ramp_epochs": 1, "lp_weight_decay": 0.0})
    x, y = _digits_batch()
    state = _state(0.0, obj, eps=0.05)
    # p and the mean-shift batch statistics are set by the first call; compare two evaluations of
    # the same loss before and after one small gradient step (train mode both times).
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    before = obj(net, x, y, 0.05, state).loss
    assert get_p(net) == 8.0
    opt.zero_grad()
    before.backward()
    opt.step()
    after = obj(net, x, y, 0.05, state).loss
    assert float(after.detach()) < float(before.detach())


def test_param_groups_split_dist_and_head() -> None:
    net = build("linf_dist_net_mlp", dataset="digits", width=16, depth=2)
    groups = build_objective("linf_mlp").param_groups(net, 0.005)
    dist_ids = {id(p) for m in linf_dist_layers(net) for p in m.parameters()}
    assert {id(p) for p in groups[0]["params"]} == dist_ids and groups[0]["weight_decay"] == 0.0
    head = split_backbone_head(net)[1]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head.parameters()}
    assert groups[1]["weight_decay"] == 0.005


def test_regularizer_is_lp_decay_at_current_p() -> None:
    net = build("linf_dist_net", dataset="digits", width=16, depth=2)
    obj = build_objective("linf_hinge", {"lp_weight_decay": 0.01})
    set_p(net, math.inf)
    w = [m.weight for m in linf_dist_layers(net)]
    want = 0.01 * sum(0.5 * (wi.reshape(wi.shape[0], -1).abs().amax(1) ** 2).sum() for wi in w)
    assert float(obj.regularizer(net, _state(0.0, obj)).detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_ibp_head_loss_matches_bounds_and_is_sound() -> None:
    torch.manual_seed(1)
    net = build("linf_dist_net_mlp", dataset="digits", width=24, depth=2).double().eval()
    set_p(net, math.inf)
    x, y = _digits_batch(16)
    x = x.double()
    eps = 0.02
    loss, logits, lb = ibp_head_loss(net, x, y, eps, kappa=0.0)
    feats, head = split_backbone_head(net)
    f = feats(x).flatten(1)
    d = eps * lipschitz_factor(net)
    assert torch.allclose(lb, head_margin_lower_bound(head, f - d, f + d, y))
    # sound: random perturbations in the pixel ball never beat the margin lower bounds
    for _ in range(20):
        xp = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        z = net(xp)
        m = z.gather(1, y[:, None]) - z
        m = torch.stack([torch.cat([m[i, :y[i]], m[i, y[i] + 1:]]) for i in range(len(y))])
        assert bool((m >= lb - 1e-9).all())
    assert float(loss.detach()) > 0


def _tiny_cfg(method: str, model: str, epochs: int = 1, **extra):
    return config_from_dict({
        "name": f"tiny_{method}", "seed": 0, "device": "cpu", "threads": 1, "epochs": epochs, "batch_size": 128,
        "progress": False,
        "data": {"dataset": "digits", "subset": 256},
        "model": {"name": model, "kwargs": {"width": 32, "depth": 3}},
        "optim": {"name": "adam", "lr": 0.02, "betas": [0.9, 0.99], "weight_decay": 0.005},
        "lr_schedule": {"kind": "cosine", "hold_epochs": 0},
        "eps": {"value": 0.05, "schedule": "constant"},
        "method": {"name": method, "params": {"p_hold_epochs": 0.25, "p_ramp_epochs": 0.25, **extra}},
        "eval": {"eps": 0.05, "size": 200, "batch_size": 200, "steps": 2},
    })


@pytest.mark.parametrize("method,model", [("linf_hinge", "linf_dist_net"), ("linf_mlp", "linf_dist_net_mlp")])
def test_tiny_run_reports_certified_accuracy(tmp_path: Path, method: str, model: str) -> None:
    extra = {"theta": 0.3} if method == "linf_hinge" else {}
    cfg = _tiny_cfg(method, model, **extra)
    res = Trainer(cfg, tmp_path / "run", log=lambda s: None).fit()
    assert (res.run_dir / "summary.json").is_file() and (res.run_dir / "metrics.jsonl").is_file()
    final = json.loads((res.run_dir / "summary.json").read_text())["final"]
    assert 0.0 <= final["cert_acc"] <= final["inf_nat_acc"] <= 1.0
    # training ended in the p = inf phase, so the model certifies as trained
    assert math.isinf(get_p(res.model))
    # the reported certified accuracy equals certify() on the same model and eval set
    from certorch.data import load

    ev = load("digits", "test", subset=200)
    ok = certify(res.model, ev.images, ev.labels, 0.05)
    assert final["cert_acc"] == pytest.approx(float(ok.float().mean()), abs=1e-9)


def test_hinge_rejects_non_linf_model() -> None:
    net = build("digits_mlp", dataset="digits")
    obj = build_objective("linf_hinge")
    x, y = _digits_batch(8)
    with pytest.raises(CertorchError, match="L_inf-dist"):
        obj(net, x, y, 0.0, _state(0.0, obj))
