"""Cost of one COLT latent attack in the deepest latent layer (not a test): seconds and peak RSS.

    .venv/bin/python benchmarks/colt_region.py                       # colt_cifar, layer "6", batch 200
    .venv/bin/python benchmarks/colt_region.py --model colt_mnist --layer 4 --batch 100 --steps 40
    .venv/bin/python benchmarks/colt_region.py --projection-dtype float32   # the region's maps in float32

Builds the latent region of ``--layer`` over the eps-ball (projected zonotope bounds of the prefix,
``--projections`` Cauchy projections, as in training) and runs ``--steps`` latent PGD steps of
``--step-size``, on random inputs and labels with an untrained network, one torch thread. The
default is the evaluation batch of ``configs/part4/colt_cifar_2-cpu.yaml`` (its held-out evaluation
attacks 200 images at once), where that config's run peaked at 17 GB.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from certorch.data.registry import dataset_info
from certorch.graph.capture import capture
from certorch.models import build
from certorch.train.objectives.colt import COLT


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="colt_cifar")
    p.add_argument("--dataset", default=None, help="default: cifar10 for colt_cifar, else mnist")
    p.add_argument("--layer", default="6")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--step-size", type=float, default=0.25)
    p.add_argument("--projections", type=int, default=50)
    p.add_argument("--projection-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="COLT's projection_dtype (auto: bfloat16 where the CPU computes it natively)")
    args = p.parse_args(argv)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before the first big tensor, as the CLI
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dataset = args.dataset or ("cifar10" if args.model == "colt_cifar" else "mnist")
    shape = tuple(dataset_info(dataset).input_shape)
    model = build(args.model, dataset=dataset)
    x, y = torch.rand(args.batch, *shape), torch.randint(0, 10, (args.batch,))
    obj = COLT(steps=args.steps, step_size=args.step_size, projections=args.projections,
               projection_dtype=args.projection_dtype)
    graph = capture(model, shape)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    obj.adversarial_latent(model, graph, graph.node(args.layer), x, y, args.eps, args.steps, args.step_size)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    dt = str(obj.projection_dtype(x.device) or torch.float32).replace("torch.", "")
    print(f"{args.model} layer {args.layer!r}, batch {args.batch}, {args.projections} projections in {dt}, {args.steps} steps: "
          f"{seconds:.1f} s, peak RSS {peak:.2f} GiB (after setup {base:.2f} GiB)")


if __name__ == "__main__":
    main()
