"""Part 3 (issue 11): certified-training objectives and the trainer capabilities they use.

Stateful objectives (MixTrain's alpha) survive --resume; k-sampling; robust losses upper-bound
the PGD loss; every objective's loss falls on a tiny separable problem; cascades route only
uncertified examples onward; bad parameters give one-line errors.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certorch.bounds as bounds
from certorch.config import config_from_dict
from certorch.errors import CertorchError
from certorch.train import Trainer
from certorch.train.cascade import STATE, fit_cascade
from certorch.train.objectives import TrainState, build_objective
from certorch.train.objectives.certified import robust_cross_entropy
from certorch.train.objectives.mixtrain import AlphaRule, MixTrain, sample_indices
from certorch.verify.cascade import paper_rule, sound_rule

torch.set_num_threads(1)

OBJECTIVES = {
    "ibp": {},
    "crown_ibp": {},
    "convex_adversarial": {"projections": 5},
    "mixtrain": {"k": 8, "alpha": 0.8},
    "certified": {"bound": "zonotope"},
}


def _separable(n: int = 64, seed: int = 0):
    """Two well separated blobs in [0, 1]^4 (classes 0 and 1, 3 logits)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.25 + 0.5 * y[:, None].float() + 0.05 * torch.randn(n, 4, generator=g)
    return x.clamp(0, 1), y


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_loss_falls_over_20_steps_on_a_separable_problem(name):
    obj = build_objective(name, OBJECTIVES[name])
    model, (x, y) = _mlp(), _separable()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for step in range(20):
        st = TrainState(step=step, values={"kappa": 0.5, "beta": 0.5})
        out = obj(model, x, y, 0.05, st)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert math.isfinite(losses[-1]) and losses[-1] < 0.7 * losses[0]


def _pgd_ce(model, x, y, eps, steps=30):
    """Per-example CE at a PGD point of the ball (maximizing CE)."""
    d = torch.zeros_like(x)
    for _ in range(steps):
        d.requires_grad_(True)
        loss = F.cross_entropy(model((x + d).clamp(0, 1)), y)
        (g,) = torch.autograd.grad(loss, d)
        d = (d + eps / 8 * g.sign()).clamp(-eps, eps).detach()
    with torch.no_grad():
        return F.cross_entropy(model((x + d).clamp(0, 1)), y, reduction="none")


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "dual", "symbolic", "zonotope"])
def test_robust_loss_upper_bounds_the_pgd_loss_per_example(method):
    model, (x, y) = _mlp(1), _separable(16, 1)
    lower = bounds.bound(model.double(), x.double(), 0.1, method=method, y=y, upper=False).lower
    per_example = torch.stack([robust_cross_entropy(lower[i:i + 1], y[i:i + 1]) for i in range(len(y))])
    assert (per_example >= _pgd_ce(model, x.double(), y, 0.1) - 1e-9).all()


def test_mixtrain_bounds_exactly_k_examples_per_batch(monkeypatch):
    seen = []
    orig = bounds.bound
    monkeypatch.setattr(bounds, "bound", lambda m, x, *a, **k: seen.append(x.shape[0]) or orig(m, x, *a, **k))
    obj = MixTrain(k=3)
    model, (x, y) = _mlp(), _separable(32)
    obj(model, x, y, 0.05, TrainState(step=7))
    assert seen == [3]
    idx = sample_indices(32, 3, 0, 7)
    assert idx.unique().numel() == 3 and torch.equal(idx, sample_indices(32, 3, 0, 7))


def test_alpha_rule_follows_the_paper_staircase_on_a_scripted_accuracy_sequence():
    obj = MixTrain(alpha_rule="dynamic")  # 0.4, +0.05 every 5 epochs up to 0.8, -0.05 when acc drops below 0.7
    accs = [0.8] * 10 + [0.75, 0.69, 0.65, 0.72, 0.68] + [0.9] * 45
    alphas = []
    for epoch, acc in enumerate(accs, start=1):
        obj.after_epoch(epoch, {"nat_acc": acc})
        alphas.append(obj.alpha)
    assert alphas[:10] == [0.4] * 4 + [0.45] * 5 + [0.5]
    assert alphas[10:15] == [0.5, 0.45, 0.4, 0.4, 0.35]  # drops at epochs 12, 13 and 15 (acc fell below 0.7)
    assert max(alphas) == 0.8 and alphas[-1] == 0.8
    assert AlphaRule().next(0.8, 5, 0.9, 0.95) == 0.8  # never above alpha_max


def _mix_cfg(**over) -> dict:
    cfg = {"name": "m", "device": "cpu", "epochs": 4, "batch_size": 32, "progress": False,
           "data": {"dataset": "digits", "subset": 96}, "model": {"name": "digits_mlp"},
           "optim": {"name": "adam", "lr": 0.01}, "eps": {"value": 0.05, "ramp_epochs": 1},
           "method": {"name": "mixtrain", "params": {"k": 4, "alpha_rule": "dynamic", "alpha_every": 1,
                                                     "acc_target": 0.99}},
           "eval": {"size": 40, "steps": 1}}
    cfg.update(over)
    return cfg


def test_mixtrain_state_and_sampling_survive_resume_exactly(tmp_path):
    quiet = lambda s: None  # noqa: E731
    full = Trainer(config_from_dict(_mix_cfg()), tmp_path / "full", log=quiet).fit()
    Trainer(config_from_dict(_mix_cfg()), tmp_path / "part", log=quiet).fit(stop_after=2)
    resumed = Trainer(config_from_dict(_mix_cfg()), tmp_path / "part", resume=True, log=quiet).fit()
    assert [r["alpha"] for r in full.history] == [r["alpha"] for r in resumed.history]
    assert len({r["alpha"] for r in full.history}) > 1  # the rule moved alpha
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("params, match", [
    ({"k": 0}, "k must be >= 1"),
    ({"alpha": 1.5}, "alpha must be in"),
    ({"bound": "nope"}, "unknown bound method"),
])
def test_mixtrain_bad_parameters_are_one_line_errors(params, match):
    with pytest.raises(CertorchError, match=match):
        build_objective("mixtrain", params)


def test_mixtrain_k_larger_than_the_batch_is_refused_before_training(tmp_path):
    cfg = config_from_dict(_mix_cfg(method={"name": "mixtrain", "params": {"k": 64}}))
    with pytest.raises(CertorchError, match="larger than batch_size"):
        Trainer(cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_projections_with_a_bound_without_them_are_refused():
    with pytest.raises(CertorchError, match="projections"):
        build_objective("certified", {"bound": "crown", "projections": 10})


def test_an_eps_schedule_longer_than_training_is_announced(tmp_path):
    lines = []
    cfg = config_from_dict(_mix_cfg(epochs=1, eps={"value": 0.05, "ramp_epochs": 3}, eval={"size": 0}))
    Trainer(cfg, tmp_path / "r", log=lines.append).fit()
    assert any("longer than training" in s for s in lines)


def test_convex_adversarial_is_evaluated_with_the_exact_bound():
    obj = build_objective("convex_adversarial", {"projections": 5})
    model, (x, y) = _mlp(), _separable(16)
    m = obj.eval_metrics(model.eval(), x, y, 0.01)
    assert set(m) == {"verified_acc_dual", "est_verified_acc"}


def test_crown_ibp_mixing_reuses_one_ibp_pass(monkeypatch):
    from certorch.bounds import ibp as ibp_mod

    calls = []
    orig = ibp_mod._ibp_node
    monkeypatch.setattr(ibp_mod, "_ibp_node", lambda ctx, i: calls.append(i) or orig(ctx, i))
    obj = build_objective("crown_ibp", {})
    model, (x, y) = _mlp(), _separable(8)
    obj.margin_lower(model, x, y, 0.05, beta=0.5)
    assert len(calls) == len(set(calls))  # every node's IBP box computed once


# ---------------------------------------------------------------- cascades

def test_paper_rule_and_sound_rule_on_a_hand_computed_case():
    y = torch.tensor([0, 1, 0, 1])
    cert = [torch.tensor([True, False, False, False]), torch.tensor([False, True, False, False])]
    preds = [torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 0])]
    rows = paper_rule(cert, preds, y)
    assert [r["certified_here"] for r in rows] == [1, 1]
    assert [r["robust_err"] for r in rows] == [0.75, 0.5]
    # cascade of both: ex0 -> model 1 (0, right), ex1 -> model 2 (1, right), ex2, ex3 -> model 2 (0, 0)
    assert rows[1]["std_err"] == 0.25
    at_eps = [torch.tensor([True, True, False, True]), torch.tensor([True, False, False, True])]
    assert sound_rule(at_eps).tolist() == [True, False, False, True]
    ibp2 = [torch.tensor([False, True, False, False]), torch.tensor([False, False, True, False])]
    assert sound_rule(at_eps, ibp2).tolist() == [True, True, False, True]


def test_cascade_sound_rule_runs_model_k_only_where_models_before_it_certify(monkeypatch):
    """Model k's certificate can change the sound rule only where models 1..k-1 all certify: it is
    run there only (model 1 reuses the paper rule's run), with the same answer as running it on all."""
    import certorch.verify.cascade as cascade

    table = [torch.tensor([True, True, False, True, True]),  # model 1 at eps, per example
             torch.tensor([True, False, True, True, False]),
             torch.tensor([False, True, True, True, True])]
    models = [nn.Linear(1, 2) for _ in table]
    calls = []

    def fake_verified(model, x, y, eps, stages, timeout, threads, chunk):
        k = next(i for i, m in enumerate(models) if m is model)
        ids = x.flatten().long()
        calls.append((k, ids.tolist()))
        return table[k][ids]

    monkeypatch.setattr(cascade, "_verified", fake_verified)
    monkeypatch.setattr("certorch.bounds.api.certified", lambda m, xb, yb, e, method: torch.zeros(len(yb), dtype=torch.bool))
    x = torch.arange(5.0).view(5, 1)
    rep = cascade.certify_cascade(models, x, torch.zeros(5, dtype=torch.long), 0.1, chunk=2)
    runs = [(k, i) for k, ids in calls for i in ids]  # (model, example) in the order certified, chunks joined
    paper = [(0, i) for i in range(5)] + [(1, 2)]  # Algorithm 2: model 2 certifies the last one; model 3 idle
    assert runs == paper + [(1, i) for i in (0, 1, 3, 4)] + [(2, 0), (2, 3)]
    assert rep["sound_robust_err"] == float((~cascade.sound_rule(table)).float().mean()) == pytest.approx(0.8)
    assert [c["evaluated"] for c in rep["sound_certified"]] == [5, 4, 2]
    assert [c["certified"] for c in rep["sound_certified"]] == [4, 2, 1]


def test_cascade_certificates_are_recorded_and_known_ones_are_not_recomputed(monkeypatch):
    """Every certificate computed is passed to ``record``; a rerun given them as ``known`` computes
    nothing and reports the same."""
    import certorch.verify.cascade as cascade

    table = [torch.tensor([True, False, False, True]), torch.tensor([True, True, False, False])]
    models = [nn.Linear(1, 2) for _ in table]
    calls = []

    def fake_verified(model, x, y, eps, stages, timeout, threads, chunk):
        k = next(i for i, m in enumerate(models) if m is model)
        calls.append(k)
        return table[k][x.flatten().long()]

    monkeypatch.setattr(cascade, "_verified", fake_verified)
    monkeypatch.setattr("certorch.bounds.api.certified", lambda m, xb, yb, e, method: torch.zeros(len(yb), dtype=torch.bool))
    x, y = torch.arange(4.0).view(4, 1), torch.zeros(4, dtype=torch.long)
    recorded = {}

    def record(k, indices, verified):
        assert not any((k, i) in recorded for i in indices)  # each certificate computed once
        recorded.update({(k, i): v for i, v in zip(indices, verified)})

    first = cascade.certify_cascade(models, x, y, 0.1, chunk=3, record=record)
    # model 1 on all four; model 2 on the two model 1 does not certify (paper) and the two it does (sound)
    assert set(recorded) == {(0, i) for i in range(4)} | {(1, i) for i in range(4)}
    assert all(recorded[(k, i)] == bool(table[k][i]) for k, i in recorded)
    calls.clear()
    again = cascade.certify_cascade(models, x, y, 0.1, chunk=3, known=recorded, record=record)
    assert calls == [] and again == first


def _cascade_cfg(**over) -> dict:
    cfg = {"name": "c", "device": "cpu", "epochs": 2, "batch_size": 64, "progress": False, "threads": 1,
           "data": {"dataset": "digits", "subset": 200}, "model": {"name": "digits_mlp"},
           "optim": {"name": "adam", "lr": 0.01}, "eps": {"value": 0.05, "ramp_epochs": 1},
           "method": {"name": "ibp"}, "eval": {"size": 60, "steps": 1},
           "cascade": {"stages": 2, "certify": "ibp"}}
    cfg.update(over)
    return cfg


def test_cascade_routes_only_uncertified_examples_onward(tmp_path):
    res = fit_cascade(config_from_dict(_cascade_cfg()), tmp_path / "c", log=lambda s: None)
    s1, s2 = res.summary["stages"]
    assert s2["train_examples"] == s1["train_examples"] - s1["train_certified"]
    state = json.loads((tmp_path / "c" / STATE).read_text())
    left = torch.tensor(state["train"])
    # what stage 2 did not certify, among what it was trained on
    assert left.numel() == s2["train_examples"] - s2["train_certified"]
    assert (tmp_path / "c" / "stage_1" / "summary.json").is_file() and (tmp_path / "c" / "stage_2").is_dir()


def test_certify_cli_resumes_a_killed_cascade_certification(tmp_path, capsys):
    """``certorch certify CASCADE_RUN``: certificates go to a JSONL as they are computed; a rerun
    after a kill (a torn last line) skips the ones there and writes the same report."""
    from certorch.cli.main import main

    run = tmp_path / "c"
    fit_cascade(config_from_dict(_cascade_cfg(epochs=1)), run, log=lambda s: None)
    args = [str(run), "--eps", "0.05", "--n", "30", "--stages", "ibp", "--chunk", "8", "--no-progress"]
    assert main(["certify", *args]) == 0
    report = json.loads((run / "certify" / "cascade-eps0.05.json").read_text())
    jsonl = run / "certify" / "cascade-eps0.05.jsonl"
    lines = jsonl.read_text().splitlines()
    assert sum(len(json.loads(ln)["index"]) for ln in lines if json.loads(ln)["model"] == 0) == 30
    jsonl.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # killed while writing line 3
    assert main(["certify", *args]) == 0
    after = jsonl.read_text().splitlines()
    assert after[2] == lines[2][: len(lines[2]) // 2]  # the torn line was ended, not glued to a new row
    rows = [json.loads(ln) for ln in after[3:]]  # rows written by the rerun
    redone = {(r["model"], i) for r in rows for i in r["index"]}
    kept = {(json.loads(ln)["model"], i) for ln in lines[:2] for i in json.loads(ln)["index"]}
    assert redone and not (redone & kept)
    assert json.loads((run / "certify" / "cascade-eps0.05.json").read_text()) == report


def test_a_cascade_stage_with_every_example_certified_stops_the_cascade(tmp_path):
    cfg = config_from_dict(_cascade_cfg(cascade={"stages": 2, "certify": "ibp"}, epochs=1))
    run = tmp_path / "c"
    fit_cascade(config_from_dict(_cascade_cfg(cascade={"stages": 1, "certify": "ibp"}, epochs=1)), run,
                log=lambda s: None)
    state = json.loads((run / STATE).read_text())
    state["train"] = []  # as if stage 1 had certified every training example
    (run / STATE).write_text(json.dumps(state))
    lines = []
    res = fit_cascade(cfg, run, resume=True, log=lines.append)
    assert res.summary["stopped_after"] == 1 and res.summary["stages_trained"] == 1
    assert any("stopping after 1 stage" in s for s in lines)
    assert not (run / "stage_2").exists()
