"""Issue 9, defect 1: captured graphs follow the module structure; captures are checked against
the model; capture does not change any module's train/eval flag."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import certorch as ct
from certorch.errors import UnsupportedOperationError
from certorch.graph.capture import capture
from tests.soundness.bound_checks import assert_within, sample_box, spec_values


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def _contains_outputs(model: nn.Module, x: torch.Tensor, method: str) -> bool:
    b = ct.bound(model, x, 0.05, method=method)
    out = model(x)
    return bool(((out >= b.lower - 1e-9) & (out <= b.upper + 1e-9)).all())


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_replacing_a_sequential_layer_bounds_the_new_layer(method):
    model, x = _mlp(), torch.rand(5, 4, dtype=torch.float64)
    ct.bound(model, x, 0.05, method=method)  # capture and cache
    model[4] = nn.Linear(8, 3).double()
    assert _contains_outputs(model, x, method)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.body(x))


def test_replacing_an_attribute_head_bounds_the_new_head():
    torch.manual_seed(1)
    model, x = _Net().double(), torch.rand(3, 4, dtype=torch.float64)
    ct.bound(model, x, 0.05, method="ibp")
    model.fc = nn.Linear(6, 5).double()
    b = ct.bound(model, x, 0.05, method="ibp")
    assert b.lower.shape == (3, 5)
    assert _contains_outputs(model, x, "ibp")


def test_unchanged_structure_reuses_the_cached_graph():
    model = _mlp()
    assert capture(model, (4,)) is capture(model, (4,))


def test_a_new_callable_attribute_invalidates_the_cache():
    class Act(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.act = torch.relu

        def forward(self, x):
            return self.act(self.lin(x))

    model = Act().double()
    g1 = capture(model, (3,))
    model.act = torch.tanh
    g2 = capture(model, (3,))
    assert g1 is not g2 and g2.nodes[-1].op.kind != g1.nodes[-1].op.kind


class _InplaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.lin(x)
        r = self.relu(h)  # overwrites h: the model computes 2 * relu(h), not h + relu(h)
        return h + r


def test_capture_is_checked_against_the_model_inplace_aliasing_is_refused():
    with pytest.raises(UnsupportedOperationError, match="differs from model"):
        capture(_InplaceResidual().double(), (4,))


def test_capture_keeps_each_submodules_train_flag():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    before = model[1].running_mean.clone()
    capture(model, (4,))
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, before)


def _swap_candidates(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.ReLU, nn.Tanh))]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), method=st.sampled_from(["ibp", "crown", "zonotope", "symbolic"]),
       widths=st.lists(st.integers(2, 8), min_size=1, max_size=3))
def test_random_nets_after_a_random_swap_are_bounded_soundly(seed, method, widths):
    torch.manual_seed(seed)
    dims = [5] + widths + [3]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).double().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 5, generator=g, dtype=torch.float64)
    ct.bound(model, x, 0.1, method=method)  # cached graph of the original net
    k = _swap_candidates(model)[seed % len(_swap_candidates(model))]
    old = model[k]
    model[k] = nn.Linear(old.in_features, old.out_features).double() if isinstance(old, nn.Linear) else nn.Identity()
    C = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)
    b = ct.bound(model, x, 0.1, method=method, C=C)
    pts = sample_box(ct.linf_ball(x, 0.1), 500, g)
    assert_within(spec_values(model, pts, C), b.lower, b.upper)
