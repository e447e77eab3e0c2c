"""Print a run's summary and its per-epoch metrics.

  certorch report runs/demo
"""
from __future__ import annotations

import argparse
import json

NAME = "report"
HELP = "print the summary table of a run (directory or checkpoint)"

EPOCH_COLUMNS = ["epoch", "stage", "train_loss", "train_acc", "eps", "lr", "eval_loss", "nat_acc", "pgd_acc", "seconds"]
STAGE_COLUMNS = ["stage", "name", "freeze", "epochs_done", "seconds", "nat_acc", "pgd_acc"]


def metric_columns(records: list[dict]) -> list[str]:
    """The objectives' evaluation accuracies (``latent_acc``, ``verified_acc_crown``, ``cert_acc``,
    ...) and COLT's training verified error (Eq. 25) found in ``records``, in first-seen order."""
    out: list[str] = []
    for r in records:
        for k in r:
            if k in out or k in EPOCH_COLUMNS:
                continue
            if (k.endswith("_acc") or "_acc_" in k) and not k.startswith("train_") or k == "train_verified_error":
                out.append(k)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory or checkpoint (.safetensors)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of tables")


def run(args: argparse.Namespace) -> int:
    from certorch.errors import CertorchError
    from certorch.train.checkpoint import load_checkpoint
    from certorch.train.metrics import format_table, read_history
    from certorch.train.run import run_dir_of

    run_dir = run_dir_of(args.run)
    summary, history = None, []
    if run_dir is not None and (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, digit limit
            raise CertorchError(f"corrupt {run_dir / 'summary.json'}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not isinstance(summary, dict):
            raise CertorchError(f"corrupt {run_dir / 'summary.json'}: expected a JSON object")
        history = read_history(run_dir)
    if summary is None:  # a loose checkpoint: use its metadata
        c = load_checkpoint(args.run)
        cfg = c.config

        def part(key: str, sub: str):
            v = cfg.get(key)
            return v.get(sub) if isinstance(v, dict) else None

        summary = {
            "name": cfg.get("name"), "dataset": part("data", "dataset"), "model": part("model", "name"),
            "method": part("method", "name"), "epochs_done": c.epoch, "final": c.metrics,
        }
        history = [c.metrics] if c.metrics else []
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    keys = ["name", "dataset", "model", "method", "params", "device", "epochs_done", "train_eps", "eval_eps", "eval_size", "seconds"]
    print(format_table([{k: summary.get(k) for k in keys if k in summary}]))
    if history:
        cols = [c for c in EPOCH_COLUMNS if any(c in r for r in history)]
        cols[-1:-1] = metric_columns(history)  # before seconds
        print()
        print(format_table(history, cols))
    stages = summary.get("stages")
    if isinstance(stages, list) and stages and all(isinstance(st, dict) for st in stages):
        rows = [{**(st.get("final") if isinstance(st.get("final"), dict) else {}),
                 **{k: "" if st.get(k) is None else st.get(k) for k in ("stage", "name", "freeze", "epochs_done", "seconds")}}
                for st in stages]
        print()
        print("after each stage:")
        print(format_table(rows, STAGE_COLUMNS + metric_columns(rows)))
    return 0
