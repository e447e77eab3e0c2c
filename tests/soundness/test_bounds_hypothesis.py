"""Property tests: random small nets (dense, conv, residual), random eps, boxes touching 0 and 1.

For every method, float64 bounds contain every sampled point (uniform + corners) exactly.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import certorch as ct
from certorch.models.wong import ResBlock
from tests.soundness.bound_checks import METHODS, assert_within, sample_box, spec_values

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _dense(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _conv(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(channels, 4, 2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 4))


def _residual(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), ResBlock(channels, channels),
                         ResBlock(channels, 2, downsample=True), nn.Flatten(), nn.Linear(2 * 4 * 4, 4))


@st.composite
def problems(draw):
    kind = draw(st.sampled_from(["dense", "conv", "residual"]))
    seed = draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    if kind == "dense":
        widths = [16] + draw(st.lists(st.integers(2, 12), min_size=1, max_size=3)) + [4]
        model = _dense(widths)
    elif kind == "conv":
        model = _conv(draw(st.integers(1, 4)))
    else:
        model = _residual(draw(st.integers(1, 3)))
    model = model.double().eval()
    scale = draw(st.floats(0.5, 3.0))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    # Some coordinates sit exactly on the data box's faces, so the clipped box touches 0 and 1.
    x.view(3, -1)[:, :6] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    if kind == "dense":
        x = x[:, :, :4, :4].contiguous()
    eps = draw(st.sampled_from([0.0, 1e-3, 0.02, 0.1, 0.3]))
    method = draw(st.sampled_from(METHODS))
    return model, x, eps, method, g


@SETTINGS
@given(problems())
def test_random_nets_bounds_contain_samples(problem):
    model, x, eps, method, g = problem
    C = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        b = ct.bound(model, x, eps, method=method, C=C)
    pts = sample_box(ct.linf_ball(x, eps), 2000, g)
    assert_within(spec_values(model, pts, C), b.lower, b.upper)


@SETTINGS
@given(problems())
def test_random_nets_bounds_are_finite_and_ordered(problem):
    model, x, eps, method, _ = problem
    with torch.no_grad():
        b = ct.bound(model, x, eps, method=method)
    assert torch.isfinite(b.lower).all() and (b.lower <= b.upper + 1e-12).all()
