"""Soundness of the optimised and complete stages on full-size nets (slow suite).

The default suite checks alpha-CROWN and branch and bound on small random nets (hypothesis) and
tiny MLPs against MILP; this file runs them on the zoo's nets and on trained nets, where slopes
are optimised over thousands of neurons and the search splits many of them:

- alpha-CROWN's float64 bounds of every small and medium zoo net (random weights, random
  BatchNorm statistics) contain 10,000 / 2,000 sampled points and PGD's points, and are never
  looser than CROWN's;
- branch and bound (cold, and warm-started by the alpha-CROWN stage), in float64 and with a
  float32 model (the float32 search), reaches the complete MILP's verdict on a trained MLP and
  a trained conv net; a proof's margin lower bound lies below every sampled and PGD margin, and
  a counterexample is inside the box and violates the property.
Run with ``pytest -m slow tests/soundness/test_optimised_soundness.py`` (about 12 minutes,
one thread).
"""
from __future__ import annotations

import copy

import pytest
import torch

import certorch as ct
from certorch.data import load
from certorch.models import build
from certorch.verify import Verdict, certify_batch
from tests.soundness.bound_checks import assert_within, pgd_points, sample_box, spec_values
from tests.soundness.test_bounds_hypothesis import _residual
from tests.soundness.test_bounds_soundness import MEDIUM, SMALL, _model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _alpha_case(model, x, y, eps, n):
    C = ct.margin_matrix(y, 10).double()
    with torch.no_grad():
        crown = ct.bound(model, x, eps, method="crown", y=y)
    alpha = ct.bound(model, x, eps, method="alpha-crown", y=y, alpha_iters=5)
    g = torch.Generator().manual_seed(3)
    pts = torch.cat([sample_box(ct.linf_ball(x, eps), n, g), pgd_points(model, x, eps, C, steps=10)])
    return crown, alpha, spec_values(model, pts, C)


@pytest.mark.parametrize("name,dataset,n", [(m, d, 10_000) for m, d in SMALL] + [(m, d, 2_000) for m, d in MEDIUM],
                         ids=[m for m, _ in SMALL + MEDIUM])
def test_zoo_alpha_crown_bounds_contain_samples_float64(name, dataset, n):
    model = _model(name, dataset, torch.float64)
    shape = ct.data.dataset_info(dataset).input_shape
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[0].view(-1)[:5] = 0.0
    x[1].view(-1)[:5] = 1.0
    _, alpha, values = _alpha_case(model, x, torch.tensor([3, 7]), 0.005, n)
    assert_within(values, alpha.lower, alpha.upper)


@pytest.mark.parametrize("name,dataset", SMALL + MEDIUM, ids=[m for m, _ in SMALL + MEDIUM])
def test_zoo_alpha_crown_is_never_looser_than_crown(name, dataset):
    model = _model(name, dataset, torch.float64)
    shape = ct.data.dataset_info(dataset).input_shape
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    crown, alpha, _ = _alpha_case(model, x, torch.tensor([3, 7]), 0.005, 2)
    assert bool((alpha.lower >= crown.lower - 1e-9).all()) and bool((alpha.upper <= crown.upper + 1e-9).all())


def test_alpha_crown_bounds_of_a_residual_net_contain_samples():
    torch.manual_seed(0)
    model = _residual(8).double().eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    C = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for eps in (0.02, 0.1):
        b = ct.bound(model, x, eps, method="alpha-crown", C=C, alpha_iters=5)
        g = torch.Generator().manual_seed(5)
        pts = torch.cat([sample_box(ct.linf_ball(x, eps), 10_000, g), pgd_points(model, x, eps, C, steps=10)])
        assert_within(spec_values(model, pts, C), b.lower.detach(), b.upper.detach())


def _trained(name: str, steps: int) -> torch.nn.Module:
    """A zoo net trained naturally (Adam, full batch) on the bundled 8x8 digits, in float64."""
    torch.manual_seed(0)
    train = load("digits", "train")
    model = build(name, dataset="digits").double()
    X, Y = train.images.double(), train.labels
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_nets():
    return {"digits_mlp": _trained("digits_mlp", 150), "digits_cnn": _trained("digits_cnn", 100)}


# (net, correctly classified examples, radii): radii around the nets' decision boundaries (MILP decides all of them
# within its time limit; branch and bound has proofs and counterexamples to find).
CASES = {"digits_mlp": (40, (0.04, 0.06, 0.08)), "digits_cnn": (24, (0.05, 0.055))}


def _check_against_points(r, exact, x, y, eps, g):
    """A proof's margin lower bound is below every sampled / PGD margin of the exact (float64)
    network; a counterexample lies in the box and has a margin <= 0 there."""
    box = ct.linf_ball(x, eps, 0.0, 1.0)
    C = ct.margin_matrix(y, 10).double()
    if r.verdict == Verdict.VERIFIED:
        pts = torch.cat([sample_box(box, 2_000, g), pgd_points(exact, x, eps, C, steps=30)])
        assert r.margin_lb <= float(spec_values(exact, pts, C).min()) + 1e-9
    else:
        cex = r.counterexample.to(torch.float64)[None]
        assert bool((cex >= box.lower).all()) and bool((cex <= box.upper).all())
        with torch.no_grad():
            assert float((exact(cex) @ C[0].T).min()) <= 0


@pytest.fixture(scope="module")
def milp_verdicts():
    """The complete MILP's results per (net, dtype, eps), computed once for both searches."""
    return {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("stages", ["bab", "alpha-crown,bab"])
@pytest.mark.parametrize("net", list(CASES))
def test_bab_reaches_the_milp_verdict_and_its_proofs_hold_on_trained_nets(trained_nets, milp_verdicts, net, stages,
                                                                          dtype):
    model = copy.deepcopy(trained_nets[net]).to(dtype)
    exact = copy.deepcopy(model).double()  # the network the verifier reasons about: the float32 weights, exactly
    n, radii = CASES[net]
    test = load("digits", "test")
    with torch.no_grad():
        right = model(test.images.to(dtype)).argmax(1) == test.labels
    x, y = test.images[right][:n].double(), test.labels[right][:n]  # correctly classified examples
    g = torch.Generator().manual_seed(6)
    kinds = set()
    for eps in radii:
        key = (net, dtype, eps)
        if key not in milp_verdicts:
            milp_verdicts[key] = certify_batch(model, x, y, eps, stages="milp", timeout=120)
        milp = milp_verdicts[key]
        bab = certify_batch(model, x, y, eps, stages=stages, timeout=120)
        for k, (a, b) in enumerate(zip(bab, milp)):
            assert b.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED), f"MILP left example {k} at {eps}: {b.message}"
            assert a.verdict == b.verdict, f"example {k} at eps {eps}: {a.verdict} ({a.stage}) vs MILP {b.verdict}"
            _check_against_points(a, exact, x[k : k + 1], y[k : k + 1], eps, g)
            kinds.add((a.verdict, a.stage))
    assert (Verdict.VERIFIED, "bab") in kinds and (Verdict.FALSIFIED, "bab") in kinds  # the search did decide
