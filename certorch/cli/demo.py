"""Train and evaluate a small robust model on the bundled 8x8 digits (no download).

  certorch demo --out runs/demo            # about 10 s on 2 CPU cores

Steps: train :data:`DEMO_CONFIG` (natural warmup, then certified CROWN-IBP training with a
smooth eps ramp), evaluate the final model on the whole digits test split with every row of
:data:`EVALUATIONS` (natural, PGD, and certified accuracy by IBP and by CROWN), print the
table, write ``demo_report.txt`` and ``curves.png``.
"""
from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path

NAME = "demo"
HELP = "certified-train + certify a small model on the bundled digits data (about 15 s)"

#: Same content as configs/digits_demo.yaml (a test keeps them equal).
DEMO_CONFIG: dict = {
    "name": "digits_demo",
    "seed": 0,
    "device": "auto",
    "threads": 1,
    "epochs": 12,
    "batch_size": 64,
    "data": {"dataset": "digits"},
    "model": {"name": "digits_mlp"},
    "optim": {"name": "adam", "lr": 0.005},
    "lr_schedule": {"kind": "cosine"},
    "eps": {"value": 0.1, "schedule": "smooth", "warmup_epochs": 2, "ramp_epochs": 6},
    "method": {"name": "crown_ibp"},
    "eval": {"size": 360, "steps": 20},
}

REPORT = "demo_report.txt"


def _natural(model, x, y, eps):
    import torch

    with torch.no_grad():
        return model(x).argmax(1) == y


def _pgd(model, x, y, eps):
    from certorch.attacks import PGD

    return ~PGD(steps=50, restarts=3, seed=0)(model, x, y, eps).success


def _certified(method: str) -> Callable:
    def fn(model, x, y, eps):
        import torch

        from certorch.bounds import certified

        return certified(model, x, y, eps, method=method, dtype=torch.float64)

    return fn


#: (row label, fn(model, x (N,C,H,W), y (N,), eps) -> (N,) bool "correct and not broken").
EVALUATIONS: list[tuple[str, Callable]] = [
    ("natural accuracy", _natural),
    ("PGD-50 x3 robust accuracy", _pgd),
    ("certified accuracy (IBP, float64)", _certified("ibp")),
    ("certified accuracy (CROWN, float64)", _certified("crown")),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (a previous demo there is replaced)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. epochs=3")


def _is_demo(out: Path) -> bool:
    """``out`` holds a previous demo run (which the demo may replace)."""
    return out.is_dir() and (out / "config.yaml").is_file() and any(out.iterdir())


def _refuse_foreign(out: Path) -> None:
    """Refuse to overwrite anything but an empty folder or a previous run."""
    from certorch.errors import CertorchError

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_demo(out))):
        raise CertorchError(f"--out {out} exists and is not a previous demo run; choose another folder")


def run(args: argparse.Namespace) -> int:
    from certorch.cli.main import data_dir
    from certorch.config import config_from_dict
    from certorch.data import load
    from certorch.train import Trainer
    from certorch.train.metrics import format_table

    cfg = config_from_dict(DEMO_CONFIG, args.overrides)
    out = Path(args.out)
    t0 = time.perf_counter()
    _refuse_foreign(out)
    trainer = Trainer(cfg, out, resume=False, data_dir=data_dir(args)) if not _is_demo(out) else None
    if trainer is None:  # a previous demo: validate first (a bad override keeps it), then replace it
        Trainer(cfg, out.parent / f".{out.name}.check", data_dir=data_dir(args))
        shutil.rmtree(out)
        trainer = Trainer(cfg, out, data_dir=data_dir(args))
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    test = load(cfg.data.dataset, "test", data_dir=data_dir(args))
    device = next(result.model.parameters()).device
    x, y = test.images.to(device), test.labels.to(device)
    model = result.model.eval()
    rows = []
    for label, fn in EVALUATIONS:
        t1 = time.perf_counter()
        ok = fn(model, x, y, cfg.eps.value)
        rows.append({"evaluation": label, "eps": cfg.eps.value, "accuracy": float(ok.float().mean()),
                     "examples": int(len(y)), "seconds": time.perf_counter() - t1})
    table = format_table(rows)
    header = (f"{cfg.model.name} on {cfg.data.dataset}, method {cfg.method.name}, {cfg.epochs} epochs, "
              f"train eps {cfg.eps.value} ({train_s:.1f} s training)")
    text = f"{header}\n{table}\n"
    from certorch.train.checkpoint import atomic_write_text

    atomic_write_text(out / REPORT, text)
    print(text, end="")
    print(f"run directory: {out}  (curves: {out / 'curves.png'})")
    return 0
