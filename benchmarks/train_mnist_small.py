"""Natural training of ``mnist_small`` on full MNIST for 3 epochs: test accuracy and s/epoch.

    .venv/bin/python benchmarks/train_mnist_small.py [--data-dir ../shared/datasets] [--epochs 3]

Trains ``configs/mnist_small_natural.yaml`` with the library trainer (no per-epoch PGD
evaluation, to time training alone), then evaluates the natural accuracy on the whole
10,000-image test split. Target: >= 98.5 %.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from certorch.config import load_config
from certorch.data import load
from certorch.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    cfg = load_config(
        ROOT / "configs" / "mnist_small_natural.yaml",
        [f"epochs={args.epochs}", "eval.size=0", "progress=false", f"device={args.device}"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", data_dir=args.data_dir, log=lambda s: print(s, flush=True))
        t0 = time.perf_counter()
        result = trainer.fit()
        total = time.perf_counter() - t0
    test = load("mnist", "test", data_dir=args.data_dir)
    model = result.model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(test.images.split(1000), test.labels.split(1000)):
            correct += int((model(xb.to(device)).argmax(1) == yb.to(device)).sum())
    per_epoch = [r["train_seconds"] for r in result.history]
    report = {
        "test_accuracy": correct / len(test.labels),
        "seconds_per_epoch": sum(per_epoch) / len(per_epoch),
        "epoch_seconds": [round(s, 2) for s in per_epoch],
        "total_seconds": round(total, 2),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
