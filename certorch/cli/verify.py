"""Verify a VNN-LIB property of an ONNX network (VNN-COMP style).

  certorch verify net.onnx prop.vnnlib --timeout 60 --out result.txt

Prints (and writes to ``--out``) one of ``sat`` (followed by the counterexample in the VNN-COMP
format ``((X_0 v) (X_1 v) ... (Y_0 v) ...)``, one pair per line), ``unsat``, ``timeout`` or
``unknown``; exit code 0 in all these cases. A verifier crash prints ``error`` (details on
stderr) and exits with 1. Bad input (malformed ONNX or VNN-LIB, a property whose sizes do not
match the network, timeout <= 0) prints ``error: ...`` and exits with 2.

Every ``sat`` counterexample is re-checked with a plain float64 forward pass of the network
inside the input box before it is reported; an unconfirmed one is reported as ``unknown``.

Time: ``--timeout`` covers everything: loading the ONNX file, parsing the VNN-LIB file (stopped
at the deadline) and every stage. When this command is the process's entry point the clock
starts when the process started (Python and torch start-up included). The work runs in a
worker thread; if it has not answered by the deadline plus :data:`GRACE` seconds, ``timeout``
is printed anyway. As the entry point, the process exits right after answering (``os._exit``
after flushing: interpreter teardown with torch loaded takes seconds). stdout carries only the
result: solver logs are silenced, or go to stderr with ``--verbose``.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

NAME = "verify"
HELP = "verify a VNN-LIB property of an ONNX network: sat / unsat / timeout / unknown"

#: verdict -> VNN-COMP result word
RESULT_WORDS = {"falsified": "sat", "verified": "unsat", "timeout": "timeout", "unknown": "unknown", "error": "error"}
#: seconds reserved before the deadline for reporting (the pipeline stops this much earlier)
RESERVE = 0.3
#: seconds after the deadline at which the watchdog answers ``timeout`` whatever the worker does
GRACE = 0.3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="network in ONNX format (.onnx)")
    p.add_argument("prop", metavar="PROP", help="property in VNN-LIB 1.0 format (.vnnlib)")
    p.add_argument("--timeout", type=float, required=True, help="time limit in seconds (> 0)")
    p.add_argument("--out", default=None, metavar="RESULT", help="also write the result to this file")
    p.add_argument("--stages", default=None,
                   help="comma-separated verification stages (default: the pipeline's: pgd,ibp,crown,alpha-crown,bab,milp); "
                        "bab and alpha-crown take options, e.g. bab:branch_candidates=3:batch=32, alpha-crown:iters=5")
    p.add_argument("--threads", type=int, default=1, help="solver threads (default 1)")
    p.add_argument("--verbose", action="store_true", help="LP/MILP solver logs on stderr (stdout stays the result)")


def format_counterexample(x, y) -> str:
    """VNN-COMP witness: ``((X_0 v)\\n (X_1 v)\\n ... (Y_0 v)\\n ...)`` from flat float64 x, y."""
    pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x.flatten().tolist())]
    pairs += [f"(Y_{i} {float(v)!r})" for i, v in enumerate(y.flatten().tolist())]
    return "(" + "\n ".join(pairs) + ")"


def confirm_counterexample(module, prop, input_shape, x):
    """Plain float64 forward pass of a copy of ``module`` at ``x``: returns the (n_out,) output
    if ``x`` lies in the property's box and the output is in an unsafe region, else ``None``."""
    import copy

    import torch

    x = x.detach().to(torch.float64).reshape(1, *input_shape)
    box = prop.input_box(tuple(input_shape))
    if not bool(box.contains(x).all()):
        return None
    m64 = copy.deepcopy(module).to(torch.float64).eval()
    with torch.no_grad():
        y = m64(x).reshape(1, -1)
    return y[0] if bool(prop.violation(y)[0] <= 0) else None


def verify_files(model_path: str, prop_path: str, timeout: float, stages=None, threads: int = 1, *,
                 deadline: float | None = None, solver_log=None):
    """Load, check and verify; returns ``(word, text, result)`` where ``text`` is the full
    result (``word`` plus the witness for ``sat``). Bad input raises CertorchError; running out
    of time while loading raises :class:`~certorch.errors.DeadlineExceeded`. ``deadline``: an
    absolute ``time.perf_counter()`` value (default: now + ``timeout``)."""
    from certorch.errors import CertorchError, DeadlineExceeded
    from certorch.verify.onnx_io import load_onnx
    from certorch.verify.pipeline import DEFAULT_STAGES, build_stages, check_timeout, verify_box
    from certorch.verify.vnnlib import load_vnnlib

    timeout = check_timeout(timeout)
    deadline = time.perf_counter() + timeout if deadline is None else deadline
    if threads < 1:
        raise CertorchError(f"--threads must be >= 1, got {threads}")
    build_stages(stages or DEFAULT_STAGES)  # bad stage names fail before any work

    def left(what: str) -> float:
        s = deadline - time.perf_counter()
        if s <= 0:
            raise DeadlineExceeded(f"the time limit ran out while {what}")
        return s

    left("starting")
    net = load_onnx(model_path)
    left("loading the network")
    prop = load_vnnlib(prop_path, deadline=deadline)
    prop.check_network(net.num_inputs, net.num_outputs)
    box = prop.input_box(net.input_shape)
    spec = [(r.C, r.d) for r in prop.regions]
    result = verify_box(net.module, box, spec, stages or DEFAULT_STAGES, left("reading the property"),
                        threads=threads, solver_log=solver_log)
    word = RESULT_WORDS.get(result.verdict.value, "unknown")
    text = word
    if word == "sat":
        y = None if result.counterexample is None else confirm_counterexample(net.module, prop, net.input_shape, result.counterexample)
        if y is None:
            word = text = "unknown"
            result.message = (result.message + "; " if result.message else "") + "counterexample not confirmed by a float64 forward pass"
        else:
            text = "sat\n" + format_counterexample(result.counterexample, y)
    return word, text, result


def check_out_path(out: str) -> Path:
    """``--out`` must name a writable file (existing or not) in an existing folder; checked
    before any work so a bad path never costs a whole verification."""
    from certorch.errors import CertorchError

    p = Path(out)
    if p.is_dir():
        raise CertorchError(f"--out is a directory, not a file: {out}")
    if p.exists() and not os.access(p, os.W_OK):
        raise CertorchError(f"--out is not writable: {out}")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise CertorchError(f"--out folder does not exist: {p.parent}")
    if not p.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise CertorchError(f"--out folder is not writable: {p.parent}")
    return p


def is_entry_point() -> bool:
    """True when this process was started as ``certorch ...`` or ``python -m certorch[.cli.main]``
    (not when :func:`certorch.cli.main.main` is called from other Python code)."""
    import certorch

    if not sys.argv or not sys.argv[0]:
        return False
    argv0 = Path(sys.argv[0]).resolve()
    return argv0.name == "certorch" or Path(certorch.__file__).resolve().parent in argv0.parents


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _emit(text: str, out: Path | None) -> None:
    print(text, flush=True)
    if out is not None:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def run(args: argparse.Namespace) -> int:
    from certorch.errors import CertorchError, DeadlineExceeded
    from certorch.verify.pipeline import check_timeout

    entry = is_entry_point()
    start = time.perf_counter() - (process_age() if entry else 0.0)
    timeout = check_timeout(args.timeout)
    out = check_out_path(args.out) if args.out else None
    if args.threads < 1:
        raise CertorchError(f"--threads must be >= 1, got {args.threads}")
    deadline = start + timeout
    box: dict = {}

    def work() -> None:
        try:
            box["answer"] = verify_files(args.model, args.prop, timeout, args.stages, args.threads,
                                         deadline=deadline - RESERVE,
                                         solver_log=sys.stderr if args.verbose else None)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            box["error"] = e

    worker = threading.Thread(target=work, name="certorch-verify", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline + GRACE - time.perf_counter()))
    if worker.is_alive():
        _emit("timeout", out)
        print(f"note: no answer {GRACE:g} s after the {timeout:g} s time limit; stopped waiting", file=sys.stderr)
        return _finish(0, entry)  # the worker may be inside a long native call: do not wait for it
    err = box.get("error")
    if isinstance(err, DeadlineExceeded):
        _emit("timeout", out)
        print(f"note: {err}", file=sys.stderr)
        return _finish(0, entry)
    if err is not None:
        raise err
    word, text, result = box["answer"]
    _emit(text, out)
    if result.message:
        print(f"note: {result.message}", file=sys.stderr)
    print(f"# stage={result.stage} margin_lb={result.margin_lb:.6g} seconds={result.seconds:.3f}", file=sys.stderr)
    return _finish(1 if word == "error" else 0, entry)


def _finish(code: int, entry: bool) -> int:
    """Return ``code``; as the process's entry point, flush and exit at once instead: the
    answer is out, and interpreter teardown with torch and onnx loaded takes 1-2 s."""
    if entry:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
