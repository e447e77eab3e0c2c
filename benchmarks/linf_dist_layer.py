"""Forward+backward time and peak memory of an L_inf-dist layer vs an nn.Linear of the same size.

Batch 512, widths 1024 / 2048 / 5120, shapes 784 -> width and width -> width, 2 threads.
Each case runs in a fresh subprocess so its peak-RSS growth (``ru_maxrss`` after minus
before the timed passes) is its own. Writes a markdown table (default
``docs/linf_dist_benchmark.md``) naming the CPU.

    .venv/bin/python benchmarks/linf_dist_layer.py            # full table (several minutes)
    .venv/bin/python benchmarks/linf_dist_layer.py --widths 1024 --reps 1 --out /tmp/t.md
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BATCH = 512
IN_FEATURES = 784


def run_case(kind: str, n_in: int, n_out: int, p: float, reps: int, threads: int) -> dict:
    """Time ``reps`` forward+backward passes of one layer in this process; returns a result row."""
    import torch
    from torch import nn

    from certorch.nn.linf_dist import LInfDistLinear

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if kind == "linear":
        layer: nn.Module = nn.Linear(n_in, n_out)
    else:
        layer = LInfDistLinear(n_in, n_out, p=p, mean_shift=True, impl=kind)
    x = torch.randn(BATCH, n_in, requires_grad=True)
    layer(x[:4]).sum().backward()  # warm-up (kernels, allocator)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        layer(x).square().mean().backward()
        times.append(time.perf_counter() - t0)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"kind": kind, "in": n_in, "out": n_out, "p": p, "seconds": min(times), "peak_mb": grew}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _spawn(kind: str, n_in: int, n_out: int, p: float, reps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps([kind, n_in, n_out, p, reps, threads])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 5120])
    ap.add_argument("--p", type=float, nargs="+", default=[float("inf"), 8.0], help="orders of the L_inf-dist layer")
    ap.add_argument("--reps", type=int, default=2, help="timed passes per case (the minimum is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--finite-max", type=int, default=12_000_000,
        help="skip finite-p cases with in*out above this (their time scales with batch*in*out)",
    )
    ap.add_argument("--out", default="docs/linf_dist_benchmark.md")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(*json.loads(args.case))))
        return
    import torch

    rows = []
    for w in args.widths:
        for n_in in (IN_FEATURES, w):
            base = _spawn("linear", n_in, w, 0.0, args.reps, args.threads)
            for p in args.p:
                if p != float("inf") and n_in * w > args.finite_max:
                    continue
                r = _spawn("auto", n_in, w, p, args.reps, args.threads)
                r["linear_seconds"], r["linear_peak_mb"] = base["seconds"], base["peak_mb"]
                rows.append(r)
                print(json.dumps(r), flush=True)
    big = lambda r: BATCH * r["out"] * r["in"] * 4 / 2**20  # noqa: E731  (B, out, in) fp32 tensor
    lines = [
        "# L_inf-dist layer benchmark",
        "",
        f"Forward + backward (loss = mean of squared outputs) of `LInfDistLinear` (mean shift on, "
        f"`impl=\"auto\"`: fused `torch.cdist` at p = inf, chunked kernel at finite p) vs `nn.Linear` "
        f"of the same size. Batch {BATCH}, {args.threads} threads, fp32, best of {args.reps}. "
        "Peak = growth of the process's peak RSS during the timed passes (fresh process per case); "
        "\"(B,out,in) tensor\" is what a naive broadcast implementation would allocate.",
        "",
        f"Hardware: {_cpu_name()}, {args.threads} threads of {__import__('os').cpu_count()} cores visible; "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "| in -> out | p | L_inf-dist s | Linear s | ratio | L_inf-dist peak MB | Linear peak MB | (B,out,in) tensor MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['in']} -> {r['out']} | {r['p']:g} | {r['seconds']:.3f} | {r['linear_seconds']:.4f} | "
            f"{r['seconds'] / max(r['linear_seconds'], 1e-9):.0f}x | {r['peak_mb']:.0f} | {r['linear_peak_mb']:.0f} | "
            f"{big(r):.0f} |"
        )
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    lines += [
        "",
        f"Finite-p cases with in*out > {args.finite_max:,} are skipped (time grows linearly in batch*in*out). "
        f"Load average when finished: {' '.join(load)} (the machine may be shared; times are wall-clock).",
        "",
        "Reproduce: `.venv/bin/python benchmarks/linf_dist_layer.py` (writes this file).",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
