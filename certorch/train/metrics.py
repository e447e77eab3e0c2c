"""Per-epoch metrics files (JSONL + CSV), the summary table and the curves plot."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from certorch.train.checkpoint import atomic_write_bytes, atomic_write_text

__all__ = ["write_history", "read_history", "format_table", "plot_curves", "METRICS_JSONL", "METRICS_CSV", "PLOT"]

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
PLOT = "curves.png"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v


def write_history(run_dir: str | Path, history: list[dict[str, Any]]) -> None:
    """(Re)write ``metrics.jsonl`` and ``metrics.csv`` with one row per epoch, atomically.

    The CSV's columns are the union of all records' keys, in first-seen order.
    """
    run_dir = Path(run_dir)
    lines = "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in history)
    atomic_write_text(run_dir / METRICS_JSONL, lines)
    columns: list[str] = []
    for r in history:
        columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in history:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(run_dir / METRICS_CSV, buf.getvalue())


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``: JSON objects whose ``epoch`` is an integer >= 1 (an
    unparsable line, e.g. a trailing one cut by a kill, or a record of another shape is ignored)."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, int digit limit
            continue
        epoch = rec.get("epoch") if isinstance(rec, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1:
            out.append(rec)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts) with the given (or all) columns."""
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    cells = [[_fmt(r.get(c, "")) if r.get(c, "") != "" else "" for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    head = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([head, rule, *body])


#: per-epoch values that are schedules or objective state (third panel)
SCHEDULE_KEYS = ("eps", "kappa", "beta", "alpha", "p", "lr_factor")


def _series(ax, history: list[dict[str, Any]], keys: list[str], epochs: list) -> bool:
    drawn = False
    for key in keys:
        ys = [r.get(key) for r in history]
        if any(isinstance(y, (int, float)) for y in ys):
            ax.plot(epochs, [y if isinstance(y, (int, float)) else math.nan for y in ys], marker="o", label=key)
            drawn = True
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """PNG of the run per epoch, written atomically (Agg backend): losses and their parts,
    accuracies (natural, attacked, verified by each bound), schedules and objective state
    (eps, kappa, beta, alpha, ...), and seconds per epoch; stage boundaries of staged runs as
    dashed lines."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [r.get("epoch") for r in history]
    keys = list(dict.fromkeys(k for r in history for k in r))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    (ax_l, ax_a), (ax_s, ax_t) = axes
    _series(ax_l, history, [k for k in keys if k.endswith("loss") and not k.endswith("_acc")], epochs)
    ax_l.set_ylabel("loss")
    _series(ax_a, history, [k for k in keys if k.endswith("_acc") or k.startswith("verified_acc")], epochs)
    ax_a.set_ylabel("accuracy")
    ax_a.set_ylim(0, 1.02)
    _series(ax_s, history, [k for k in SCHEDULE_KEYS if k in keys], epochs)
    ax_s.set_ylabel("schedules / state")
    _series(ax_t, history, [k for k in ("seconds", "train_seconds", "eval_seconds") if k in keys], epochs)
    ax_t.set_ylabel("seconds")
    bounds = [r.get("epoch") for q, r in zip(history, history[1:]) if r.get("stage") != q.get("stage")]
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        for b in bounds:  # staged runs: a dashed line where each stage starts
            if isinstance(b, (int, float)):
                ax.axvline(b - 0.5, color="grey", linestyle="--", linewidth=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
