"""Part 4 speed (issue 12; a benchmark, not a timed test): COLT latent stages against PGD training
with the same attack steps, and triangle-LP training against CROWN training, side by side in one run.

    .venv/bin/python benchmarks/part4_speed.py                  # writes runs/part4/speed.md
    .venv/bin/python benchmarks/part4_speed.py --subset 300 --repeats 1
    .venv/bin/python benchmarks/part4_speed.py --skip-triangle --projection-dtype float32

* COLT vs PGD: ``colt_mnist``, batch 100, 40 attack steps of 0.035 (the paper's), one training
  epoch on the first ``--subset`` MNIST images per COLT stage (latent layer: input, ReLU "2",
  ReLU "4"; earlier layers frozen as in ``configs/part4/colt_mnist_0.1-cpu.yaml``) and of ``pgd``
  training with the same steps; training seconds from the trainer (evaluation off), the fastest
  of ``--epochs`` epochs per stage / run (the least disturbed by other load on a shared machine).
  Target: every COLT stage within 1.5x of the PGD epoch. The runs alternate (PGD, COLT stages,
  PGD again) so that load changes hit both sides.
* the same per training step, interleaved (``--batch-rounds``, default 15): PGD and each COLT
  stage take turns on the same batch in one process; medians. Sequential epochs on a shared VM
  drift apart by 10 % and more between runs; interleaving puts both sides under the same load.
* triangle vs CROWN: the relaxation study's MLP (784-50-50-10), batch 50, eps 0.1: seconds of one
  forward + backward of the certified loss, median over ``--repeats`` batches.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bounds as bb  # noqa: E402


def _epoch_seconds(cfg_dict: dict, data_dir: str) -> list[float]:
    """Training seconds of each epoch (all stages) of one short run."""
    from certorch.config import config_from_dict
    from certorch.train import Trainer

    cfg_dict = dict(cfg_dict, data=dict(cfg_dict["data"], data_dir=data_dir))
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(config_from_dict(cfg_dict), run_dir=tmp).fit()
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["train_seconds"] for r in rows if "train_seconds" in r]


def colt_vs_pgd(args) -> dict:
    common = {"seed": 0, "device": "cpu", "batch_size": 100, "progress": False, "threads": args.threads,
              "data": {"dataset": "mnist", "subset": args.subset}, "model": {"name": "colt_mnist"},
              "optim": {"name": "adam", "lr": 1e-3}, "eps": {"value": 0.1, "schedule": "constant"},
              "eval": {"size": 0}}
    E = args.epochs
    pgd = dict(common, name="speed_pgd", epochs=E, method={"name": "pgd", "params": {"steps": 40, "step_size": 0.035}})
    colt = dict(common, name="speed_colt", method={"name": "colt", "params": {
        "layers": ["input", "2", "4"], "steps": 40, "step_size": 0.035, "projections": 50,
        "projection_dtype": args.projection_dtype}},
        stages=[{"epochs": E, "name": "input"}, {"epochs": E, "name": "relu1", "freeze": "2"},
                {"epochs": E, "name": "relu2", "freeze": "4"}])
    p1 = min(_epoch_seconds(pgd, args.data_dir))
    per_epoch = _epoch_seconds(colt, args.data_dir)
    stages = [min(per_epoch[k * E:(k + 1) * E]) for k in range(3)]
    p2 = min(_epoch_seconds(pgd, args.data_dir))
    base = min(p1, p2)
    return {"pgd_seconds": [p1, p2], "colt_seconds": stages, "ratios": [s / base for s in stages]}


def colt_vs_pgd_batches(args) -> dict:
    """The same comparison per training step, interleaved: one process holds a PGD run and one
    COLT run per stage (prefix frozen as in the stages) and gives each, in turn, the same MNIST
    batch, ``--batch-rounds`` times; each side's median seconds per step. A change of machine
    speed (a shared VM's) hits both sides of a round alike, which sequential epochs cannot promise."""
    from certorch.data.loaders import load
    from certorch.models import build
    from certorch.train.objectives import TrainState, build_objective
    from certorch.train.staged import freeze_prefix, frozen_prefix, set_train_modes

    torch.set_num_threads(args.threads)
    data = load("mnist", "train", data_dir=args.data_dir, subset=args.subset)
    runs = {}
    for name, layer in (("pgd", None), ("input", "input"), ("relu1", "2"), ("relu2", "4")):
        torch.manual_seed(0)
        model = build("colt_mnist", dataset="mnist")
        if name == "pgd":
            obj = build_objective("pgd", {"steps": 40, "step_size": 0.035})
        else:
            obj = build_objective("colt", {"layers": [layer], "steps": 40, "step_size": 0.035, "projections": 50,
                                           "projection_dtype": args.projection_dtype})
        frozen = frozen_prefix(model, None if layer in (None, "input") else layer)
        freeze_prefix(model, frozen, {})
        set_train_modes(model, frozen)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        runs[name] = (model, obj, opt)
    times: dict[str, list[float]] = {k: [] for k in runs}
    n = len(data.labels) // 100
    state = TrainState(epoch=0, step=0, epoch_step=0, steps_per_epoch=n, total_epochs=1, t=0.0, progress=0.0, eps=0.1,
                       eps_target=0.1, lr=1e-3, values={}, stage=0)
    for r in range(args.batch_rounds + 1):  # round 0 warms up
        x, y = data.images[(r % n) * 100:(r % n + 1) * 100], data.labels[(r % n) * 100:(r % n + 1) * 100]
        for name, (model, obj, opt) in runs.items():
            t0 = time.perf_counter()
            out = obj(model, x, y, 0.1, state)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": med, "ratios": {k: v / med["pgd"] for k, v in med.items()}}


def triangle_vs_crown(args) -> dict:
    import certorch as ct
    from certorch.train.robust_loss import robust_cross_entropy

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 50), torch.nn.ReLU(), torch.nn.Linear(50, 50),
                              torch.nn.ReLU(), torch.nn.Linear(50, 10))
    g = torch.Generator().manual_seed(0)
    out = {}
    for method in ("crown", "triangle", "crown"):
        times = []
        for _ in range(args.repeats):
            x, y = torch.rand(50, 1, 28, 28, generator=g), torch.randint(0, 10, (50,), generator=g)
            t0 = time.perf_counter()
            lower = ct.bound(net, x, 0.1, method=method, y=y, upper=False).lower
            robust_cross_entropy(lower, y).backward()
            times.append(time.perf_counter() - t0)
        out.setdefault(method, []).append(statistics.median(times))
    crown = statistics.mean(out["crown"])
    return {"crown_seconds": crown, "triangle_seconds": out["triangle"][0], "ratio": out["triangle"][0] / crown}


def _projection_dtype(name: str) -> str:
    """What COLT's ``projection_dtype`` resolves to on this machine's CPU."""
    from certorch.domains.zonotope import resolve_projection_dtype

    return str(resolve_projection_dtype(name, "cpu") or torch.float32).replace("torch.", "")


def report(c: dict, b: dict | None, t: dict | None, args, elapsed: float) -> str:
    L = ["# Part 4 speed: COLT vs PGD epochs, triangle vs CROWN training steps", "",
         f"Generated by `benchmarks/part4_speed.py --subset {args.subset} --epochs {args.epochs} --repeats {args.repeats} --threads "
         f"{args.threads} --batch-rounds {args.batch_rounds} --projection-dtype {args.projection_dtype}"
         f"{' --skip-triangle' if args.skip_triangle else ''}` in {elapsed / 60:.1f} min on {bb.hardware(args.threads)}.", "",
         f"## COLT latent stages vs PGD training (colt_mnist, batch 100, 40 steps, {args.subset} images, fastest of "
         f"{args.epochs} epochs; the region's 50 Cauchy projections in {_projection_dtype(args.projection_dtype)}, "
         f"`projection_dtype: {args.projection_dtype}`)",
         "", "| run | train seconds | / PGD | target |", "|---|---|---|---|",
         f"| PGD (run before, run after) | {c['pgd_seconds'][0]:.2f}, {c['pgd_seconds'][1]:.2f} | 1 | |"]
    for name, s, r in zip(("COLT stage input", "COLT stage relu1 (\"2\")", "COLT stage relu2 (\"4\")"),
                          c["colt_seconds"], c["ratios"]):
        L.append(f"| {name} | {s:.2f} | {r:.2f} | <= 1.5 ({'met' if r <= 1.5 else 'missed'}) |")
    if b is not None:
        L += ["", f"## The same per training step, interleaved ({args.batch_rounds} rounds of one batch of 100 each; median)",
              "", "| run | seconds per step | / PGD | target |", "|---|---|---|---|",
              f"| PGD | {b['seconds']['pgd']:.3f} | 1 | |"]
        for name, label in (("input", "input"), ("relu1", 'relu1 ("2")'), ("relu2", 'relu2 ("4")')):
            r = b["ratios"][name]
            L.append(f"| COLT stage {label} | {b['seconds'][name]:.3f} | {r:.2f} | <= 1.5 ({'met' if r <= 1.5 else 'missed'}) |")
    if t is None:
        return "\n".join(L) + "\n"
    L += ["", "## Triangle vs CROWN training step (MLP 784-50-50-10, batch 50, eps 0.1, fwd + bwd of the robust CE)",
          "", "| bound | seconds per batch | / CROWN |", "|---|---|---|",
          f"| crown | {t['crown_seconds']:.3f} | 1 |",
          f"| triangle | {t['triangle_seconds']:.3f} | {t['ratio']:.1f} |"]
    return "\n".join(L) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subset", type=int, default=1000, help="MNIST training images per COLT / PGD epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per COLT stage and per PGD run (the fastest counts)")
    p.add_argument("--repeats", type=int, default=3, help="batches per bound in the triangle / CROWN timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--projection-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="COLT's projection_dtype for the latent region (auto: bfloat16 where native)")
    p.add_argument("--skip-triangle", action="store_true", help="time COLT vs PGD only")
    p.add_argument("--batch-rounds", type=int, default=15,
                   help="rounds of the interleaved per-step comparison (0: skip it)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    p.add_argument("--out", default=str(ROOT / "runs" / "part4" / "speed.md"))
    args = p.parse_args(argv)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", bb.thp_setting())  # before the first big tensor, as the CLI
    t0 = time.time()
    c = colt_vs_pgd(args)
    b = colt_vs_pgd_batches(args) if args.batch_rounds > 0 else None
    t = None if args.skip_triangle else triangle_vs_crown(args)
    text = report(c, b, t, args, time.time() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
