"""Issue 12 diagnostics: the continuity metric flags steps and not smooth functions or kinks; the
line scan restores the weights; the command writes its table, JSON and plot."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from certorch.cli.main import main
from certorch.train.diagnose import diagnose, find_jumps, line_scan, random_direction

T = torch.linspace(-1, 1, 401, dtype=torch.float64)


def test_continuity_flags_an_artificial_step():
    values = torch.sin(3 * T) + 0.3 * (T > 0.2).double()
    jumps = find_jumps(values)
    assert jumps.numel() == 1 and 0.25 < float(jumps[0]) <= 0.3


def test_continuity_does_not_flag_smooth_functions_or_kinks():
    for values in (torch.sin(3 * T), torch.exp(4 * T), T.abs(), torch.relu(T - 0.1) * 5 + T ** 2):
        assert find_jumps(values).numel() == 0


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10)).double().eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)


def test_line_scan_restores_the_weights_and_its_center_is_the_unmoved_loss():
    model, (x, y) = _net(), _batch()
    before = [p.detach().clone() for p in model.parameters()]
    d = random_direction(model, torch.Generator().manual_seed(0))
    scan = line_scan(model, x, y, 0.05, "crown", d, radius=0.1, points=5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    from certorch.train.diagnose import robust_loss

    assert math.isclose(float(scan.loss[2]), float(robust_loss(model, x, y, 0.05, "crown").detach()), rel_tol=1e-12)
    assert (scan.grad_norm > 0).all()


def test_ibp_robust_loss_is_continuous_along_a_line():
    model, (x, y) = _net(), _batch()
    rows, _ = diagnose(model, x, y, 0.05, ["ibp"], radius=0.2, points=101)
    assert rows[0]["jumps"] == 0


def test_tighter_bounds_are_narrower_and_unstable_counts_are_reported():
    model, (x, y) = _net(), _batch()
    rows, _ = diagnose(model, x, y, 0.05, ["ibp", "crown"], radius=0.05, points=5)
    ibp, crown = rows
    assert crown["width"] <= ibp["width"] + 1e-12
    assert 0 <= crown["unstable"] <= ibp["unstable"] <= 12


def test_diagnose_command_writes_table_json_and_plot(tmp_path, capsys):
    rc = main(["diagnose", "digits_mlp", "--weights", str(_weights(tmp_path)), "--data", "digits", "--eps", "0.05",
               "--relaxations", "ibp,crown", "--n", "8", "--points", "7", "--out", str(tmp_path / "d")])
    assert rc == 0
    rows = json.loads((tmp_path / "d" / "diagnose.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ibp", "crown"]
    assert (tmp_path / "d" / "diagnose.png").stat().st_size > 0
    assert "| ibp |" in (tmp_path / "d" / "diagnose.md").read_text()


def _weights(tmp_path):
    from safetensors.torch import save_file

    from certorch.models import build

    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file(build("digits_mlp", dataset="digits").state_dict(), str(path))
    return path


@pytest.mark.parametrize("argv,match", [
    (["--eps", "-1"], "eps"),
    (["--eps", "0.1", "--relaxations", "nope"], "nope"),
    (["--eps", "0.1", "--radius", "0"], "radius"),
])
def test_bad_diagnose_input_is_one_line_exit_2(tmp_path, capsys, argv, match):
    rc = main(["diagnose", "digits_mlp", "--weights", str(_weights(tmp_path)), "--data", "digits", "--points", "5",
               "--n", "4", "--out", str(tmp_path / "d"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err


def test_crowns_adaptive_slopes_make_its_loss_jump_where_ibp_and_deepz_are_continuous():
    # The paper's continuity finding in miniature: CROWN picks each unstable neuron's lower
    # slope by u > -l, so the loss jumps when a neuron switches; IBP and DeepZ do not.
    model, (x, y) = _net(), _batch()
    rows, _ = diagnose(model, x, y, 0.1, ["ibp", "zonotope", "crown"], radius=0.5, points=401)
    jumps = {r["method"]: r["jumps"] for r in rows}
    assert jumps["ibp"] == 0 and jumps["zonotope"] == 0 and jumps["crown"] > 0
