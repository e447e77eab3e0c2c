"""Unit tests of the LP/MILP encoding and the HiGHS solve (certorch.verify.encode / milp / lp)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import certorch as ct
from certorch.domains.box import Box
from certorch.graph.capture import capture
from certorch.verify.encode import encode, select_binaries
from certorch.verify.milp import MilpStage
from certorch.verify.solve import minimize_region

torch.set_num_threads(1)


def _node_bounds(model, box):
    with torch.no_grad():
        r = ct.bound(model, box.center, method="crown", box=box, dtype=torch.float64, return_intermediate=True,
                     C=torch.eye(int(np.prod(capture(model, tuple(box.lower.shape[1:])).output_shape)),
                                 dtype=torch.float64))
    graph = capture(model, tuple(box.lower.shape[1:]))
    names = {n.name: n.index for n in graph.nodes}
    return graph, {names[k]: (b.lower[0].flatten().numpy(), b.upper[0].flatten().numpy())
                   for k, b in r.intermediate.items()}


def _solve(model, box, c, binaries="all", integer=True):
    graph, nb = _node_bounds(model, box)
    enc = encode(graph, box.lower.flatten().numpy(), box.upper.flatten().numpy(), nb, binaries)
    return enc, minimize_region(enc, enc.var_of[graph.output], np.asarray(c, float)[None], np.zeros(1),
                                integer=integer, early_stop=False)


def test_hand_computed_min_of_relu_difference():
    """f(x) = relu(x) - relu(x - 0.5) on [-1, 1]: min -f = -0.5 (exact), LP is looser."""
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [1.0]]))
        lin.bias.copy_(torch.tensor([0.0, -0.5]))
    out = nn.Linear(2, 1)
    with torch.no_grad():
        out.weight.copy_(torch.tensor([[1.0, -1.0]]))
        out.bias.zero_()
    model = nn.Sequential(lin, nn.ReLU(), out).double()
    box = Box(torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64))
    _, milp = _solve(model, box, [-1.0])
    assert milp.value == pytest.approx(-0.5, abs=1e-7)
    _, lp = _solve(model, box, [-1.0], binaries=None, integer=False)
    assert lp.lower < -0.5 - 1e-3


def test_point_box_reproduces_forward_pass_of_conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    x = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    box = Box(x, x)
    for k in range(3):
        c = np.eye(3)[k]
        _, res = _solve(model, box, c)
        with torch.no_grad():
            assert res.value == pytest.approx(float(model(x)[0, k]), abs=1e-7)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.out(torch.relu(self.b(h)) + h)


def test_residual_dag_milp_is_below_samples_and_attained():
    torch.manual_seed(1)
    model = _Residual().double()
    x = torch.rand(1, 3, dtype=torch.float64)
    box = ct.linf_ball(x, 0.3)
    _, res = _solve(model, box, [1.0, -1.0])
    xs = box.lower + (box.upper - box.lower) * torch.rand(20000, 3, dtype=torch.float64)
    with torch.no_grad():
        sampled = (model(xs) @ torch.tensor([1.0, -1.0], dtype=torch.float64)).min()
        at_point = model(torch.from_numpy(res.point)[None]) @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert res.value <= float(sampled) + 1e-9
    assert float(at_point) == pytest.approx(res.value, abs=1e-6)


def test_stable_neurons_get_no_binaries_and_all_unstable_do():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    box = ct.linf_ball(torch.rand(1, 3, dtype=torch.float64), 0.2)
    enc, _ = _solve(model, box, [1.0, -1.0])
    assert enc.integer.size == enc.num_unstable
    graph, nb = _node_bounds(model, box)
    l, u = nb[1]
    assert enc.num_unstable == int(((l < 0) & (u > 0)).sum())


def test_select_binaries_keeps_the_largest_triangles():
    l = np.array([-1.0, -0.1, -2.0, 0.5, -1.0])
    u = np.array([1.0, 0.1, 2.0, 1.0, -0.5])
    unstable = (l < 0) & (u > 0)
    mask = select_binaries(l, u, unstable, 1)
    assert mask.tolist() == [False, False, True, False, False]
    assert select_binaries(l, u, unstable, None).sum() == 0
    assert (select_binaries(l, u, unstable, "all") == unstable).all()


def test_early_stop_reports_negative_with_point_inside_box():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    box = ct.linf_ball(torch.rand(1, 2, dtype=torch.float64), 0.5)
    graph, nb = _node_bounds(model, box)
    enc = encode(graph, box.lower.flatten().numpy(), box.upper.flatten().numpy(), nb, "all")
    c = np.array([1.0, -1.0])
    exact = minimize_region(enc, enc.var_of[graph.output], c[None], np.zeros(1), early_stop=False).value
    shift = -exact + 0.5  # property value c.f + shift has min 0.5 > 0: proven positive
    pos = minimize_region(enc, enc.var_of[graph.output], c[None], np.array([shift]))
    assert pos.outcome == "positive" and pos.lower > 0
    neg = minimize_region(enc, enc.var_of[graph.output], c[None], np.array([-exact - 0.5]))
    assert neg.outcome == "negative" and neg.value < 0
    assert bool(box.contains(torch.from_numpy(neg.point)[None], tol=1e-9).all())


def test_zero_time_limit_is_a_timeout():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    box = ct.linf_ball(torch.rand(1, 2, dtype=torch.float64), 0.5)
    graph, nb = _node_bounds(model, box)
    enc = encode(graph, box.lower.flatten().numpy(), box.upper.flatten().numpy(), nb, "all")
    out = minimize_region(enc, enc.var_of[graph.output], np.array([[1.0, -1.0]]), np.zeros(1), time_limit=0)
    assert out.outcome == "timeout"


def test_unsupported_activation_is_named():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    box = ct.linf_ball(torch.rand(1, 2, dtype=torch.float64), 0.1)
    graph = capture(model, (2,))
    with pytest.raises(ct.CertorchError, match="tanh"):
        encode(graph, box.lower.flatten().numpy(), box.upper.flatten().numpy(), {1: (np.zeros(3), np.ones(3))})


def test_bad_binaries_argument():
    with pytest.raises(ct.CertorchError, match="binaries"):
        MilpStage(-3)
