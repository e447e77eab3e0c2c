"""VNN-LIB 1.0 parser: syntax coverage, VNN-COMP semantics of the unsafe region, errors with lines."""
from __future__ import annotations

import math

import pytest
import torch

from certorch.errors import CertorchError
from certorch.verify.vnnlib import load_vnnlib, parse_vnnlib

HEADER = """; two inputs, two outputs
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
"""
BOX = """(assert (>= X_0 -0.5))
(assert (<= X_0 0.5))
(assert (and (>= X_1 1e-1) (<= X_1 2.5E+0)))
"""


def _parse(tail: str, source: str = "p.vnnlib"):
    return parse_vnnlib(HEADER + BOX + tail, source)


def test_box_and_single_constraint():
    p = _parse("(assert (<= Y_0 Y_1))  ; unsafe: class 1 wins\n")
    assert p.num_inputs == 2 and p.num_outputs == 2
    assert torch.equal(p.lower, torch.tensor([-0.5, 0.1], dtype=torch.float64))
    assert torch.equal(p.upper, torch.tensor([0.5, 2.5], dtype=torch.float64))
    assert len(p.regions) == 1
    assert torch.equal(p.regions[0].C, torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    assert torch.equal(p.regions[0].d, torch.zeros(1, dtype=torch.float64))


def test_scientific_notation_and_negative_numbers():
    p = parse_vnnlib(HEADER + "(assert (>= X_0 -1.5e-3))(assert (<= X_0 .25))(assert (>= X_1 -2))(assert (<= X_1 3.))"
                     "(assert (>= Y_0 -7e2))")
    assert p.lower.tolist() == [-1.5e-3, -2.0] and p.upper.tolist() == [0.25, 3.0]
    assert p.regions[0].C.tolist() == [[-1.0, 0.0]] and p.regions[0].d.tolist() == [-700.0]


def test_tightest_of_repeated_bounds_wins():
    p = _parse("(assert (>= X_0 -0.1))\n(assert (<= X_0 0.9))\n(assert (<= Y_0 1))\n")
    assert p.lower[0] == -0.1 and p.upper[0] == 0.5


def test_disjunction_of_conjunctions_semantics():
    p = _parse("(assert (or (and (<= Y_0 Y_1) (>= Y_0 1)) (<= (+ Y_1 (* -2 Y_0)) 3)))\n")
    assert len(p.regions) == 2
    y = torch.tensor([[1.5, 2.0], [0.5, 2.0], [-5.0, 0.0]], dtype=torch.float64)
    # row 0: region 0 holds (1.5 <= 2, 1.5 >= 1); row 1: region 1 holds (2 - 1 <= 3); row 2: 0 + 10 > 3, -5 < 1
    assert (p.violation(y) <= 0).tolist() == [True, True, False]


def test_top_level_asserts_distribute_over_disjunctions():
    p = _parse("(assert (<= Y_0 10))\n(assert (or (<= Y_1 0) (>= Y_1 5)))\n")
    assert len(p.regions) == 2 and all(r.C.shape == (2, 2) for r in p.regions)
    y = torch.tensor([[0.0, -1.0], [0.0, 2.0], [11.0, 6.0]], dtype=torch.float64)
    assert (p.violation(y) <= 0).tolist() == [True, False, False]


def test_linear_expressions_minus_and_products():
    p = _parse("(assert (>= (- Y_0 (* 0.5 Y_1) 1) (- 2)))\n")
    # Y_0 - 0.5 Y_1 - 1 >= -2  <=>  -Y_0 + 0.5 Y_1 - 1 <= 0
    assert p.regions[0].C.tolist() == [[-1.0, 0.5]] and p.regions[0].d.tolist() == [-1.0]


def test_input_box_shape():
    p = _parse("(assert (<= Y_0 0))\n")
    box = p.input_box((2, 1))
    assert box.lower.shape == (1, 2, 1) and box.lower.dtype == torch.float64


def test_load_from_file(tmp_path):
    f = tmp_path / "prop.vnnlib"
    f.write_text(HEADER + BOX + "(assert (<= Y_1 Y_0))\n")
    p = load_vnnlib(f)
    assert p.source == str(f) and len(p.regions) == 1


def test_check_network_dimension_mismatch():
    p = _parse("(assert (<= Y_0 0))\n")
    with pytest.raises(CertorchError, match="2 inputs but the network takes 3"):
        p.check_network(3, 2)
    with pytest.raises(CertorchError, match="2 outputs but the network has 10"):
        p.check_network(2, 10)


@pytest.mark.parametrize(
    "tail, line, reason",
    [
        ("(assert (<= Y_0 Z_1))\n", 9, "unknown symbol 'Z_1'"),
        ("(assert (<= Y_0 1)\n", 9, "never closed"),
        ("(assert (<= Y_0 1)))\n", 9, "unbalanced"),
        ("(assert (<= Y_0 Y_9))\n", 9, "Y_9 is used but not declared"),
        ("(assert (<= (* Y_0 Y_1) 1))\n", 9, "not linear"),
        ("(assert (<= X_0 Y_1))\n", 9, "mixes inputs X and outputs Y"),
        ("(assert (or (<= X_0 0) (<= Y_0 1)))\n", 9, "inside a disjunction"),
        ("(assert (= Y_0 1))\n", 9, "unsupported operator '='"),
        ("(check-sat)\n", 9, "unsupported command"),
        ("(assert (<= (+ X_0 X_1) 1))\n(assert (<= Y_0 0))\n", 9, "single input"),
        ("\n\n(assert (<= Y_0 1 2))\n", 11, "exactly two arguments"),
        ("(assert (<= 1 2))\n", 9, "no variables"),
    ],
)
def test_errors_name_line_and_reason(tail, line, reason):
    with pytest.raises(CertorchError) as e:
        _parse(tail)
    msg = str(e.value)
    assert msg.startswith(f"p.vnnlib line {line}:") and reason in msg and "\n" not in msg


def test_missing_bound_names_the_declaration_line():
    txt = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (<= Y_0 0))\n"
    with pytest.raises(CertorchError, match=r"line 1: input X_0 has no lower bound"):
        parse_vnnlib(txt, "p.vnnlib")


def test_empty_range_and_bad_declarations():
    with pytest.raises(CertorchError, match="empty range"):
        parse_vnnlib("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (>= X_0 1))(assert (<= X_0 0))"
                     "(assert (<= Y_0 0))")
    with pytest.raises(CertorchError, match="declared twice"):
        parse_vnnlib("(declare-const X_0 Real)(declare-const X_0 Real)")
    with pytest.raises(CertorchError, match="type Real"):
        parse_vnnlib("(declare-const X_0 Int)")
    with pytest.raises(CertorchError, match="X_1 is not declared"):
        parse_vnnlib("(declare-const X_0 Real)(declare-const X_2 Real)(declare-const Y_0 Real)")
    with pytest.raises(CertorchError, match="no constraint on the outputs"):
        parse_vnnlib("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (>= X_0 0))(assert (<= X_0 1))")


def test_missing_file_and_binary_file(tmp_path):
    with pytest.raises(CertorchError, match="not found"):
        load_vnnlib(tmp_path / "nope.vnnlib")
    f = tmp_path / "bin.vnnlib"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CertorchError, match="not a text file"):
        load_vnnlib(f)


def test_violation_follows_output_dtype():
    p = _parse("(assert (or (<= Y_0 -1) (>= Y_1 1)))\n")
    v = p.violation(torch.zeros(4, 2))
    assert v.dtype == torch.float32 and bool(torch.isfinite(v).all()) and math.isclose(float(v[0]), 1.0)
