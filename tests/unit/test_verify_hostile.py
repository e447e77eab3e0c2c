"""Hostile input to `certorch verify` and the VNN-LIB parser: one-line errors with exit 2, outputs
checked before any work, clean stdout (no solver banner), random mutations of valid files."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from certorch.cli.main import main
from certorch.errors import CertorchError
from certorch.verify.onnx_io import export_onnx
from certorch.verify.vnnlib import MAX_DEPTH, parse_vnnlib

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]

VALID = """; a robustness property
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (>= X_0 -0.5))
(assert (<= X_0 0.5e0))
(assert (and (>= X_1 0.1) (<= X_1 2.5)))
(assert (or (and (>= Y_1 Y_0) (<= (- Y_2 (* 2 Y_0)) 1e-3)) (>= (+ Y_2 -1.5) Y_0)))
"""


def _files(tmp_path, prop: str):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    onnx_path, prop_path = tmp_path / "net.onnx", tmp_path / "prop.vnnlib"
    export_onnx(model, onnx_path, (3,))
    prop_path.write_text(prop)
    return model, str(onnx_path), str(prop_path)


def _box_prop(extra: str) -> str:
    head = "".join(f"(declare-const X_{i} Real)\n(assert (>= X_{i} 0.2))\n(assert (<= X_{i} 0.8))\n" for i in range(3))
    return head + "".join(f"(declare-const Y_{j} Real)\n" for j in range(3)) + extra


def _verify(capsys, *args):
    rc = main(["verify", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_deeply_nested_property_is_a_one_line_error(tmp_path, capsys):
    """(Before: a RecursionError traceback with exit 1.)"""
    deep = "(assert " + "(and " * 10_000 + "(<= Y_0 1)" + ")" * 10_000 + ")\n"
    _, onnx_path, prop_path = _files(tmp_path, _box_prop(deep))
    rc, out, err = _verify(capsys, onnx_path, prop_path, "--timeout", 10)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and f"nested more than {MAX_DEPTH} levels" in err


def test_nesting_up_to_the_limit_still_parses():
    d = MAX_DEPTH - 2
    text = VALID + "(assert " + "(and " * d + "(<= Y_0 1)" + ")" * d + ")\n"
    text += "(assert (<= Y_1 " + "(+ 1 " * d + "1" + ")" * d + "))\n"
    assert len(parse_vnnlib(text).regions) == 2


@pytest.mark.parametrize("kind", ["directory", "missing folder"])
def test_bad_out_path_fails_before_verifying(tmp_path, capsys, monkeypatch, kind):
    """(Before: `--out DIR` ran the whole verification, then failed on writing.)"""
    import certorch.verify.pipeline as pipeline

    def must_not_run(*a, **k):
        raise AssertionError("verification ran although --out is unusable")

    monkeypatch.setattr(pipeline, "verify_box", must_not_run)
    _, onnx_path, prop_path = _files(tmp_path, _box_prop("(assert (>= Y_0 100.0))\n"))
    out = tmp_path if kind == "directory" else tmp_path / "nope" / "r.txt"
    rc, stdout, err = _verify(capsys, onnx_path, prop_path, "--timeout", 10, "--out", out)
    assert rc == 2 and stdout == "" and err.startswith("error: --out") and err.count("\n") == 1


def _search_prop(model) -> str:
    """Unsafe: Y_1 >= a threshold some point of the box reaches but the box center does not."""
    pts = torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    with torch.no_grad():
        best = float(model(pts)[:, 1].max())
        center = float(model(torch.full((1, 3), 0.5))[0, 1])
    return _box_prop(f"(assert (>= Y_1 {(center + best) / 2!r}))\n")


WITNESS = re.compile(r"sat\n\(\(X_0 [^\n()]+\)(\n \([XY]_\d+ [^\n()]+\))*\)\n")


def _run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "certorch.cli.main", "verify", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_stdout_is_only_the_result_when_the_milp_runs(tmp_path):
    """A fresh process whose answer comes from the MILP stage (HiGHS built and run): stdout is
    exactly the VNN-COMP result; with --verbose the solver log goes to stderr. (Before: HiGHS's
    banner "Running HiGHS ..." came first on stdout.)"""
    model, onnx_path, _ = _files(tmp_path, "")
    prop = Path(tmp_path / "search.vnnlib")
    prop.write_text(_search_prop(model))
    quiet = _run_cli(onnx_path, prop, "--timeout", 60, "--stages", "milp")
    assert quiet.returncode == 0, quiet.stderr
    assert WITNESS.fullmatch(quiet.stdout), quiet.stdout[:300]
    assert "HiGHS" not in quiet.stderr and "stage=milp" in quiet.stderr
    loud = _run_cli(onnx_path, prop, "--timeout", 60, "--stages", "milp", "--verbose")
    assert loud.returncode == 0 and loud.stdout == quiet.stdout
    assert "Running HiGHS" in loud.stderr


# --- random mutations of a valid file: only one-line CertorchErrors may come out ---------------------

def _mutate(data: bytes, ops: list) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        if not b:
            b = bytearray(b"(")
        i = pos % len(b)
        if op == "flip":
            b[i] ^= 1 << (arg % 8)
        elif op == "byte":
            b[i] = arg % 256
        elif op == "truncate":
            del b[i:]
        elif op == "duplicate":
            j = min(len(b), i + 1 + arg % 200)
            b[j:j] = b[i:j]
        elif op == "delete":
            del b[i:i + 1 + arg % 20]
        elif op == "nest":
            n = 1 + arg * 37 % 5000  # a deep formula as an extra argument of an and/or (if one is left)
            at = max(b.find(b"(or ", i), b.find(b"(and ", i))
            at = at + 4 if at >= 0 else i
            b[at:at] = b"(or " * n + b"(<= Y_0 1)" + b")" * (n if arg % 3 else n // 2)
        elif op == "token":
            tok = [b"(", b")", b"X_0", b"Y_7", b"1e999", b"-", b"*", b"or", b"and", b"X_99999999999", b"\x00",
                   b"\xff", b"assert", b";", b"0.", b".5e-3", b"1" * 5000][arg % 17]
            b[i:i] = tok
    return bytes(b)


_OPS = st.lists(st.tuples(st.sampled_from(["flip", "byte", "truncate", "duplicate", "delete", "nest", "token"]),
                          st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(ops=_OPS)
def test_mutated_vnnlib_gives_only_one_line_errors(tmp_path_factory, ops):
    from certorch.verify.vnnlib import load_vnnlib

    path = tmp_path_factory.mktemp("fuzz") / "p.vnnlib"
    path.write_bytes(_mutate(VALID.encode(), ops))
    try:
        prop = load_vnnlib(path)
    except CertorchError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        return
    assert prop.lower.shape == prop.upper.shape and bool((prop.lower <= prop.upper).all())
    assert all(torch.isfinite(r.C).all() and torch.isfinite(r.d).all() for r in prop.regions)
