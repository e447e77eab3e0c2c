"""Part 4 acceptance runs (issue 12): train COLT, MAT and MAAR with the same ``-cpu`` budget
(``configs/part4/{colt,mat,maar}_mnist_0.1-cpu.yaml``) and certify them (not a test; long).

    .venv/bin/python benchmarks/part4_acceptance.py                     # all three, full test set
    .venv/bin/python benchmarks/part4_acceptance.py --methods colt --n-complete 20

Each method trains into ``runs/part4/acc/<method>`` (skipped when complete, resumed when
partial), with one torch thread (certification too: ``OMP_NUM_THREADS=1``). Two certifications, both resumable (``certorch certify``
skips the examples already in its results):

* ``certify-crown``: the whole MNIST test set with ``pgd,ibp,crown`` (``--chunk 50``): a sound
  lower bound on certified accuracy (PGD's counterexamples give the upper bound);
* ``certify-complete``: the first ``--n-complete`` test images with the complete default
  pipeline ``pgd,ibp,crown,alpha-crown,bab,milp`` (``--timeout`` s each, one example per task);
* with ``--sample K``, ``estimate-K``: the complete pipeline on a seeded uniform sample of K of the
  images ``certify-crown`` left undecided, carrying its sound verdicts over
  (``certorch certify --refine ... --sample K --seed S``), which estimates the certified accuracy
  of the whole test set with a 95 % interval (docs/training.md's at-a-glance table:
  ``--sample 300 --timeout 15 --n-complete 0``).

Prints a markdown table (``--out`` also writes it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from part3_acceptance import CLI, _complete, sh  # noqa: E402

METHODS = ["colt", "mat", "maar"]
PAPER = {"colt": "99.2 / 97.1", "maar": "99.1 / 97.3", "mat": "not reported"}  # MAAR paper Table 1 (900 epochs)


def train(method: str, data_dir: str, runs: Path, log: Path) -> dict:
    run = runs / method
    if not _complete(run):
        resume = run.exists() and any(run.iterdir())
        cfg = ROOT / "configs" / "part4" / f"{method}_mnist_0.1-cpu.yaml"
        args = CLI + ["train", "--resume", str(run)] if resume else CLI + ["train", str(cfg), "threads=1", "--out", str(run)]
        sh(args + ["--data-dir", data_dir, "--no-progress"], log)
    return json.loads((run / "summary.json").read_text())


def certify(run: Path, out: str, n: int, stages: str | None, timeout: float, chunk: int, data_dir: str,
            log: Path, extra: list[str] | None = None) -> dict:
    args = CLI + ["certify", str(run), "--eps", "0.1", "--n", str(n), "--timeout", f"{timeout:g}",
                  "--chunk", str(chunk), "--data-dir", data_dir, "--out", str(run / out)]
    sh(args + (["--stages", stages] if stages else []) + (extra or []), log)
    return json.loads((run / out / "summary.json").read_text())[0]


def row(method: str, s: dict, crown: dict, full: dict | None, est: dict | None) -> str:
    last = s["final"]
    cells = [method, str(s["epochs"]), f"{s['seconds'] / 60:.1f}",
             f"{100 * last['nat_acc']:.1f} / {100 * last['pgd_acc']:.1f} / {100 * last['latent_acc']:.1f}",
             f"{100 * last['train_verified_error']:.1f}", f"{100 * crown['clean_acc']:.2f}",
             f"{100 * crown['pgd_acc']:.2f}", f"**{100 * crown['certified_acc']:.2f}**"]
    if full is not None:
        cells.append(f"{full['n_verified']} of {full['examples']} ({full['n_timeout']} timeouts)")
    if est is not None:
        e = est["estimate"]
        # the sampled examples' verdicts: the estimate's counts less the carried-over (crown run's) ones
        sampled = (f"{est['n_verified'] - crown['n_verified']} / {est['n_falsified'] - crown['n_falsified']} / "
                   f"{est['n_timeout']} of {e['sampled']}")
        lo, hi = e["certified_ci95"]
        cells += [sampled, f"**{100 * e['certified_estimate']:.1f}** ({100 * lo:.1f}-{100 * hi:.1f})",
                  f"{100 * e['certified_lower']:.2f}"]
    cells.append(PAPER[method])
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n", type=int, default=10000, help="test images for the pgd,ibp,crown certification")
    p.add_argument("--n-complete", type=int, default=20,
                   help="first test images for the complete pipeline (0: skip)")
    p.add_argument("--sample", type=int, default=0,
                   help="estimate the whole test set from a seeded sample of this many of the images "
                        "pgd,ibp,crown left undecided (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "part4" / "acc"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # certification with one torch thread, as measured
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "acceptance.log"
    head = ["method", "epochs", "train min", "held-out 500: clean / PGD / latent %", "train verified error % (Eq. 25)",
            f"clean % ({args.n})", "PGD %", "certified % (pgd,ibp,crown)"]
    if args.n_complete > 0:
        head.append(f"complete pipeline, first {args.n_complete}")
    if args.sample > 0:
        head += ["sample of the undecided: verified / falsified / timeouts",
                 f"estimated certified %, all {args.n} (95 % interval)", "proved %"]
    head.append("paper clean / certified (900 epochs)")
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in [m for m in args.methods.split(",") if m]:
        s = train(m, args.data_dir, runs, log)
        crown = certify(runs / m, "certify-crown", args.n, "pgd,ibp,crown", args.timeout, 50, args.data_dir, log)
        full = (certify(runs / m, "certify-complete", args.n_complete, None, args.timeout, 1, args.data_dir, log)
                if args.n_complete > 0 else None)
        est = (certify(runs / m, f"estimate-{args.sample}", args.n, None, args.timeout, 1, args.data_dir, log,
                       ["--refine", str(runs / m / "certify-crown"), "--sample", str(args.sample),
                        "--seed", str(args.seed), "--workers", "1"])
               if args.sample > 0 else None)
        L.append(row(m, s, crown, full, est))
        print("\n".join(L), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
