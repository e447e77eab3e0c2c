"""Branch and bound's float64 search (``BabOptions(low_precision=False)``) against its float32 search
(``low_precision=True``, the default since the sixteenth session) on the same cases, one after the other in this process (not a test; run it on an otherwise idle machine).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bab_precision.py \\
        --vnncomp 2022_mnist_fc/onnx/mnist-net_256x4.onnx:vnnlib/prop_3_0.05.vnnlib --timeout 60
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bab_precision.py --run runs/part4/acc/colt --indices 0-19 \\
        --eps 0.1 --timeout 15 --data-dir ../shared/datasets --json runs/bab_precision.json

Each case runs the default pipeline (``pgd,ibp,crown,alpha-crown,bab,milp``) once per mode; the
table gives the verdict, the seconds and branch and bound's message (domains, or why it stopped).
The search mode is switched by the default options of the ``bab`` stage (the VNN-COMP path builds
its stages by name).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = {"float64": False, "float32": True}


def _indices(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def _with_mode(low_precision: bool):
    """Make the pipeline's ``bab`` stage use ``BabOptions(low_precision=...)``."""
    from certorch.verify.bab import BabOptions, BabStage

    BabStage.__init__.__defaults__ = (BabOptions(low_precision=low_precision),)


def _cases(args):
    """(name, run(timeout) -> (verdict word, result)) for every case asked for."""
    if args.vnncomp:
        from certorch.cli.verify import verify_files

        base = Path(args.vnncomp_dir)
        for spec in args.vnncomp:
            onnx, _, prop = spec.partition(":")
            bench, _, onnx = onnx.partition("/")
            yield f"{bench}/{Path(onnx).stem}/{Path(prop).stem}", (
                lambda t, o=base / bench / onnx, p=base / bench / prop: verify_files(str(o), str(p), t)[::2])
    if args.run:
        from certorch.data import load
        from certorch.train import load_run
        from certorch.verify.pipeline import certify_batch

        loaded = load_run(Path(args.run), "cpu")
        idx = _indices(args.indices)
        ds = load(loaded.config.data.dataset, "test", data_dir=args.data_dir, subset=max(idx) + 1)
        for i in idx:
            def one(t, i=i):
                r = certify_batch(loaded.model, ds.images[i : i + 1], ds.labels[i : i + 1], args.eps, timeout=t)[0]
                return r.verdict.value, r
            yield f"{Path(args.run).name}/{i}", one


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vnncomp", action="append", default=[], metavar="BENCH/ONNX:VNNLIB",
                    help="a VNN-COMP instance (repeatable), paths inside --vnncomp-dir")
    ap.add_argument("--vnncomp-dir", default=str(ROOT.parent / "shared" / "vnncomp"))
    ap.add_argument("--run", default=None, help="a training run directory: certify its test images")
    ap.add_argument("--indices", default="0-9", help="test images of --run, e.g. 0-19,40")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--modes", default="float64,float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, go in _cases(args):
        for mode in args.modes.split(","):
            _with_mode(MODES[mode])
            t0 = time.perf_counter()
            word, r = go(args.timeout)
            rows.append({"case": name, "mode": mode, "verdict": word, "seconds": round(time.perf_counter() - t0, 2),
                         "stage": r.stage, "message": r.message})
            print(f"{name:50s} {mode:8s} {word:12s} {rows[-1]['seconds']:7.2f} s  {r.stage or '-':12s} {r.message}",
                  flush=True)
    for mode in args.modes.split(","):
        mine = [r for r in rows if r["mode"] == mode]
        decided = [r for r in mine if r["verdict"] in ("verified", "falsified", "unsat", "sat")]
        print(f"{mode}: {len(decided)} of {len(mine)} decided, {sum(r['seconds'] for r in mine):.1f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
