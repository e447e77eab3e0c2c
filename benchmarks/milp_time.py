"""MILP time per example against the number of unstable ReLUs.

    .venv/bin/python benchmarks/milp_time.py [--width 32] [--n 20] [--eps 0.02,0.05,0.1]

Random-weight MLPs on 8x8 inputs (no data needed); for each eps, every example is verified with
stages ``milp`` only (CROWN node bounds, big-M MILP with HiGHS) and the number of unstable ReLUs
(under those bounds) and the MILP seconds are printed, then grouped.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from certorch.graph.capture import capture
from certorch.verify.lp import example_encoding
from certorch.verify.milp import MilpStage
from certorch.verify.pipeline import certify_batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--eps", default="0.02,0.05,0.1")
    p.add_argument("--timeout", type=float, default=60)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, a.width), nn.ReLU(), nn.Linear(a.width, a.width), nn.ReLU(),
                        nn.Linear(a.width, 10))
    x = torch.rand(a.n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    rows = []
    for eps in [float(e) for e in a.eps.split(",")]:
        res = certify_batch(net, x, y, eps, stages="milp", timeout=a.timeout)
        from certorch.spec import linf_ball, margin_matrix
        from certorch.verify.stages import Problem

        box = linf_ball(x.double(), eps)
        C = margin_matrix(y, 10).double()
        prob = Problem(net, box, C, torch.zeros(C.shape[:2], dtype=torch.float64), tuple((r,) for r in range(9)))
        for i, r in enumerate(res):
            k = example_encoding(prob, i, None).num_unstable
            rows.append((eps, k, r.stage_seconds.get("milp", 0.0), r.verdict.value))
    print(f"{'eps':>6} {'unstable':>8} {'milp_s':>8} verdict")
    for eps, k, s, v in sorted(rows, key=lambda t: t[1]):
        print(f"{eps:6.3f} {k:8d} {s:8.3f} {v}")
    buckets: dict[int, list[float]] = {}
    for _, k, s, _ in rows:
        buckets.setdefault(k // 10 * 10, []).append(s)
    print("\nunstable ReLUs (bucket of 10) -> median MILP seconds (count)")
    for b in sorted(buckets):
        print(f"{b:4d}-{b + 9:<4d} {statistics.median(buckets[b]):8.3f} ({len(buckets[b])})")


if __name__ == "__main__":
    main()
