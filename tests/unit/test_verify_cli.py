"""`certorch verify`: VNN-COMP answers on self-made ONNX + VNN-LIB files, soundness, bad input."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from certorch.attacks import PGD, IntervalAttack
from certorch.cli.main import main
from certorch.cli.verify import RESULT_WORDS, format_counterexample
from certorch.verify.onnx_io import export_onnx, load_onnx
from certorch.verify.vnnlib import load_vnnlib

pytest.importorskip("onnx")
pytest.importorskip("highspy")

ANSWERS: dict[int, set] = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int, sizes=(3, 8, 8, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _box_text(lo, hi) -> str:
    decl = "".join(f"(declare-const X_{i} Real)\n" for i in range(len(lo)))
    return decl + "".join(f"(assert (>= X_{i} {a!r}))\n(assert (<= X_{i} {b!r}))\n" for i, (a, b) in enumerate(zip(lo, hi)))


def _robustness_prop(center, r, label: int, K: int) -> str:
    """Unsafe: some other class scores at least as high as ``label`` somewhere in the box."""
    lo = [max(0.0, c - r) for c in center]
    hi = [min(1.0, c + r) for c in center]
    decl = "".join(f"(declare-const Y_{j} Real)\n" for j in range(K))
    ors = " ".join(f"(>= Y_{j} Y_{label})" for j in range(K) if j != label)
    return _box_text(lo, hi) + decl + f"(assert (or {ors}))\n"


def _files(tmp_path, model: nn.Module, in_shape, prop: str):
    onnx_path, prop_path = tmp_path / "net.onnx", tmp_path / "prop.vnnlib"
    export_onnx(model, onnx_path, in_shape)
    prop_path.write_text(prop)
    return str(onnx_path), str(prop_path)


def _verify(capsys, *args) -> tuple[int, str, str]:
    rc = main(["verify", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _parse_witness(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = re.findall(r"\(([XY])_(\d+) ([^()\s]+)\)", text)
    xs = {int(i): float(v) for k, i, v in pairs if k == "X"}
    ys = {int(i): float(v) for k, i, v in pairs if k == "Y"}
    x = torch.tensor([xs[i] for i in range(len(xs))], dtype=torch.float64)
    y = torch.tensor([ys[i] for i in range(len(ys))], dtype=torch.float64)
    return x, y


def _check_witness(stdout: str, onnx_path: str, prop_path: str) -> None:
    """The witness lies in the box and a float64 forward pass lands in the unsafe region."""
    assert stdout.startswith("sat\n((X_0 ")
    x, y_printed = _parse_witness(stdout)
    prop, net = load_vnnlib(prop_path), load_onnx(onnx_path)
    assert bool(((x >= prop.lower) & (x <= prop.upper)).all())
    m64 = net.module.to(torch.float64)
    with torch.no_grad():
        y = m64(x.reshape(1, *net.input_shape)).reshape(1, -1)
    assert torch.allclose(y[0], y_printed, atol=1e-12)
    assert float(prop.violation(y)[0]) <= 0


def test_known_sat_output_bound_violated_by_clean_point(tmp_path, capsys):
    model = _net(0)
    c = torch.tensor([[0.5, 0.5, 0.5]])
    with torch.no_grad():
        y0 = float(model(c)[0, 0])
    prop = _box_text([0.4] * 3, [0.6] * 3) + "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))
    prop += f"(assert (<= Y_0 {y0 + 1.0!r}))\n"
    onnx_path, prop_path = _files(tmp_path, model, (3,), prop)
    out_file = tmp_path / "result.txt"
    rc, out, _ = _verify(capsys, onnx_path, prop_path, "--timeout", 10, "--out", out_file)
    assert rc == 0
    _check_witness(out, onnx_path, prop_path)
    assert out_file.read_text() == out


def test_known_sat_needs_search(tmp_path, capsys):
    """The clean point is safe but a point elsewhere in the box is not (found by attack or MILP)."""
    model = _net(1)
    lo, hi = [0.2] * 3, [0.8] * 3
    pts = torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    with torch.no_grad():
        best = float(model(pts)[:, 1].max())
        center = float(model(torch.full((1, 3), 0.5))[0, 1])
    thr = (center + best) / 2  # unsafe: Y_1 >= thr; the center has Y_1 < thr, a sampled point exceeds it
    prop = _box_text(lo, hi) + "".join(f"(declare-const Y_{j} Real)\n" for j in range(3)) + f"(assert (>= Y_1 {thr!r}))\n"
    onnx_path, prop_path = _files(tmp_path, model, (3,), prop)
    rc, out, _ = _verify(capsys, onnx_path, prop_path, "--timeout", 20)
    assert rc == 0
    _check_witness(out, onnx_path, prop_path)


def test_known_unsat_far_above_ibp_bound(tmp_path, capsys):
    import certorch as ct
    from certorch.domains.box import Box

    model = _net(2)
    lo, hi = torch.full((1, 3), 0.3), torch.full((1, 3), 0.7)
    with torch.no_grad():
        ub = float(ct.bound(model, lo, method="ibp", box=Box(lo, hi)).upper[0, 2])
    prop = _box_text([0.3] * 3, [0.7] * 3) + "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))
    prop += f"(assert (>= Y_2 {ub + 10.0!r}))\n"
    onnx_path, prop_path = _files(tmp_path, model, (3,), prop)
    rc, out, _ = _verify(capsys, onnx_path, prop_path, "--timeout", 10)
    assert (rc, out) == (0, "unsat\n")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_answers_are_sound_against_attacks(tmp_path, capsys, seed):
    """Robustness properties at several radii: every unsat survives PGD, the interval attack and
    random/corner sampling; every sat witness is confirmed in float64."""
    model = _net(10 + seed, sizes=(4, 10, 10, 3))
    g = torch.Generator().manual_seed(seed)
    center = (0.3 + 0.4 * torch.rand(1, 4, generator=g)).double()
    label = int(model(center.float()).argmax())
    answers = set()
    for r in (0.02, 0.25, 0.4, 0.5):  # decided by ibp, crown, lp, milp and pgd across the seeds
        d = tmp_path / f"r{r}"
        d.mkdir()
        onnx_path, prop_path = _files(d, model, (4,), _robustness_prop(center[0].tolist(), r, label, 3))
        rc, out, err = _verify(capsys, onnx_path, prop_path, "--timeout", 20)
        assert rc == 0, err
        word = out.split("\n")[0]
        answers.add(word)
        if word == "sat":
            _check_witness(out, onnx_path, prop_path)
        elif word == "unsat":
            prop = load_vnnlib(prop_path)
            box_lo, box_hi = prop.lower.float().unsqueeze(0), prop.upper.float().unsqueeze(0)
            x0, y = ((box_lo + box_hi) / 2), torch.tensor([label])
            for atk in (PGD(steps=40, restarts=4, loss="margin", seed=0), IntervalAttack(steps=5, pgd_steps=20)):
                res = atk(model, x0, y, r, box_lo, box_hi)
                assert not bool(res.success), f"{type(atk).__name__} contradicts unsat at r={r}"
            pts = box_lo + (box_hi - box_lo) * torch.rand(3000, 4, generator=g)
            corners = box_lo + (box_hi - box_lo) * torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * 4)
            with torch.no_grad():
                assert bool((model(torch.cat([pts, corners])).argmax(1) == label).all())
        else:
            assert word in ("unknown", "timeout")
    assert answers <= {"sat", "unsat", "unknown", "timeout"}
    ANSWERS[seed] = answers


def test_timeout_must_be_positive(tmp_path, capsys):
    onnx_path, prop_path = _files(tmp_path, _net(0), (3,), _robustness_prop([0.5] * 3, 0.1, 0, 3))
    for t in ("0", "-1"):
        rc, out, err = _verify(capsys, onnx_path, prop_path, "--timeout", t)
        assert rc == 2 and out == "" and err.startswith("error: timeout must be > 0")


def test_malformed_onnx_exit_2(tmp_path, capsys):
    _, prop_path = _files(tmp_path, _net(0), (3,), _robustness_prop([0.5] * 3, 0.1, 0, 3))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    rc, out, err = _verify(capsys, bad, prop_path, "--timeout", 5)
    assert rc == 2 and "malformed ONNX" in err and err.count("\n") == 1


def test_malformed_vnnlib_names_line(tmp_path, capsys):
    prop = _robustness_prop([0.5] * 3, 0.1, 0, 3) + "(assert (<= Y_0 foo))\n"
    onnx_path, prop_path = _files(tmp_path, _net(0), (3,), prop)
    rc, out, err = _verify(capsys, onnx_path, prop_path, "--timeout", 5)
    line = prop.count("\n")
    assert rc == 2 and f"line {line}: unknown symbol 'foo'" in err


def test_dimension_mismatch_exit_2(tmp_path, capsys):
    onnx_path, prop_path = _files(tmp_path, _net(0), (3,), _robustness_prop([0.5] * 4, 0.1, 0, 3))
    rc, _, err = _verify(capsys, onnx_path, prop_path, "--timeout", 5)
    assert rc == 2 and "4 inputs but the network takes 3" in err


def test_unsupported_onnx_op_exit_2(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 3))
    onnx_path, prop_path = _files(tmp_path, model, (3,), _robustness_prop([0.5] * 3, 0.1, 0, 3))
    rc, _, err = _verify(capsys, onnx_path, prop_path, "--timeout", 5)
    assert rc == 2 and "unsupported ONNX ops: Softplus" in err


def test_sigmoid_network_gets_an_answer_not_an_error(tmp_path, capsys):
    """Sigmoid networks are verified (CROWN bounds them), not refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3))
    with torch.no_grad():
        label = int(model(torch.full((1, 3), 0.5)).argmax())
    onnx_path, prop_path = _files(tmp_path, model, (3,), _robustness_prop([0.5] * 3, 0.01, label, 3))
    rc, out, _ = _verify(capsys, onnx_path, prop_path, "--timeout", 10)
    assert rc == 0 and out.strip() == "unsat"  # a small ball around a correctly classified point: CROWN proves it


def test_image_shaped_network_with_normalization(tmp_path, capsys):
    """A conv net with Sub/Div normalization: X_i index the flattened (C, H, W) input."""
    torch.manual_seed(5)
    from certorch.nn.normalize import Normalize

    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    x = torch.rand(1, 1, 4, 4)
    label = int(model(x).argmax())
    onnx_path, prop_path = _files(tmp_path, model, (1, 4, 4), _robustness_prop(x.flatten().tolist(), 0.001, label, 2))
    rc, out, _ = _verify(capsys, onnx_path, prop_path, "--timeout", 10)
    assert (rc, out) == (0, "unsat\n")


def test_format_and_words():
    text = format_counterexample(torch.tensor([0.5, 1e-20], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64))
    assert text == "((X_0 0.5)\n (X_1 1e-20)\n (Y_0 -2.0))"
    assert set(RESULT_WORDS.values()) == {"sat", "unsat", "timeout", "unknown", "error"}


def test_soundness_cases_cover_sat_and_unsat():
    """The radii above give both answers (runs after the parametrized cases, same module)."""
    if len(ANSWERS) < 4:
        pytest.skip("run together with test_answers_are_sound_against_attacks")
    seen = set().union(*ANSWERS.values())
    assert {"sat", "unsat"} <= seen


def test_undecided_stages_give_unknown(tmp_path, capsys):
    """Only IBP on a property it cannot prove and no attack: `unknown`, exit 0."""
    model = _net(1)
    pts = torch.rand(2000, 3, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    with torch.no_grad():
        best = float(model(pts)[:, 1].max())
    prop = _box_text([0.2] * 3, [0.8] * 3) + "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))
    prop += f"(assert (>= Y_1 {best + 1e-3!r}))\n"  # probably unsat, but too close for IBP
    onnx_path, prop_path = _files(tmp_path, model, (3,), prop)
    rc, out, _ = _verify(capsys, onnx_path, prop_path, "--timeout", 5, "--stages", "ibp")
    assert (rc, out) == (0, "unknown\n")
