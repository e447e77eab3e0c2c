"""Diagnose relaxations as training objectives: continuity, sensitivity, tightness (issue 12).

  certorch diagnose runs/ibp_mnist_0.1-cpu --eps 0.1 --relaxations ibp,crown-ibp,crown,zonotope
  certorch diagnose mnist_small --weights model.safetensors --data mnist --eps 0.1 --n 32 --points 201

For each relaxation (bound method) on the first ``--n`` test examples: the robust loss along one
random line in parameter space (``--points`` values of t in [-radius, radius], parameters moved
by t times a direction scaled to each parameter's norm; the same line for every relaxation): the
number and largest size of its jumps (continuity); the mean gradient norm and its coefficient of
variation along the line (sensitivity); the mean margin-bound width, the fraction certified by that
bound and the unstable ReLUs per example (tightness). Writes ``OUT/diagnose.json``,
``OUT/diagnose.md`` and ``OUT/diagnose.png`` (loss and gradient norm along the line).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "diagnose"
HELP = "continuity / sensitivity / tightness of relaxations as training objectives (table + plot)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from certorch.cli.certify import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--eps", type=float, required=True, help="L-inf radius in pixel space [0, 1]")
    p.add_argument("--relaxations", default="ibp,crown-ibp,crown",
                   help="comma-separated bound methods (default ibp,crown-ibp,crown; zonotope / symbolic / dual "
                        "with gradients cost about 10x more)")
    p.add_argument("--n", type=int, default=16, help="first N test examples (default 16)")
    p.add_argument("--points", type=int, default=101, help="points on the line (default 101)")
    p.add_argument("--radius", type=float, default=0.05, help="line half-length, relative to the weights (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random line")
    p.add_argument("--out", default=None, help="output folder (default: RUN/diagnose or runs/diagnose-MODEL)")


def table(rows: list[dict]) -> str:
    L = ["| relaxation | robust loss | jumps | largest jump | grad norm | grad CV | bound width | certified % | unstable ReLUs |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['method']} | {r['loss']:.4f} | {r['jumps']} | {r['max_jump']:.3g} | {r['grad_norm']:.3g} | "
                 f"{r['grad_cv']:.3f} | {r['width']:.3g} | {100 * r['certified']:.1f} | {r['unstable']:.1f} |")
    return "\n".join(L) + "\n"


def plot(scans: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, s in scans.items():
        a.plot(s.t.numpy(), s.loss.numpy(), label=m, lw=1)
        b.plot(s.t.numpy(), s.grad_norm.numpy(), label=m, lw=1)
    a.set(xlabel="t (step along the random direction)", ylabel="robust loss", title="continuity")
    b.set(xlabel="t", ylabel="gradient norm", title="sensitivity", yscale="log")
    a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from certorch.cli.certify import load_model_and_data
    from certorch.cli.main import data_dir
    from certorch.data import load
    from certorch.errors import CertorchError
    from certorch.spec import check_eps
    from certorch.train.diagnose import diagnose

    check_eps(args.eps)
    if args.n < 1:
        raise CertorchError(f"--n must be >= 1, got {args.n}")
    if args.radius <= 0:
        raise CertorchError(f"--radius must be > 0, got {args.radius}")
    methods = [m.strip() for m in args.relaxations.split(",") if m.strip()]
    if not methods:
        raise CertorchError("--relaxations is empty")
    model, dataset, default_out = load_model_and_data(args)
    model.eval()
    out = Path(args.out) if args.out else (default_out.parent / "diagnose" if Path(args.run).exists()
                                           else Path("runs") / f"diagnose-{args.run}")
    ds = load(dataset, "test", data_dir=data_dir(args), subset=args.n)
    x, y = ds.images, ds.labels
    bar = tqdm(total=len(methods) * args.points, desc="diagnose", unit="pt", file=sys.stderr, disable=None)
    rows, scans = diagnose(model, x, y, args.eps, methods, args.radius, args.points, args.seed, progress=bar.update)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps({"eps": args.eps, "n": len(y), "points": args.points,
                                                   "radius": args.radius, "seed": args.seed, "rows": rows}, indent=1))
    text = table(rows)
    (out / "diagnose.md").write_text(f"# diagnose {args.run} at eps {args.eps:g} ({len(y)} test examples, "
                                     f"{args.points} points, radius {args.radius:g}, seed {args.seed})\n\n{text}")
    plot(scans, out / "diagnose.png", f"{args.run} eps={args.eps:g}")
    print(text, end="")
    print(f"wrote {out / 'diagnose.md'}, {out / 'diagnose.json'}, {out / 'diagnose.png'}")
    return 0
