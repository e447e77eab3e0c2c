"""Cauchy projections of zonotope blocks (Wong et al. 2018): the sampler and the median L1 estimate."""
from __future__ import annotations

import pytest
import torch

from certorch.domains.zonotope import cauchy_like, l1_estimate


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 9, 3, 4, 4), (1, 50, 1)])
def test_median_estimate_equals_the_median_of_absolute_values(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(l1_estimate(G, projected=True), G.abs().median(dim=1).values)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_median_estimate_propagates_nan(requires_grad):
    """A NaN among the projections makes that column's estimate NaN (never a finite number that
    hides it), with or without a gradient to route."""
    G = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    G[1, 3, 2] = float("nan")
    est = l1_estimate(G.requires_grad_(requires_grad), projected=True)
    assert torch.isnan(est[1, 2]) and int(torch.isnan(est).sum()) == 1


@pytest.mark.parametrize("transposed", [False, True])
def test_median_estimate_has_the_gradient_of_autograds_median(transposed):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, 11, generator=g, dtype=torch.float64)
    base[0, :, 0] = 0.0  # a column of zeros: |.| has gradient 0 there in both
    weights = torch.randn(4, 11 if not transposed else 6, generator=g, dtype=torch.float64)
    grads = []
    for ours in (True, False):
        G = base.clone().requires_grad_(True)
        H = G.transpose(1, 2) if transposed else G  # linear_bounds passes a transposed view
        est = l1_estimate(H, projected=True) if ours else H.abs().median(dim=1).values
        (est * weights).sum().backward()
        grads.append(G.grad)
    assert torch.equal(grads[0], grads[1])


def test_cauchy_samples_are_tan_of_a_centred_uniform_draw():
    ref = torch.zeros(1, dtype=torch.float64)
    got = cauchy_like((5, 8), ref, torch.Generator().manual_seed(3))
    u = torch.rand((5, 8), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(got, torch.tan(torch.pi * (u - 0.5)), rtol=1e-12, atol=0)


def test_cauchy_median_estimate_is_close_to_the_l1_norm():
    """Median of |G R| over many projections estimates ||G||_1 (the median of |Cauchy| is 1)."""
    g = torch.Generator().manual_seed(4)
    G = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)  # (B, m, n): 30 generators
    R = cauchy_like((2, 4001, 30), G, g)  # (B, r, m)
    est = l1_estimate(torch.einsum("brm,bmn->brn", R, G), projected=True)
    exact = l1_estimate(G, projected=False)
    assert torch.allclose(est, exact, rtol=0.1)


# ---------------------------------------------------------------- projected zonotope bounds
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 9),
                               torch.nn.ReLU(), torch.nn.Linear(9, 3)).double()


def _bound(model, x, projections, seed=0):
    import certorch as ct

    return ct.bound(model, x, 0.3, method="zonotope", projections=projections, return_intermediate=True,
                    generator=torch.Generator().manual_seed(seed))


def test_new_relu_error_terms_merge_into_the_one_projected_block():
    """Each ReLU's projected error terms are added into the existing projected block: after two
    ReLU layers the zonotope still has one block of r columns."""
    model, x = _mlp(), torch.rand(2, 1, 6, dtype=torch.float64)
    res = _bound(model, x, projections=7)
    last_relu = res.regions["4"]
    assert len(last_relu.blocks) == 1 and last_relu.terms() == 7


def test_merged_projections_estimate_the_exact_zonotope_bounds():
    """The merged block is a Cauchy projection of all error terms: with many projections the median
    estimate of the second layer's radius is close to the exact zonotope's."""
    model, x = _mlp(), torch.rand(2, 1, 6, dtype=torch.float64)
    exact, est = _bound(model, x, None).intermediate["3"], _bound(model, x, 4001).intermediate["3"]
    assert torch.allclose(est.center, exact.center, rtol=0, atol=1e-12)
    assert torch.allclose(est.radius, exact.radius, rtol=0.1, atol=1e-9)


def test_first_layer_bounds_are_exact_under_projections():
    """Where the exact zonotope bound equals IBP's (the first affine layer) the projected zonotope
    uses it: no random estimate there, whatever the generator."""
    model, x = _mlp(), torch.rand(2, 1, 6, dtype=torch.float64)
    exact = _bound(model, x, None).intermediate["1"]
    for seed in (0, 1):
        got = _bound(model, x, 5, seed).intermediate["1"]
        assert torch.allclose(got.lower, exact.lower, rtol=0, atol=1e-12)
        assert torch.allclose(got.upper, exact.upper, rtol=0, atol=1e-12)


def test_one_cauchy_matrix_is_shared_by_the_batch():
    """The batch's examples share one Cauchy matrix (each example's estimate keeps its
    distribution; B times fewer draws): identical examples in one batch get identical estimates."""
    model = _mlp()
    x = torch.rand(1, 1, 6, dtype=torch.float64).expand(3, 1, 6).contiguous()
    res = _bound(model, x, projections=5)
    radius = res.intermediate["3"].radius
    assert torch.equal(radius[0], radius[1]) and torch.equal(radius[0], radius[2])


def test_a_shared_matrix_still_estimates_each_examples_own_norm():
    """Examples with different generators, one shared projection: each estimate tracks its own
    exact zonotope radius (the per-example estimator is unchanged)."""
    model, x = _mlp(), torch.rand(4, 1, 6, dtype=torch.float64)
    exact, est = _bound(model, x, None).intermediate["3"], _bound(model, x, 4001).intermediate["3"]
    assert not torch.allclose(exact.radius[0], exact.radius[1], rtol=0.2)
    assert torch.allclose(est.radius, exact.radius, rtol=0.1, atol=1e-9)


@pytest.mark.parametrize("projections", [None, 6])
def test_scale_and_extend_equals_scale_then_add_block_and_keeps_its_input(projections):
    """The fused DeepZ ReLU image has scale + add_block's values, draws and gradients, and
    leaves the zonotope it starts from as it was (the in-place update is on its own product)."""
    from certorch.domains.box import Box
    from certorch.domains.zonotope import Zonotope

    g = torch.Generator().manual_seed(5)
    box = Box.from_center_radius(torch.rand(2, 4, dtype=torch.float64, generator=g),
                                 torch.rand(2, 4, dtype=torch.float64, generator=g))
    z = Zonotope.from_box(box, projections, torch.Generator().manual_seed(0))
    before = {k: G.clone() for k, G in z.blocks.items()}
    s = torch.rand(2, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    mu = torch.rand(2, 4, dtype=torch.float64, generator=g)
    outs, grads = [], []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(7)
        w = z.scale_and_extend(s, mu, mu, 1, projections, gen) if fused else z.scale(s, mu).add_block(1, mu, projections, gen)
        outs.append(w)
        grads.append(torch.autograd.grad(w.radius().sum(), s)[0])
    assert outs[0].blocks.keys() == outs[1].blocks.keys()
    for k in outs[0].blocks:
        assert torch.equal(outs[0].blocks[k], outs[1].blocks[k])
    assert torch.equal(grads[0], grads[1])
    assert all(torch.equal(z.blocks[k], before[k]) for k in before)


@pytest.mark.parametrize("threads", [1, 16])
def test_median_estimate_is_the_same_whichever_selection_runs(threads):
    """numpy's selection (few torch threads) and torch.median (many) give the same estimate."""
    G = torch.randn(3, 50, 20, generator=torch.Generator().manual_seed(6))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = l1_estimate(G, projected=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, G.abs().median(dim=1).values)
