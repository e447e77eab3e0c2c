"""Verify a VNN-LIB property of an ONNX network (VNN-COMP style).

  certorch verify net.onnx prop.vnnlib --timeout 60 --out result.txt

Prints (and writes to ``--out``) one of ``sat`` (followed by the counterexample in the VNN-COMP
format ``((X_0 v) (X_1 v) ... (Y_0 v) ...)``, one pair per line), ``unsat``, ``timeout`` or
``unknown``; exit code 0 in all these cases. A verifier crash prints ``error`` (details on
stderr) and exits with 1. Bad input (malformed ONNX or VNN-LIB, a property whose sizes do not
match the network, timeout <= 0) prints ``error: ...`` and exits with 2.

Every ``sat`` counterexample is re-checked with a plain float64 forward pass of the network
inside the input box before it is reported; an unconfirmed one is reported as ``unknown``.
"""
from __future__ import annotations

import argparse
import sys

NAME = "verify"
HELP = "verify a VNN-LIB property of an ONNX network: sat / unsat / timeout / unknown"

#: verdict -> VNN-COMP result word
RESULT_WORDS = {"falsified": "sat", "verified": "unsat", "timeout": "timeout", "unknown": "unknown", "error": "error"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="network in ONNX format (.onnx)")
    p.add_argument("prop", metavar="PROP", help="property in VNN-LIB 1.0 format (.vnnlib)")
    p.add_argument("--timeout", type=float, required=True, help="time limit in seconds (> 0)")
    p.add_argument("--out", default=None, metavar="RESULT", help="also write the result to this file")
    p.add_argument("--stages", default=None,
                   help="comma-separated verification stages (default: the pipeline's: pgd,ibp,crown,lp,milp)")
    p.add_argument("--threads", type=int, default=1, help="solver threads (default 1)")


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


def verify_files(model_path: str, prop_path: str, timeout: float, stages=None, threads: int = 1):
    """Load, check and verify; returns ``(word, text, result)`` where ``text`` is the full
    result (``word`` plus the witness for ``sat``). Bad input raises CertorchError."""
    from certorch.verify.onnx_io import load_onnx
    from certorch.verify.pipeline import DEFAULT_STAGES, check_timeout, verify_box
    from certorch.verify.vnnlib import load_vnnlib

    timeout = check_timeout(timeout)
    if threads < 1:
        from certorch.errors import CertorchError

        raise CertorchError(f"--threads must be >= 1, got {threads}")
    net = load_onnx(model_path)
    prop = load_vnnlib(prop_path)
    prop.check_network(net.num_inputs, net.num_outputs)
    box = prop.input_box(net.input_shape)
    spec = [(r.C, r.d) for r in prop.regions]
    result = verify_box(net.module, box, spec, stages or DEFAULT_STAGES, timeout, threads=threads)
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


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from certorch.errors import CertorchError

    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise CertorchError(f"--out folder does not exist: {Path(args.out).parent}")
    word, text, result = verify_files(args.model, args.prop, args.timeout, args.stages, args.threads)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if result.message:
        print(f"note: {result.message}", file=sys.stderr)
    print(f"# stage={result.stage} margin_lb={result.margin_lb:.6g} seconds={result.seconds:.3f}", file=sys.stderr)
    return 1 if word == "error" else 0
