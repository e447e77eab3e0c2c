"""MILP soundness and completeness: on tiny ReLU nets the MILP optimum of a margin equals the
minimum over all activation patterns (each pattern an LP in the input, scipy's linprog), and the
triangle LP bound lies between the CROWN bound and that optimum."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from torch import nn

import certorch as ct
from certorch.domains.box import Box
from certorch.graph.capture import capture
from certorch.verify import Verdict, verify_box
from certorch.verify.encode import encode
from certorch.verify.solve import minimize_region


def make_net(seed: int, widths: list[int], n_in: int, n_out: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers, d = [], n_in
    for w in widths:
        lin = nn.Linear(d, w)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(w, d, generator=g))
            lin.bias.copy_(torch.randn(w, generator=g) * 0.5)
        layers += [lin, nn.ReLU()]
        d = w
    last = nn.Linear(d, n_out)
    with torch.no_grad():
        last.weight.copy_(torch.randn(n_out, d, generator=g))
        last.bias.copy_(torch.randn(n_out, generator=g) * 0.5)
    return nn.Sequential(*layers, last).double()


def brute_force_min(net: nn.Sequential, lo: np.ndarray, hi: np.ndarray, c: np.ndarray) -> float:
    """min over x in [lo, hi] of c . net(x), by enumerating activation patterns of all hidden units."""
    lins = [m for m in net if isinstance(m, nn.Linear)]
    Ws = [m.weight.detach().numpy() for m in lins]
    bs = [m.bias.detach().numpy() for m in lins]
    widths = [W.shape[0] for W in Ws[:-1]]
    best = math.inf
    for pattern in itertools.product([0, 1], repeat=sum(widths)):
        A, a0 = np.eye(lo.size), np.zeros(lo.size)  # current layer value = A x + a0
        rows, rhs, pos = [], [], 0
        for W, b, w in zip(Ws[:-1], bs[:-1], widths):
            Z, z0 = W @ A, W @ a0 + b
            p = np.array(pattern[pos: pos + w], dtype=float)
            pos += w
            sign = 2 * p - 1  # active: z >= 0  <=> -z <= 0 ; inactive: z <= 0
            rows.append(-sign[:, None] * Z)
            rhs.append(sign * z0)
            A, a0 = p[:, None] * Z, p * z0
        obj = c @ (Ws[-1] @ A)
        const = float(c @ (Ws[-1] @ a0 + bs[-1]))
        res = linprog(obj, A_ub=np.vstack(rows), b_ub=np.concatenate(rhs), bounds=list(zip(lo, hi)), method="highs")
        if res.status == 0:
            best = min(best, res.fun + const)
    return best


def milp_and_lp(net, lo, hi, c):
    x = torch.from_numpy((lo + hi) / 2).unsqueeze(0)
    box = Box(torch.from_numpy(lo).unsqueeze(0), torch.from_numpy(hi).unsqueeze(0))
    C = torch.from_numpy(c).unsqueeze(0)
    with torch.no_grad():
        r = ct.bound(net, x, method="crown", C=C, box=box, dtype=torch.float64, return_intermediate=True)
    graph = capture(net, (lo.size,))
    names = {n.name: n.index for n in graph.nodes}
    nb = {names[k]: (b.lower[0].flatten().numpy(), b.upper[0].flatten().numpy()) for k, b in r.intermediate.items()}
    out = {}
    for key, binaries in (("lp", None), ("milp", "all")):
        enc = encode(graph, lo, hi, nb, binaries)
        o = minimize_region(enc, enc.var_of[graph.output], c[None], np.zeros(1), integer=binaries is not None,
                            early_stop=False, time_limit=30, mip_rel_gap=0.0)  # exact optimum
        assert o.solver_status == "optimal", o
        out[key] = o
    return float(r.lower[0, 0]), out["lp"].lower, out["milp"]


def _case(seed, widths, n_in, eps):
    rng = np.random.default_rng(seed)
    net = make_net(seed, widths, n_in, 3)
    x = rng.uniform(0, 1, n_in)
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    if seed % 5 == 0:  # some zero-width dimensions
        hi[0] = lo[0]
    c = rng.normal(size=3)
    return net, lo, hi, c


def _check(seed, widths, n_in, eps):
    net, lo, hi, c = _case(seed, widths, n_in, eps)
    exact = brute_force_min(net, lo, hi, c)
    crown_lb, lp_lb, milp = milp_and_lp(net, lo, hi, c)
    tol = 1e-6 * max(1.0, abs(exact))
    assert milp.value == pytest.approx(exact, abs=1e-5 * max(1.0, abs(exact)))
    assert milp.lower <= exact + tol
    assert lp_lb <= exact + tol
    assert lp_lb >= crown_lb - 1e-6 * max(1.0, abs(crown_lb))
    # the MILP point is a real input whose float64 output reaches the optimum
    with torch.no_grad():
        v = float(torch.from_numpy(c) @ net(torch.from_numpy(milp.point).unsqueeze(0))[0])
    assert v == pytest.approx(milp.value, abs=1e-5 * max(1.0, abs(v)))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(seed=st.integers(0, 10**6), widths=st.sampled_from([[3], [5], [3, 3], [4, 3], [2, 2, 2], [4, 4]]),
       n_in=st.integers(1, 3), eps=st.sampled_from([0.05, 0.2, 0.5]))
def test_milp_optimum_equals_bruteforce(seed, widths, n_in, eps):
    _check(seed, widths, n_in, eps)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(seed=st.integers(0, 10**6), widths=st.sampled_from([[8], [12], [6, 6], [5, 4, 3], [4, 4, 4]]),
       n_in=st.integers(1, 4), eps=st.sampled_from([0.05, 0.2, 0.5]))
def test_milp_optimum_equals_bruteforce_large(seed, widths, n_in, eps):
    _check(seed, widths, n_in, eps)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(seed=st.integers(0, 10**6), widths=st.sampled_from([[4], [3, 3]]), eps=st.sampled_from([0.1, 0.3]),
       shift=st.floats(-1.0, 1.0))
def test_milp_verdict_matches_bruteforce(seed, widths, eps, shift):
    """The pipeline's MILP verdict on the property ``c . f(x) + shift > 0`` matches the exact minimum."""
    net, lo, hi, c = _case(seed, widths, 2, eps)
    exact = brute_force_min(net, lo, hi, c) + shift
    if abs(exact) < 1e-4:
        return  # too close to call in floating point
    box = Box(torch.from_numpy(lo), torch.from_numpy(hi))
    r = verify_box(net, box, [(-torch.from_numpy(c)[None], torch.tensor([-shift]))], stages="milp", timeout=30)
    # disjunct {-(c f) - shift <= 0} = {c f + shift >= 0}: reachable unless max over the box is < 0
    r_min = verify_box(net, box, [(torch.from_numpy(c)[None], torch.tensor([shift]))], stages="milp", timeout=30)
    assert r_min.verdict == (Verdict.VERIFIED if exact > 0 else Verdict.FALSIFIED)
    if r_min.verdict == Verdict.FALSIFIED:
        assert bool(box.contains(r_min.counterexample).all())
        with torch.no_grad():
            v = float(torch.from_numpy(c) @ net(r_min.counterexample.unsqueeze(0))[0]) + shift
        assert v <= 0
    assert r.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED)
