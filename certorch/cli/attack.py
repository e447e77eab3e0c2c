"""Attack a trained model on the test split and print natural and robust accuracy.

  certorch attack runs/demo --attack pgd --eps 0.1 --n 500
"""
from __future__ import annotations

import argparse
import time

NAME = "attack"
HELP = "natural and robust accuracy of a run or checkpoint under an attack"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory or checkpoint (.safetensors)")
    p.add_argument("--attack", default="pgd", help="attack name (see certorch info)")
    p.add_argument("--eps", type=float, required=True, help="L-inf radius in pixel space [0, 1]")
    p.add_argument("--n", type=int, default=1000, help="number of test examples (first N; default 1000)")
    p.add_argument("--steps", type=int, default=None, help="attack steps (pgd/cw)")
    p.add_argument("--restarts", type=int, default=None, help="random restarts (pgd)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def run(args: argparse.Namespace) -> int:
    import torch

    from certorch.attacks import build_attack
    from certorch.cli.main import data_dir
    from certorch.data import load
    from certorch.errors import CertorchError
    from certorch.spec import check_eps, check_finite
    from certorch.train import load_run, resolve_device
    from certorch.train.metrics import format_table

    check_eps(args.eps)
    if args.n < 1:
        raise CertorchError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise CertorchError(f"--batch-size must be >= 1, got {args.batch_size}")
    kwargs = {k: v for k, v in (("steps", args.steps), ("restarts", args.restarts)) if v is not None}
    if args.attack == "pgd":
        kwargs["seed"] = args.seed
    attack = build_attack(args.attack, **kwargs)
    device = resolve_device(args.device)
    loaded = load_run(args.run, device)
    ds = load(loaded.config.data.dataset, args.split, data_dir=data_dir(args) or loaded.config.data.data_dir, subset=args.n)
    check_finite(ds.images, "test images")
    model = loaded.model
    t0 = time.perf_counter()
    correct = robust = 0
    for xb, yb in zip(ds.images.split(args.batch_size), ds.labels.split(args.batch_size)):
        xb, yb = xb.to(device), yb.to(device)
        with torch.no_grad():
            clean_ok = model(xb).argmax(1) == yb
        correct += int(clean_ok.sum())
        # robust: correct on the clean input AND on the attacked one (an attack may land on a
        # correctly classified point where the clean input is already misclassified)
        robust += int((clean_ok & ~attack(model, xb, yb, args.eps).success).sum()) if args.eps > 0 else int(clean_ok.sum())
    n = len(ds.labels)
    row = {
        "examples": n,
        "eps": args.eps,
        "attack": args.attack,
        "natural_acc": correct / n,
        "robust_acc": robust / n,
        "seconds": time.perf_counter() - t0,
    }
    print(format_table([row]))
    return 0
