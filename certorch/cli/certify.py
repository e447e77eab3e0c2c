"""Certify L-inf robustness of a trained model example by example (attack, IBP, CROWN, LP, MILP).

  certorch certify runs/mnist_small_pgd --eps 0.02 --n 1000 --stages pgd,ibp,crown,lp,milp --timeout 60
  certorch certify mnist_small --weights model.safetensors --data mnist --eps 0.1 --workers 2
  certorch certify runs/x --eps-sweep 0.01,0.02,0.05 --stages pgd,crown --out runs/x/certify
  certorch certify runs/x --n 10000 --stages pgd,ibp,crown --out runs/x/cheap
  certorch certify runs/x --n 10000 --refine runs/x/cheap --sample 200 --out runs/x/complete

``--refine DIR`` carries over the verdicts an earlier (cheaper) run in ``DIR`` decided (verified,
falsified, misclassified) and runs only the rest; ``--sample K`` runs a seeded uniform sample of K
of those, and the summary then estimates the certified accuracy of all N examples (proved lower
bound, estimate with a 95 % interval, upper bound); a larger K with the same seed extends the
same sample.

Writes ``OUT/results-eps{eps}.jsonl`` (one line per example; rerunning skips examples already
there), ``OUT/counterexamples/`` (float64 counterexamples, safetensors), ``OUT/summary.json``
and, for several eps, ``OUT/certified_vs_eps.png``. A cascade run (``certorch train`` with
``cascade:``) writes ``OUT/cascade-eps{eps}.json`` and ``OUT/cascade-eps{eps}.jsonl`` (one line per
model and chunk of certificates; rerunning skips the certificates already there).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

NAME = "certify"
HELP = "per-example certification (verified / falsified / unknown / timeout) with JSONL results"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments :func:`load_model_and_data` reads: RUN_OR_MODEL, ``--weights``, ``--data``."""
    p.add_argument("run", metavar="RUN_OR_MODEL", help="run directory, checkpoint, or zoo model name (with --weights)")
    p.add_argument("--weights", default=None, help="safetensors weights for a zoo model name")
    p.add_argument("--data", default=None, help="dataset (default: the run's dataset)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--eps", type=float, default=None, help="L-inf radius in pixel space [0, 1]")
    p.add_argument("--eps-sweep", default=None, help="comma-separated radii; also plots certified accuracy vs eps")
    p.add_argument("--n", type=int, default=1000, help="first N test examples (default 1000)")
    p.add_argument("--stages", default="pgd,ibp,crown,alpha-crown,bab,milp",
                   help="comma-separated stages, in order (default: the pipeline's); bab and alpha-crown "
                        "take options, e.g. alpha-crown:iters=5,bab:branch_candidates=3")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per example (default 60)")
    p.add_argument("--workers", type=int, default=1, help="parallel Ray workers (default 1: in-process)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster at HOST:PORT")
    p.add_argument("--threads", type=int, default=1, help="HiGHS threads per example")
    p.add_argument("--chunk", type=int, default=8, help="examples per task")
    p.add_argument("--float64", action="store_true", help="run the model (clean pass, attacks) in float64 too")
    p.add_argument("--out", default=None, help="output folder (default: RUN/certify or runs/certify-MODEL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--refine", default=None, metavar="DIR",
                   help="an earlier run's output folder: carry over the examples it decided, run only the rest")
    p.add_argument("--sample", type=int, default=None, metavar="K",
                   help="run a seeded uniform sample of K of the examples left to run and estimate the whole set")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")


def _parse_eps(args) -> list[float]:
    from certorch.errors import CertorchError
    from certorch.spec import check_eps

    if args.eps_sweep:
        try:
            eps = [float(e) for e in args.eps_sweep.split(",") if e.strip()]
        except ValueError:
            raise CertorchError(f"--eps-sweep must be comma-separated numbers, got {args.eps_sweep!r}") from None
    elif args.eps is not None:
        eps = [args.eps]
    else:
        raise CertorchError("give --eps or --eps-sweep")
    if not eps:
        raise CertorchError("--eps-sweep is empty")
    for e in eps:
        check_eps(e)
    return eps


def load_model_and_data(args):
    """(model, dataset name, default out dir) from a run dir / checkpoint or a zoo name + weights."""
    from certorch.errors import CertorchError

    path = Path(args.run)
    if args.weights is None and path.exists():
        from certorch.train import load_run

        loaded = load_run(path, "cpu")
        base = loaded.run_dir or path.parent
        return loaded.model, args.data or loaded.config.data.dataset, base / "certify"
    from certorch.models import build, model_info

    if args.weights is None:
        raise CertorchError(f"{args.run!r} is neither a run directory nor a checkpoint (for a zoo model name, "
                            "give --weights FILE.safetensors)")
    model_info(args.run)
    if args.data is None:
        raise CertorchError("a zoo model name needs --data")
    from safetensors.torch import load_file

    if not Path(args.weights).is_file():
        raise CertorchError(f"weights file not found: {args.weights}")
    model = build(args.run, dataset=args.data)
    try:
        model.load_state_dict(load_file(args.weights))
    except Exception as e:  # noqa: BLE001
        raise CertorchError(f"weights {args.weights} do not fit model {args.run!r}: {str(e).splitlines()[0]}") from None
    return model.eval(), args.data, Path("runs") / f"certify-{args.run}"


def _jsonl(path: Path, parse) -> list:
    """``parse(row)`` of every JSON row of a results file, skipping a line that a kill cut short
    (or any row ``parse`` cannot read)."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(parse(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def open_append(path: Path):
    """``path`` opened for appending rows; a last line cut short by a kill is ended first, so the
    next row starts on a line of its own (the torn line stays unreadable and is skipped)."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a") as f:
                f.write("\n")
    return open(path, "a")


def read_done(path: Path) -> dict[int, dict]:
    """Results already in a JSONL file, by example index (a truncated last line is ignored)."""
    return dict(_jsonl(path, lambda d: (int(d["index"]), d)))


DECIDED = ("verified", "falsified", "not_verified")


def read_refine(folder: Path, eps: float, labels) -> dict[int, dict]:
    """The rows an earlier run's ``folder/results-eps{eps}.jsonl`` decided (verified / falsified /
    not_verified), by index, for the ``len(labels)`` examples; a row whose label differs from
    ``labels`` (a (N,) tensor) means other data and is an error."""
    from certorch.errors import CertorchError

    path = Path(folder) / f"results-eps{eps:g}.jsonl"
    if not path.is_file():
        raise CertorchError(f"--refine: no results for eps={eps:g} in {folder} ({path.name} not found)")
    rows = {i: d for i, d in read_done(path).items() if i < len(labels) and d.get("verdict") in DECIDED}
    for i, d in rows.items():
        if int(d.get("label", -1)) != int(labels[i]):
            raise CertorchError(f"--refine: {path} has label {d.get('label')} for example {i}, the data has "
                                f"{int(labels[i])}: not the same test set")
    return rows


def clean_correct(model, images, labels, batch: int = 1024):
    """(N,) bool: the model's clean prediction on ``images`` (N, ...) equals ``labels`` (N,)."""
    import torch

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return torch.cat([model(images[k:k + batch].to(dtype)).argmax(-1) == labels[k:k + batch]
                          for k in range(0, len(labels), batch)])


def check_carried(correct, carried: dict[int, dict], folder) -> None:
    """Refuse verdicts carried over from another model: each carried example's clean prediction
    (``correct``, (N,) bool, from :func:`clean_correct`) must agree with its row (correct for
    verified / falsified, wrong for not_verified). A cheap guard, not a proof that it is the same
    model."""
    import torch

    from certorch.errors import CertorchError

    idx = sorted(carried)
    if not idx:
        return
    expected = torch.tensor([carried[i]["verdict"] != "not_verified" for i in idx])
    bad = int((correct[idx] != expected).sum())
    if bad:
        raise CertorchError(f"--refine: this model's clean predictions disagree with {bad} of the {len(idx)} verdicts "
                            f"carried from {folder}: not the model that wrote them")


def sample_indices(pool: list[int], k: int | None, seed: int) -> list[int]:
    """``k`` indices of ``pool`` drawn uniformly without replacement (all of them when ``k`` is None),
    in draw order: the first ``k`` of one seeded permutation, so a larger ``k`` with the same seed
    extends the smaller sample and a rerun draws the same one."""
    import torch

    if k is None or k >= len(pool):
        return list(pool)
    g = torch.Generator().manual_seed(seed)
    return [pool[int(j)] for j in torch.randperm(len(pool), generator=g)[:k]]


def _wilson(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an observed proportion ``p`` with (effective) sample size ``n``."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sampled_estimate(carried: list[dict], sampled: list[dict], population: int, pool: int) -> dict:
    """Certified accuracy of ``population`` examples from the decided rows ``carried`` and a uniform
    sample ``sampled`` (rows) of the ``pool`` other examples (timeouts, errors, unknowns count as not
    certified: the estimate is of what this pipeline certifies at this timeout).

    ``certified_lower`` is proved (every verified row), ``certified_upper`` is sound too (all but
    the falsified and misclassified rows); the estimate scales the sample's verified fraction to the
    pool and its 95 % interval is Wilson's, with the sample size inflated by the finite-population
    correction (exact when the whole pool is sampled) and clipped to the sound bounds. Fractions of
    ``population``."""
    n, s = population, len(sampled)
    verified = lambda rows: sum(r["verdict"] == "verified" for r in rows)  # noqa: E731
    refuted = lambda rows: sum(r["verdict"] in ("falsified", "not_verified") for r in rows)  # noqa: E731
    vc, vs = verified(carried), verified(sampled)
    lower, upper = (vc + vs) / n, (n - refuted(carried) - refuted(sampled)) / n
    if s >= pool:  # the whole pool ran (or nothing was left to run): exact
        est = lo = hi = (vc + vs) / n
    elif s == 0:
        est, lo, hi = float("nan"), lower, upper
    else:
        n_eff = s * (pool - 1) / (pool - s)
        p_lo, p_hi = _wilson(vs / s, n_eff)
        est = (vc + pool * vs / s) / n
        lo, hi = (vc + pool * p_lo) / n, (vc + pool * p_hi) / n
    return {"population": n, "carried": len(carried), "pool": pool, "sampled": s,
            "certified_lower": lower, "certified_estimate": est,
            "certified_ci95": [max(lo, lower), min(hi, upper)], "certified_upper": upper}


def summarize(rows: list[dict], eps: float) -> dict:
    """Summary of per-example JSON rows: accuracies, counts per verdict and deciding stage, time."""
    n = len(rows)
    verdicts = Counter(r["verdict"] for r in rows)
    stages = Counter(r["stage"] for r in rows if r["verdict"] in DECIDED)
    secs = [r["seconds"] for r in rows]
    frac = lambda k: verdicts.get(k, 0) / n if n else float("nan")  # noqa: E731
    return {
        "eps": eps,
        "examples": n,
        "clean_acc": (n - verdicts.get("not_verified", 0)) / n if n else float("nan"),
        "pgd_acc": (n - verdicts.get("not_verified", 0) - verdicts.get("falsified", 0)) / n if n else float("nan"),
        "certified_acc": frac("verified"),
        **{f"n_{k}": verdicts.get(k, 0) for k in ("verified", "falsified", "unknown", "timeout", "error", "not_verified")},
        "decided_by": dict(sorted(stages.items())),
        "median_s": statistics.median(secs) if secs else float("nan"),
        "total_s": sum(secs),
    }


def _plot(summaries: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([s["eps"] for s in summaries], [s["certified_acc"] for s in summaries], "o-", label="certified")
    ax.plot([s["eps"] for s in summaries], [s["pgd_acc"] for s in summaries], "s--", label="not falsified")
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    path = out / "certified_vs_eps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from certorch.cli.main import data_dir
    from certorch.data import load
    from certorch.distributed.ray_certify import certify_sharded, shutdown
    from certorch.errors import CertorchError
    from certorch.train.metrics import format_table
    from certorch.verify.pipeline import build_stages, check_timeout

    eps_list = _parse_eps(args)
    check_timeout(args.timeout)
    if args.n < 1:
        raise CertorchError(f"--n must be >= 1, got {args.n}")
    if args.workers < 1:
        raise CertorchError(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1 or args.chunk < 1:
        raise CertorchError("--threads and --chunk must be >= 1")
    if args.sample is not None and args.sample < 1:
        raise CertorchError(f"--sample must be >= 1, got {args.sample}")
    if args.refine is not None and not Path(args.refine).is_dir():
        raise CertorchError(f"--refine: no such folder: {args.refine}")
    if args.address:
        from certorch.distributed.ray_certify import check_address

        check_address(args.address)
    from certorch.train.cascade import is_cascade_run

    if args.weights is None and is_cascade_run(args.run):
        return _certify_cascade(args, eps_list)
    model, dataset, default_out = load_model_and_data(args)
    build_stages(args.stages, model)  # validate names before any work
    if args.float64:
        model = model.to(torch.float64)
    ds = load(dataset, "test", data_dir=data_dir(args), subset=args.n)
    out = Path(args.out) if args.out else default_out
    (out / "counterexamples").mkdir(parents=True, exist_ok=True)
    correct = clean_correct(model, ds.images, ds.labels) if args.refine else None
    summaries = []
    try:
        for eps in eps_list:
            jsonl = out / f"results-eps{eps:g}.jsonl"
            done = read_done(jsonl)
            carried = read_refine(Path(args.refine), eps, ds.labels) if args.refine else {}
            if args.refine:
                check_carried(correct, carried, args.refine)
            pool = [i for i in range(len(ds.labels)) if i not in carried]
            chosen = sample_indices(pool, args.sample, args.seed)
            wanted = sorted(set(carried) | set(chosen))
            todo = [i for i in chosen if i not in done]
            x = ds.images[todo]
            if args.float64:
                x = x.to(torch.float64)
            y = ds.labels[todo]
            bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc=f"certify eps={eps:g}", unit="ex",
                       disable=args.no_progress)
            with open_append(jsonl) as f:
                for i in sorted(set(carried) - set(done)):
                    done[i] = carried[i]
                    f.write(json.dumps(carried[i]) + "\n")
                f.flush()
                if todo:
                    for results in certify_sharded(model, x, y, eps, args.stages, args.timeout, index=todo,
                                                   workers=args.workers, address=args.address,
                                                   chunk_size=args.chunk, threads=args.threads):
                        for r in results:
                            if r.counterexample is not None:
                                from safetensors.torch import save_file

                                save_file({"x": r.counterexample.contiguous()},
                                          str(out / "counterexamples" / f"eps{eps:g}-{r.index}.safetensors"))
                            d = r.to_json()
                            done[r.index] = d
                            f.write(json.dumps(d) + "\n")
                        f.flush()
                        bar.update(len(results))
            bar.close()
            summary = summarize([done[i] for i in wanted if i in done], eps)
            if args.sample is not None:
                summary["estimate"] = sampled_estimate([done[i] for i in sorted(carried) if i in done],
                                                       [done[i] for i in chosen if i in done],
                                                       len(ds.labels), len(pool))
            summaries.append(summary)
    finally:
        shutdown()
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    cols = ["eps", "examples", "clean_acc", "pgd_acc", "certified_acc", "n_verified", "n_falsified", "n_unknown",
            "n_timeout", "n_error", "median_s", "total_s"]
    print(format_table(summaries, cols))
    for s in summaries:
        print(f"eps={s['eps']:g} decided by stage: " + ", ".join(f"{k}={v}" for k, v in s["decided_by"].items()))
        if "estimate" in s:
            e = s["estimate"]
            print(f"eps={s['eps']:g} certified accuracy of all {e['population']} examples: estimate "
                  f"{e['certified_estimate']:.2%} (95 % CI {e['certified_ci95'][0]:.2%}-{e['certified_ci95'][1]:.2%}; "
                  f"proved {e['certified_lower']:.2%}, at most {e['certified_upper']:.2%}) from {e['sampled']} of "
                  f"{e['pool']} examples sampled, {e['carried']} carried over")
    if len(summaries) > 1:
        print(f"plot: {_plot(summaries, out)}")
    print(f"results: {out}")
    return 0


def _read_cascade_done(path: Path) -> dict[tuple[int, int], bool]:
    """``{(model, example index): verified}`` from a cascade JSONL (one row per model and chunk)."""
    rows = _jsonl(path, lambda d: [((int(d["model"]), int(i)), bool(v)) for i, v in zip(d["index"], d["verified"], strict=True)])
    return dict(pair for row in rows for pair in row)


def _certify_cascade(args: argparse.Namespace, eps_list: list[float]) -> int:
    """``certorch certify CASCADE_RUN``: the paper's per-stage table and the sound cascade error."""
    from tqdm import tqdm

    from certorch.cli.main import data_dir
    from certorch.data import load
    from certorch.train.cascade import stage_dirs
    from certorch.train.metrics import format_table
    from certorch.train.run import load_run
    from certorch.verify.cascade import certify_cascade
    from certorch.verify.pipeline import build_stages

    runs = [load_run(d, "cpu") for d in stage_dirs(args.run)]
    models = [r.model for r in runs]
    for m in models:
        build_stages(args.stages, m)
    ds = load(args.data or runs[0].config.data.dataset, "test", data_dir=data_dir(args), subset=args.n)
    out = Path(args.out) if args.out else Path(args.run) / "certify"
    out.mkdir(parents=True, exist_ok=True)
    for eps in eps_list:
        jsonl = out / f"cascade-eps{eps:g}.jsonl"
        known = _read_cascade_done(jsonl)
        bar = tqdm(desc=f"cascade eps={eps:g}", unit="ex", disable=args.no_progress)
        with open_append(jsonl) as f:
            def record(k: int, indices: list[int], verified: list[bool]) -> None:
                f.write(json.dumps({"model": k, "index": indices, "verified": verified}) + "\n")
                f.flush()
                bar.set_postfix(model=k + 1, refresh=False)
                bar.update(len(indices))

            rep = certify_cascade(models, ds.images, ds.labels, eps, args.stages, args.timeout, args.threads,
                                  args.chunk, known=known, record=record)
        bar.close()
        (out / f"cascade-eps{eps:g}.json").write_text(json.dumps(rep, indent=2))
        print(f"eps={eps:g}, {rep['examples']} test examples, Algorithm 2 (the paper's rule, not sound):")
        print(format_table(rep["paper_rule"], ["stage", "certified_here", "robust_err", "std_err"]))
        print("sound rule: model k runs where models 1..k-1 certify: " + ", ".join(
            f"model {c['stage']} certifies {c['certified']} of {c['evaluated']}" for c in rep["sound_certified"]))
        print(f"sound cascade robust error: {rep['sound_robust_err']:.4f} (any router), "
              f"{rep['sound_robust_err_ibp_routed']:.4f} (IBP-routed cascade)")
    print(f"results: {out}")
    return 0
