"""Run ``certorch verify`` on the VNN-COMP 2022 dev set in ../shared/vnncomp and compare with
its ground truth (not a test). A wrong answer (unsat on a confirmed sat instance, or sat on a
confirmed unsat one) is a soundness bug; ``certorch verify`` itself re-checks every sat witness.

    .venv/bin/python benchmarks/vnncomp.py --timeout 60                  # all three benchmarks
    .venv/bin/python benchmarks/vnncomp.py --benchmarks 2022_mnist_fc --timeout 10 --limit 30
    .venv/bin/python benchmarks/vnncomp.py --benchmarks 2022_sri_resnet_a --skip 41     # finish a stopped run
    .venv/bin/python benchmarks/vnncomp.py --from-json runs/vnn.json --plot docs/vnncomp_solved.png  # re-plot
    (``--from-json`` also reads the printed log of a run stopped part way)

``--plot`` draws the cactus curve: instances solved (correct sat + unsat) against the time each took.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args) -> dict:
    base = Path(args.data)
    if not (base / "ground_truth.csv").is_file():
        print(f"no VNN-COMP data in {base}; skipping")
        return {}
    truth = {(r["benchmark"], r["onnx"], r["vnnlib"]): r for r in csv.DictReader(open(base / "ground_truth.csv"))}
    rows = []
    for bench in args.benchmarks.split(","):
        inst = list(csv.reader(open(base / bench / "instances.csv")))
        for onnx, vnnlib, _ in inst[args.skip :][: args.limit or None]:
            t0 = time.time()
            stages = ["--stages", args.stages] if args.stages else []
            p = subprocess.run([sys.executable, "-m", "certorch", "verify", str(base / bench / onnx),
                                str(base / bench / vnnlib), "--timeout", str(args.timeout), *stages],
                               capture_output=True, text=True, cwd=ROOT)
            secs = time.time() - t0
            out = p.stdout.strip().splitlines()
            answer = out[0].strip() if out and p.returncode in (0, 1) else f"error({p.returncode})"
            t = truth.get((bench, onnx, vnnlib), {})
            wrong = (answer == "unsat" and t.get("truth") == "sat") or (answer == "sat" and t.get("truth") == "unsat"
                                                                         and t.get("confidence") == "confirmed")
            rows.append({"benchmark": bench, "onnx": onnx, "vnnlib": vnnlib, "answer": answer,
                         "truth": t.get("truth"), "confidence": t.get("confidence"), "seconds": secs, "wrong": wrong,
                         "stderr": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""})
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def table(rows: list[dict], timeout: float) -> str:
    L = [f"| benchmark | instances | sat solved | unsat solved | wrong | timeout | unknown | errors | median s |",
         "|---|---|---|---|---|---|---|---|---|"]
    for b in sorted({r["benchmark"] for r in rows}):
        rs = [r for r in rows if r["benchmark"] == b]
        c = Counter(r["answer"] for r in rs)
        errs = sum(v for k, v in c.items() if k.startswith("error"))
        L.append(f"| {b} | {len(rs)} | {c['sat']} | {c['unsat']} | {sum(r['wrong'] for r in rs)} | {c['timeout']} | "
                 f"{c['unknown']} | {errs} | {statistics.median(r['seconds'] for r in rs):.1f} |")
    return "\n".join(L) + f"\n\n(per-instance timeout {timeout:g} s)\n"


def load(path: Path) -> dict:
    """Rows of an earlier run: its ``--json`` file, or its printed log (one JSON row per line,
    e.g. of a run stopped part way)."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    return {"rows": [json.loads(line) for line in text.splitlines() if line.startswith('{"benchmark"')]}


def plot(rows: list[dict], timeout: float, path: str) -> None:
    """Instances solved (sat or unsat, not wrong) against the seconds each took, per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for b in sorted({r["benchmark"] for r in rows}):
        rs = [r for r in rows if r["benchmark"] == b]
        t = sorted(r["seconds"] for r in rs if r["answer"] in ("sat", "unsat") and not r["wrong"])
        ax.step([0.0] + t + [timeout], [0] + list(range(1, len(t) + 1)) + [len(t)], where="post",
                label=f"{b} ({len(t)}/{len(rs)})")
    ax.set_xlabel("seconds per instance (process start to answer)")
    ax.set_ylabel("instances solved")
    ax.set_title(f"certorch verify, timeout {timeout:g} s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "vnncomp"))
    p.add_argument("--benchmarks", default="2022_mnist_fc,2022_oval21,2022_sri_resnet_a")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--limit", type=int, default=0, help="first N instances per benchmark (0: all)")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N instances per benchmark (to finish a run)")
    p.add_argument("--stages", default=None, help="certorch verify --stages (default: its pipeline)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write the solved-vs-time curve to this PNG")
    p.add_argument("--from-json", default=None, help="table/plot of an earlier --json run instead of running")
    args = p.parse_args(argv)
    res = load(Path(args.from_json)) if args.from_json else run(args)
    if res:
        if args.json and not args.from_json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        if args.plot:
            plot(res["rows"], args.timeout, args.plot)
        print(table(res["rows"], args.timeout))


if __name__ == "__main__":
    main()
