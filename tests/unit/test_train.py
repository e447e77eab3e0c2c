"""Trainer: exact resume, objective hooks (declared schedules, param groups), cleanup on failure."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from certorch.config import ScheduleConfig, config_from_dict
from certorch.errors import CertorchError
from certorch.train import Trainer, load_run
from certorch.train.checkpoint import load_checkpoint
from certorch.train.objectives import LossOutput, Objective, register_objective

torch.set_num_threads(1)


def tiny_cfg(**over) -> dict:
    cfg = {
        "name": "t",
        "device": "cpu",
        "epochs": 2,
        "batch_size": 64,
        "progress": False,
        "data": {"dataset": "digits", "subset": 128},
        "model": {"name": "digits_mlp"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "lr_schedule": {"kind": "cosine"},
        "eps": {"value": 0.1, "warmup_epochs": 0.5, "ramp_epochs": 1},
        "method": {"name": "pgd", "params": {"steps": 2}},
        "eval": {"size": 32, "steps": 2},
    }
    cfg.update(over)
    return cfg


def quiet(_line: str) -> None:
    pass


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    cfg = config_from_dict(tiny_cfg(data={"dataset": "digits", "subset": 128, "augment": True}))
    full = Trainer(cfg, tmp_path / "full", log=quiet).fit()
    Trainer(cfg, tmp_path / "part", log=quiet).fit(stop_after=1)  # "killed" after epoch 1
    assert load_checkpoint(tmp_path / "part").epoch == 1
    resumed = Trainer(cfg, tmp_path / "part", resume=True, log=quiet).fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]


def test_run_dir_files_and_reload(tmp_path):
    res = Trainer(config_from_dict(tiny_cfg(epochs=1)), tmp_path / "r", log=quiet).fit()
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "curves.png", "checkpoints"} <= names
    assert {"eval_loss", "nat_acc", "pgd_acc", "seconds", "train_loss"} <= set(res.history[0])
    loaded = load_run(tmp_path / "r")
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded.model(x), res.model.eval()(x))


@register_objective("_test_kappa")
class KappaRecorder(Objective):
    """Test objective: records its declared schedule values; no weight decay on biases."""

    seen: list = []

    @dataclass(kw_only=True)
    class Params:
        kappa: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(start=1.0, end=0.0))

    def schedules(self):
        return {"kappa": self.params.kappa}

    def param_groups(self, model, weight_decay):
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def loss(self, model, x, y, eps, state):
        KappaRecorder.seen.append((state.t, state.value("kappa"), eps))
        logits = model(x)
        return LossOutput(F.cross_entropy(logits, y), {"kappa": state.value("kappa")}, logits)


def test_declared_schedule_and_param_groups(tmp_path):
    KappaRecorder.seen.clear()
    cfg = config_from_dict(
        tiny_cfg(method={"name": "_test_kappa", "params": {"kappa": {"ramp_epochs": 2, "warmup_epochs": 0}}},
                 optim={"name": "adamw", "weight_decay": 0.01}, eval={"size": 0})
    )
    tr = Trainer(cfg, tmp_path / "k", log=quiet)
    assert [g["weight_decay"] for g in tr.optimizer.param_groups] == [0.01, 0.0]
    res = tr.fit()
    ts, kappas, _ = zip(*KappaRecorder.seen)
    assert kappas[0] == 1.0 and all(b <= a for a, b in zip(kappas, kappas[1:]))
    assert kappas[-1] == pytest.approx(1.0 - ts[-1] / 2)
    assert "train_kappa" in res.history[-1] and "kappa" in res.history[-1]


def test_bad_objective_param_fails_before_run_dir_exists(tmp_path):
    cfg = config_from_dict(tiny_cfg(method={"name": "pgd", "params": {"steps": -1}}))
    with pytest.raises(CertorchError, match="steps must be >= 1"):
        Trainer(cfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_diverging_run_removes_its_run_dir(tmp_path):
    cfg = config_from_dict(tiny_cfg(optim={"name": "sgd", "lr": 1e30, "momentum": 0.0}, method={"name": "natural"}))
    with pytest.raises(CertorchError, match="training diverged"):
        Trainer(cfg, tmp_path / "nan", log=quiet).fit()
    assert not (tmp_path / "nan").exists()


def test_existing_run_dir_is_refused(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    with pytest.raises(CertorchError, match="already exists"):
        Trainer(config_from_dict(tiny_cfg()), tmp_path / "old")


def test_training_md_python_example_runs(tmp_path, monkeypatch):
    """The Python example of docs/training.md runs as written (from a copy of the repo layout)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "training.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "digits_demo.yaml").write_text((root / "configs" / "digits_demo.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "training.md", "exec"), scope)
    assert scope["result"].summary["epochs_done"] == 2
    assert (tmp_path / "runs" / "py" / "summary.json").is_file()


class _LabelShare(Objective):
    """eval_metrics = the share of label 0 in the batch it is given."""

    name = "_test_label_share"

    def loss(self, model, x, y, eps, state):
        logits = model(x)
        return LossOutput(F.cross_entropy(logits, y), {}, logits)

    def eval_metrics(self, model, x, y, eps):
        return {"share0": float((y == 0).float().mean())}


def test_objective_eval_metrics_cover_every_eval_batch():
    from certorch.models import build
    from certorch.train.trainer import evaluate

    cfg = config_from_dict(tiny_cfg(eval={"size": 50, "batch_size": 16, "steps": 1}))
    model = build("digits_mlp", dataset="digits")
    y = torch.tensor([0] * 5 + [1] * 45)  # label 0 only in the first batch of 16
    x = torch.rand(50, 1, 8, 8)
    out = evaluate(model, x, y, cfg, _LabelShare())
    assert out["share0"] == pytest.approx(5 / 50)
