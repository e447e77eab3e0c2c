"""Soundness: no sampled point, corner or PGD point ever leaves a certified bound.

float64: exact (1e-9 absolute); float32: within 1e-5 relative. Every zoo model with random
weights, every method (large nets get fewer samples, and the quadratic-memory methods are
marked slow on them to keep the default suite fast).
"""
from __future__ import annotations

import pytest
import torch

import certorch as ct
from certorch.errors import MemoryBudgetError
from certorch.models import build
from tests.soundness.bound_checks import METHODS, assert_within, pgd_points, sample_box, spec_values

# Every method on the small nets with 10,000 samples (the fast ones in the default suite); the
# larger zoo nets with fewer samples: IBP (and CROWN-IBP on the medium ones) by default, every
# method in the slow suite (`pytest -m slow`).
SMALL = [("digits_mlp", "digits"), ("digits_cnn", "digits"), ("mnist_small", "mnist"), ("mnist_fc1", "mnist")]
MEDIUM = [("cifar_small", "cifar10"), ("colt_mnist", "mnist"), ("dm_small", "mnist")]
LARGE = [("mnist_large", "mnist"), ("cifar_large", "cifar10"), ("colt_cifar", "cifar10"), ("dm_medium", "cifar10"),
         ("dm_large", "cifar10"), ("cnn7", "cifar10"), ("cifar_resnet", "cifar10"), ("mnist_fc2", "mnist")]
CHEAP = {"ibp", "crown-ibp"}


def _params():
    for name, ds in SMALL:
        for m in METHODS:
            yield pytest.param(name, ds, m, 10_000, id=f"{name}-{m}")
    for name, ds in MEDIUM:
        for m in METHODS:
            marks = [] if m in CHEAP else [pytest.mark.slow]
            yield pytest.param(name, ds, m, 2_000, id=f"{name}-{m}", marks=marks)
    for name, ds in LARGE:
        for m in METHODS:
            marks = [] if m == "ibp" else [pytest.mark.slow]
            yield pytest.param(name, ds, m, 100, id=f"{name}-{m}", marks=marks)


def _model(name, dataset, dtype):
    torch.manual_seed(0)
    model = build(name, dataset=dataset).eval().to(dtype)
    # Random BatchNorm statistics so that eval-mode BN is a non-trivial affine map.
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name,dataset,method,n", list(_params()))
def test_zoo_bounds_contain_samples_float64(name, dataset, method, n):
    model = _model(name, dataset, torch.float64)
    shape = ct.data.dataset_info(dataset).input_shape
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, *shape, generator=g, dtype=torch.float64)
    x[0].view(-1)[:5] = 0.0  # boxes touching 0 and 1
    x[1].view(-1)[:5] = 1.0
    y = torch.tensor([3, 7])
    eps = 0.005
    try:
        with torch.no_grad():
            b = ct.bound(model, x, eps, method=method, y=y)
    except MemoryBudgetError as e:  # refused before allocating: the promised behaviour, nothing to check
        pytest.skip(f"does not fit this machine's default memory budget: {e}")
    box = ct.linf_ball(x, eps)
    C = ct.margin_matrix(y, 10).double()
    assert_within(spec_values(model, sample_box(box, n, g), C), b.lower, b.upper)
    if n >= 2_000:
        assert_within(spec_values(model, pgd_points(model, x, eps, C, steps=10), C), b.lower, b.upper)


@pytest.mark.parametrize("method", METHODS)
def test_float32_bounds_contain_samples_within_relative_tolerance(method):
    model = _model("mnist_small", "mnist", torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 28, 28, generator=g)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        b = ct.bound(model, x, 0.01, method=method, y=y)
    C = ct.margin_matrix(y, 10)
    pts = sample_box(ct.linf_ball(x, 0.01), 2000, g)
    assert_within(spec_values(model, pts, C), b.lower, b.upper, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_pgd_never_beats_bounds_on_a_trained_net(method, trained_digits_net):
    model, X, Y = trained_digits_net
    x, y = X[:16], Y[:16]
    C = ct.margin_matrix(y, 10).double()
    for eps in (0.01, 0.05):
        with torch.no_grad():
            b = ct.bound(model, x, eps, method=method, y=y)
        assert_within(spec_values(model, pgd_points(model, x, eps, C), C), b.lower, b.upper)
