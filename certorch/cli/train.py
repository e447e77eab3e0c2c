"""Train a model from a YAML config, with dotted key=value overrides.

  certorch train configs/digits_demo.yaml epochs=1 data.subset=500 --out runs/try
  certorch train --resume runs/try            # continue a killed run exactly
  certorch train --resume runs/try epochs=20  # ... or extend it
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

NAME = "train"
HELP = "train a model from a YAML config (key=value overrides)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG|KEY=VALUE", help="config file, then dotted overrides (optim.lr=0.01)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config-name>-<timestamp>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue the run in RUN (or --out) from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """Separate the config path (the one item without '=') from the overrides."""
    from certorch.errors import CertorchError

    paths = [s for s in items if "=" not in s]
    overrides = [s for s in items if "=" in s]
    if len(paths) > 1:
        raise CertorchError(f"expected one config file, got {len(paths)}: {' '.join(paths)}")
    return (paths[0] if paths else None), overrides


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args: argparse.Namespace) -> int:
    from certorch.cli.main import data_dir
    from certorch.config import load_config
    from certorch.errors import CertorchError
    from certorch.train import Trainer, config_of_run
    from certorch.train.checkpoint import CKPT_DIR, clean_stale_temporaries
    from certorch.train.run import lock_run_dir
    from certorch.train.metrics import format_table

    config_path, overrides = split_items(args.items)
    if args.resume:
        target = args.resume if isinstance(args.resume, str) else (args.out or config_path)
        if target is None:
            raise CertorchError("--resume needs a run directory (--resume RUN or --out RUN)")
        run_dir = Path(target)
        if not run_dir.is_dir():
            raise CertorchError(f"run directory not found: {run_dir}")
        cfg = config_of_run(run_dir, overrides)
    else:
        if config_path is None:
            raise CertorchError("missing CONFIG: certorch train CONFIG.yaml [key=value ...]")
        cfg = load_config(config_path, overrides)
        run_dir = Path(args.out) if args.out else default_run_dir(cfg.name)
    if args.no_progress:
        cfg.progress = False
    ddir = data_dir(args)
    with lock_run_dir(run_dir):  # one training per run directory; a second one gets a one-line error
        for folder in (run_dir, run_dir / CKPT_DIR):
            clean_stale_temporaries(folder)  # left by a run killed mid-write
        if cfg.cascade.stages > 1:
            from certorch.train.cascade import fit_cascade

            res = fit_cascade(cfg, run_dir, resume=bool(args.resume), data_dir=ddir)
            rows = [{"stage": e["stage"], "trained_on": e["train_examples"], "certified": e["train_certified"],
                     "held_out_certified": e.get("eval_certified", "-")} for e in res.summary["stages"]]
            print(format_table(rows, ["stage", "trained_on", "certified", "held_out_certified"]))
            print(f"run directory: {res.run_dir}")
            return 0
        result = Trainer(cfg, run_dir, resume=bool(args.resume), data_dir=ddir).fit()
    final = result.summary["final"]
    cols = [c for c in ("epoch", "train_loss", "eval_loss", "nat_acc", "pgd_acc", "eval_eps") if c in final]
    print(format_table([final], cols))
    print(f"run directory: {result.run_dir}")
    return 0
