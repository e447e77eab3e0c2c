"""Interleaved training-step comparison (not a test): ours and the peer alternate in one process,
so both see the same machine load; median of ``--rounds`` alternations.

    .venv/bin/python benchmarks/interleaved.py --models mnist_small,cifar_small,cnn7 --threads 1
    .venv/bin/python benchmarks/interleaved.py --set ibp --models mnist_small,cifar_small,cnn7
    .venv/bin/python benchmarks/interleaved.py --set dual --clock process    # dual r=50 vs convex_adversarial

Rows: CROWN-IBP with loss fusion (certorch's ``crown_ibp`` default), CROWN-IBP on the K-1
margins (certorch), and auto_LiRPA 0.3's CROWN-IBP on the margins (``bound_upper=False``);
``--set ibp``: IBP against auto_LiRPA; ``--set dual``: the dual network with 50 Cauchy projections
against convex_adversarial 0.4.4 (``l1_median``); forward + backward of the robust loss at batch 128 on random inputs, models without Normalize.
Used when the machine is shared (``benchmarks/train_step.py`` runs configurations one after the
other in subprocesses and is the reference on an idle machine).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bounds as bb  # noqa: E402

SETS = {  # (library, method, extra configuration); the last row is the peer every other row is divided by
    "crown-ibp": [("certorch_fused", "crown-ibp", {}), ("certorch", "crown-ibp", {}), ("auto_lirpa", "crown-ibp", {})],
    "ibp": [("certorch", "ibp", {}), ("auto_lirpa", "ibp", {})],
    "dual": [("certorch", "dual", {"projections": 50}), ("convex_adversarial", "dual", {"projections": 50})],
}
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}  # process: CPU time, steadier on a shared machine


def main(argv=None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mnist_small,cifar_small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--set", default="crown-ibp", choices=sorted(SETS))
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS))
    args = p.parse_args(argv)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", bb.thp_setting())  # before the first big tensor, as the CLI
    ROWS, clock = SETS[args.set], CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    print(f"# {bb.hardware(args.threads)}; batch {args.batch}; median of {args.rounds} interleaved rounds; "
          f"{args.clock} time\n")
    ratios = [f"{lib} / {ROWS[-1][0]}" for lib, _, _ in ROWS[:-1]]
    print("| model | " + " | ".join(f"{lib} {m} s" for lib, m, _ in ROWS) + " | " + " | ".join(ratios) + " |")
    print("|---|" + "---|" * (2 * len(ROWS) - 1))
    for name in [m for m in args.models.split(",") if m]:
        cfg = {"model": name, "batch": args.batch, "robust_ce": True}
        model, x, y, eps, C = bb._setup(cfg)
        runs = []
        for lib, meth, extra in ROWS:
            run = bb._runner({**cfg, "lib": lib, "method": meth, **extra}, model, x, y, eps, C)

            def step(run=run):
                model.zero_grad(set_to_none=True)
                run().backward()
            step()  # warm-up (capture, tracing)
            runs.append(step)
        times = [[] for _ in ROWS]
        for _ in range(args.rounds):
            for i, step in enumerate(runs):
                t = clock()
                step()
                times[i].append(clock() - t)
        med = [statistics.median(t) for t in times]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in med) + " | "
              + " | ".join(f"{m / med[-1]:.2f}" for m in med[:-1]) + " |", flush=True)


if __name__ == "__main__":
    main()
