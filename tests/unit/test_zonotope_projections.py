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


# ---------------------------------------------------------------- low-precision projected blocks
def _convnet():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(6 * 4 * 4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _conv_bound(projection_dtype, seed=0, projections=50, x=None):
    import certorch as ct

    x = torch.rand(3, 1, 14, 14, generator=torch.Generator().manual_seed(9)) if x is None else x
    return ct.bound(_convnet(), x, 0.1, method="zonotope", projections=projections, projection_dtype=projection_dtype,
                    return_intermediate=True, generator=torch.Generator().manual_seed(seed))


def test_bfloat16_projections_keep_their_dtype_and_bounds_stay_in_the_models():
    """The projected block is mapped in bfloat16 through convolutions, ReLUs and dense layers;
    the center, the boxes and the result stay float32."""
    res = _conv_bound(torch.bfloat16)
    z = res.regions["6"]
    (G,) = z.blocks.values()
    assert G.dtype == torch.bfloat16 and z.center.dtype == torch.float32
    assert res.lower.dtype == torch.float32 and res.intermediate["5"].lower.dtype == torch.float32


def test_bfloat16_projections_move_the_estimates_far_less_than_a_new_draw():
    """Same Cauchy draws in float32 and bfloat16: the estimated radii differ by well under 1 %
    (median), while two float32 draws differ by about 20 % (the estimator's own spread)."""
    def radii(dt, seed):
        inter = _conv_bound(dt, seed).intermediate
        return torch.cat([inter[k].radius.flatten() for k in ("2", "5")])

    r32, r16, other = radii(None, 0), radii(torch.bfloat16, 0), radii(None, 1)
    rounding = ((r16 - r32).abs() / r32).median()
    redraw = ((other - r32).abs() / r32).median()
    assert rounding < 0.01
    assert redraw > 10 * rounding


def test_bfloat16_projections_are_differentiable():
    """Training through a bfloat16 projected bound: float32 gradients on every weight, finite."""
    import certorch as ct
    from certorch.train.robust_loss import robust_cross_entropy

    model = _convnet()
    x, y = torch.rand(4, 1, 14, 14, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    lower = ct.bound(model, x, 0.05, method="zonotope", y=y, projections=20, projection_dtype=torch.bfloat16,
                     upper=False).lower
    robust_cross_entropy(lower, y).backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())


def test_low_precision_median_selects_in_float32():
    G = torch.randn(2, 50, 7, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = l1_estimate(G, projected=True)
    assert got.dtype == torch.float32
    assert torch.equal(got, G.float().abs().median(dim=1).values)


@pytest.mark.parametrize("kwargs, message", [
    ({"projection_dtype": torch.bfloat16}, "give projections"),
    ({"projections": 5, "projection_dtype": torch.int8}, "floating torch.dtype"),
    ({"projections": 5, "projection_dtype": "bfloat16"}, "floating torch.dtype"),
])
def test_projection_dtype_is_checked(kwargs, message):
    import certorch as ct
    from certorch.errors import CertorchError

    with pytest.raises(CertorchError, match=message):
        ct.bound(_convnet(), torch.rand(1, 1, 14, 14), 0.1, method="zonotope", **kwargs)


def test_auto_projection_dtype_is_bfloat16_only_where_native():
    from certorch.domains.zonotope import auto_projection_dtype

    native = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert auto_projection_dtype("cpu") == (torch.bfloat16 if native else None)
    assert auto_projection_dtype("meta") is None


# ---------------------------------------------------------------- maps in another dtype, chunks
def test_affine_map_to_casts_its_tensors_and_keeps_its_geometry():
    from certorch.ops.maps import ConvMap

    m = ConvMap(torch.randn(4, 2, 3, 3), torch.randn(4), (2, 2), (1, 1), (1, 1), (2, 8, 8))
    b = m.to(torch.bfloat16)
    assert b.weight.dtype == torch.bfloat16 and b.bias.dtype == torch.bfloat16
    assert (b.stride, b.padding, b.in_shape) == (m.stride, m.padding, m.in_shape)
    assert m.to(torch.float32) is m
    x = torch.randn(3, 2, 8, 8)
    assert torch.allclose(b.apply(x.bfloat16()).float(), m.apply(x), rtol=0.05, atol=0.05)


def test_map_rows_bounds_the_output_chunk_too():
    """A widening map is called on chunks of at most ``max_elements`` outputs as well, with the
    same result as one call."""
    from certorch.ops.maps import map_rows

    W = torch.randn(40, 4)
    sizes = []

    def fn(x):
        sizes.append(x.shape[0])
        return x @ W.t()

    x = torch.randn(100, 4)
    out = map_rows(fn, [x], max_elements=400, out_per_row=40)
    assert torch.equal(out, x @ W.t())
    assert max(sizes) == 10 and sum(sizes) == 100


# ---------------------------------------------------------------- consuming a zonotope in place
def _dense_zonotope(projections, seed=0):
    from certorch.domains.box import Box
    from certorch.domains.zonotope import Zonotope
    from certorch.ops.maps import DenseMap, ReshapeMap

    g = torch.Generator().manual_seed(seed)
    box = Box.from_center_radius(torch.rand(2, 4, dtype=torch.float64, generator=g),
                                 torch.rand(2, 4, dtype=torch.float64, generator=g))
    z0 = Zonotope.from_box(box, projections, torch.Generator().manual_seed(0))
    dense = DenseMap(torch.randn(5, 4, dtype=torch.float64, generator=g))
    return z0, z0.map(dense), z0.map(ReshapeMap((4,), (4,)))


@pytest.mark.parametrize("projections", [None, 6])
def test_a_consumed_zonotope_is_scaled_in_place_with_the_same_result(projections):
    _, z, _ = _dense_zonotope(projections)
    s, mu = torch.rand(2, 5, dtype=torch.float64), torch.rand(2, 5, dtype=torch.float64)
    ref = z.scale_and_extend(s, mu, mu, 1, projections, torch.Generator().manual_seed(7))
    ptrs = {k: G.data_ptr() for k, G in z.blocks.items()}
    got = z.scale_and_extend(s, mu, mu, 1, projections, torch.Generator().manual_seed(7), consume=True)
    assert ref.blocks.keys() == got.blocks.keys()
    assert all(torch.equal(ref.blocks[k], got.blocks[k]) for k in ref.blocks)
    assert any(got.blocks[k].data_ptr() == p for k, p in ptrs.items())  # no new block: the old one, scaled


def test_a_block_that_views_an_input_block_is_never_overwritten():
    """A map that returns a view of its input (reshape) does not own the block: consuming the
    result leaves the input zonotope as it was."""
    z0, _, view = _dense_zonotope(None)
    assert not view.owned
    before = {k: G.clone() for k, G in z0.blocks.items()}
    s = torch.rand(2, 4, dtype=torch.float64)
    view.scale_and_extend(s, s, s, 1, consume=True)
    assert all(torch.equal(z0.blocks[k], before[k]) for k in before)


def test_consuming_keeps_the_values_autograd_needs():
    """With a slope that needs a gradient the block is not overwritten (its old values are the
    gradient's): same gradient as without consuming, and the zonotope unchanged."""
    _, z, _ = _dense_zonotope(6)
    before = {k: G.clone() for k, G in z.blocks.items()}
    mu = torch.rand(2, 5, dtype=torch.float64)
    grads = []
    for consume in (False, True):
        s = torch.rand(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        w = z.scale_and_extend(s, mu, mu, 1, 6, torch.Generator().manual_seed(7), consume=consume)
        grads.append(torch.autograd.grad(w.radius().sum(), s)[0])
    assert torch.equal(grads[0], grads[1])
    assert all(torch.equal(z.blocks[k], before[k]) for k in before)


@pytest.mark.parametrize("projections", [None, 9])
def test_bounds_are_the_same_whether_regions_are_kept_or_consumed(projections):
    """Kept regions (``return_intermediate=True``) are never overwritten; freed ones are scaled in
    place: the same intermediate bounds and result either way."""
    import certorch as ct

    x = torch.rand(3, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    res = {}
    for keep in (True, "boxes"):
        res[keep] = ct.bound(_convnet(), x, 0.05, method="zonotope", projections=projections, return_intermediate=keep,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(res[True].lower, res["boxes"].lower)
    for name, box in res[True].intermediate.items():
        assert torch.equal(box.lower, res["boxes"].intermediate[name].lower), name


@pytest.mark.parametrize("name, expected", [(None, None), ("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_certified_training_maps_its_projections_in_the_asked_dtype(name, expected):
    """``certified`` training with projections takes ``projection_dtype`` as COLT does, and its
    robust loss stays differentiable in bfloat16."""
    from certorch.train.objectives import TrainState, build_objective

    obj = build_objective("certified", {"bound": "dual", "projections": 10, "projection_dtype": name,
                                        "kappa": {"start": 0.0, "end": 0.0}})
    assert obj.projection_dtype(torch.device("cpu")) == expected
    model = _convnet()
    x, y = torch.rand(4, 1, 14, 14, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    state = TrainState(epoch=0, step=0, epoch_step=0, steps_per_epoch=1, total_epochs=1, t=0.0, progress=0.0, eps=0.05,
                       eps_target=0.05, lr=1e-3, values={"kappa": 0.0}, stage=0)
    obj(model, x, y, 0.05, state).loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_a_zonotope_extended_out_of_place_owns_only_its_new_block():
    """``add_block`` without ``in_place`` shares the other blocks with its input: consuming the
    result must not overwrite them."""
    _, z, _ = _dense_zonotope(None)
    mu = torch.rand(2, 5, dtype=torch.float64)
    w = z.add_block(1, mu)
    assert w.owned == frozenset({1})
    before = z.blocks[0].clone()
    w.scale_and_extend(torch.rand(2, 5, dtype=torch.float64), mu, mu, 2, consume=True)
    assert torch.equal(z.blocks[0], before)
