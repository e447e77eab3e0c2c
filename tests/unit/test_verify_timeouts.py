"""Time limits: every stage, the bound engine, parsing and the `certorch verify` command answer
within their timeout (a late answer or a late crash is a TIMEOUT)."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import certorch as ct
from certorch.cli.main import main
from certorch.errors import DeadlineExceeded
from certorch.verify import Verdict, VerificationResult, run_stages
from certorch.verify.onnx_io import export_onnx
from certorch.verify.stages import BoundStage, Problem, Stage, StageOutput
from certorch.verify.vnnlib import load_vnnlib

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(n: int = 1) -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    x = torch.rand(n, 3, dtype=torch.float64)
    y = model(x).argmax(1)
    C = ct.margin_matrix(y, 3).double()
    return Problem(model, ct.linf_ball(x, 0.01), C, torch.zeros(C.shape[:2], dtype=torch.float64), ((0,), (1,)),
                   x=x, y=y, eps=0.01)


class _Late(Stage):
    """Uses its whole budget (and a bit), then crashes or claims a proof."""

    name = "late"

    def __init__(self, crash: bool):
        self.crash = crash

    def run(self, problem, idx, budget):
        time.sleep(float(budget.min()) + 0.05)
        if self.crash:
            raise MemoryError("out of memory")
        n = idx.numel()
        return StageOutput([Verdict.VERIFIED] * n, lower=torch.ones(n, dtype=torch.float64))


def test_crash_after_the_time_ran_out_is_timeout_not_error():
    """(Before: an out-of-memory error raised after the stage's time was used was an ERROR.)"""
    r = run_stages(_problem(), [_Late(crash=True)], timeout=0.2)[0]
    assert r.verdict == Verdict.TIMEOUT and r.stage == "late" and "MemoryError" in r.message


def test_verdict_after_the_time_ran_out_is_not_kept():
    """(Before: a stage finishing after the limit still decided the example.)"""
    r = run_stages(_problem(), [_Late(crash=False)], timeout=0.2)[0]
    assert r.verdict == Verdict.TIMEOUT and "after the time limit" in r.message


def test_bound_stage_passes_its_deadline_to_the_bound_engine(monkeypatch):
    """CROWN gets the stage's deadline; DeadlineExceeded from the engine is a TIMEOUT."""
    import certorch.bounds.api as api

    seen = {}
    real = api.bound

    def spy(*args, **kw):
        seen["deadline"] = kw.get("deadline")
        return real(*args, **kw)

    monkeypatch.setattr(api, "bound", spy)
    t0 = time.perf_counter()
    r = run_stages(_problem(), [BoundStage("crown")], timeout=30)[0]
    assert r.verdict == Verdict.VERIFIED
    assert seen["deadline"] is not None and t0 < seen["deadline"] <= t0 + 30.5

    def expired(*args, **kw):
        raise DeadlineExceeded("past the deadline between layers")

    monkeypatch.setattr(api, "bound", expired)
    r = run_stages(_problem(), [BoundStage("crown")], timeout=30)[0]
    assert r.verdict == Verdict.TIMEOUT and "DeadlineExceeded" in r.message


def test_batched_stage_deadline_is_shared_budget():
    from certorch.verify.stages import batch_deadline

    t0 = time.perf_counter()
    d = batch_deadline(np.array([2.0, 3.0, 5.0]))
    assert t0 + 6.0 <= d <= time.perf_counter() + 6.0


# --- the command line -------------------------------------------------------------------------------

def _net_and_header(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    onnx_path = tmp_path / "net.onnx"
    export_onnx(model, onnx_path, (3,))
    head = "".join(f"(declare-const X_{i} Real)\n(assert (>= X_{i} 0.4))\n(assert (<= X_{i} 0.6))\n" for i in range(3))
    head += "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))
    return onnx_path, head


def _timed_main(capsys, *args):
    t0 = time.perf_counter()
    rc = main(["verify", *map(str, args)])
    dt = time.perf_counter() - t0
    out = capsys.readouterr()
    return rc, out.out, out.err, dt


def test_parsing_counts_against_the_timeout(tmp_path, capsys):
    """A large property (7 MB, ~10 s to parse here) with --timeout 1 answers `timeout` within
    1 s + 1 s. (Before: the whole file was parsed first, then verified.)"""
    onnx_path, head = _net_and_header(tmp_path)
    prop = tmp_path / "big.vnnlib"
    prop.write_text(head + "(assert (<= (+ Y_0 0.5 0.25) 1.0))\n" * 200_000)
    rc, out, err, dt = _timed_main(capsys, onnx_path, prop, "--timeout", 1)
    assert (rc, out) == (0, "timeout\n") and dt < 2.0, (dt, err)
    assert "pars" in err


def test_watchdog_answers_when_the_work_does_not_stop(tmp_path, capsys, monkeypatch):
    """Whatever the verifier does (here: a stage stuck for 4 s), the command prints `timeout`
    by the deadline plus its grace time."""
    import certorch.verify.pipeline as pipeline

    def stuck(*args, **kw):
        time.sleep(4.0)
        return VerificationResult(Verdict.VERIFIED, "stuck", 1.0, 4.0)

    monkeypatch.setattr(pipeline, "verify_box", stuck)
    onnx_path, head = _net_and_header(tmp_path)
    prop = tmp_path / "p.vnnlib"
    prop.write_text(head + "(assert (>= Y_0 1000.0))\n")
    out_file = tmp_path / "result.txt"
    rc, out, err, dt = _timed_main(capsys, onnx_path, prop, "--timeout", 1, "--out", out_file)
    assert (rc, out) == (0, "timeout\n") and dt < 2.0, (dt, err)
    assert out_file.read_text() == "timeout\n"


def test_size_limit_is_checked_before_reading(tmp_path):
    p = tmp_path / "p.vnnlib"
    p.write_text("(declare-const X_0 Real)\n" * 100)
    with pytest.raises(ct.CertorchError, match="more than the limit"):
        load_vnnlib(p, max_bytes=1000)


def test_parser_deadline():
    from certorch.verify.vnnlib import parse_vnnlib

    text = "(declare-const X_0 Real)(declare-const Y_0 Real)(assert (>= X_0 0))(assert (<= X_0 1))"
    text += "(assert (<= Y_0 1.0))" * 5000
    with pytest.raises(DeadlineExceeded, match="time limit"):
        parse_vnnlib(text, deadline=time.perf_counter() - 1.0)
    assert len(parse_vnnlib(text, deadline=math.inf).regions) == 1
