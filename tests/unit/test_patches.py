"""Window ("patches") coefficients give the same bounds and gradients as dense coefficients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import certorch as ct
from certorch.bounds.patches import Patches, add_coefficients, window_conv_transpose
from certorch.ops.maps import ConvMap

pytestmark = pytest.mark.usefixtures("one_thread")


class Residual(nn.Module):
    """conv -> relu -> (conv + skip) -> relu -> conv: a residual Add between two conv maps."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, 1, 1)
        self.c2 = nn.Conv2d(4, 4, 3, 1, 1)
        self.c3 = nn.Conv2d(4, 3, 3, 2, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h) + h)
        return self.head(torch.relu(self.c3(h)))


def _nets() -> dict[str, nn.Module]:
    return {
        "stride_padding": nn.Sequential(
            nn.Conv2d(2, 4, 4, 2, 1), nn.ReLU(), nn.Conv2d(4, 5, 3, 1, 1), nn.ReLU(), nn.Conv2d(5, 3, 3, 2, 0),
            nn.ReLU(), nn.Flatten(), nn.Linear(3 * 1 * 1, 4),
        ),
        "conv_conv_without_relu": nn.Sequential(  # padding entries must be masked before the 2nd transpose
            nn.Conv2d(2, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 2, dilation=2), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1),
            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
        ),
        "batchnorm": nn.Sequential(
            nn.Conv2d(2, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.BatchNorm2d(4),
            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
        ),
        "avgpool_falls_back_to_dense": nn.Sequential(
            nn.Conv2d(2, 4, 3, 1, 1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
        ),
        "residual": Residual(),
    }


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)


@pytest.mark.parametrize("name", list(_nets()))
@pytest.mark.parametrize("eps", [0.01, 0.3])  # few / most neurons unstable: one-hot rows / all-channel groups
def test_crown_bounds_with_patches_equal_dense(name, eps):
    torch.manual_seed(0)
    model = _nets()[name].double().eval()
    _randomize_bn(model)
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    a = ct.bound(model, x, eps, "crown", patches=True, return_intermediate=True)
    b = ct.bound(model, x, eps, "crown", patches=False, return_intermediate=True)
    ibp = ct.bound(model, x, eps, "ibp", return_intermediate=True).intermediate
    assert torch.allclose(a.lower, b.lower, atol=1e-10) and torch.allclose(a.upper, b.upper, atol=1e-10)
    for k in b.intermediate:
        pa, pb = a.intermediate[k], b.intermediate[k]
        # Where IBP leaves a neuron unstable (in some example) both compute the same CROWN bound;
        # all-channel windows may also tighten IBP-stable neurons, never loosen them.
        unstable = ((ibp[k].lower < 0) & (ibp[k].upper > 0)).any(0, keepdim=True).expand_as(pa.lower)
        assert torch.allclose(pa.lower[unstable], pb.lower[unstable], atol=1e-10), k
        assert torch.allclose(pa.upper[unstable], pb.upper[unstable], atol=1e-10), k
        assert (pa.lower >= pb.lower - 1e-10).all() and (pa.upper <= pb.upper + 1e-10).all(), k


def test_patches_and_dense_give_the_same_parameter_gradients():
    torch.manual_seed(1)
    model = _nets()["stride_padding"].double()
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    grads = []
    for patches in (True, False):
        model.zero_grad()
        ct.bound(model, x, 0.2, "crown", patches=patches).lower.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ga, gb in zip(*grads):
        assert torch.allclose(ga, gb, atol=1e-10)


def test_chunked_patch_passes_equal_one_pass():
    torch.manual_seed(2)
    model = _nets()["residual"].double().eval()
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    a = ct.bound(model, x, 0.1, "crown", max_elements=2000)
    b = ct.bound(model, x, 0.1, "crown")
    assert torch.allclose(a.lower, b.lower, atol=1e-10) and torch.allclose(a.upper, b.upper, atol=1e-10)


def test_one_hot_patches_are_one_hot_rows():
    idx = torch.tensor([0, 7, 20, 47])
    dense = Patches.one_hot(idx, (3, 4, 4), torch.float64).to_dense()
    expected = torch.zeros(1, 4, 48, dtype=torch.float64)
    expected[0, torch.arange(4), idx] = 1
    assert torch.equal(dense.flatten(2), expected)


def test_all_channel_patches_select_every_channel_of_a_position():
    p = Patches.all_channels(torch.tensor([5]), (3, 4, 4), torch.float64)
    dense = p.to_dense().flatten(2)[0]  # (3, 48): rows (u=0, c)
    assert torch.equal(dense.nonzero()[:, 1], torch.tensor([5, 21, 37]))


def _conv_map(stride, padding, dilation=(1, 1)) -> ConvMap:
    torch.manual_seed(3)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    return ConvMap(w, None, stride, padding, dilation, (3, 9, 9))


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1), (1, 1), (1, 1)), ((2, 2), (0, 0), (1, 1)), ((2, 1), (1, 0), (2, 1))])
def test_window_transpose_equals_dense_transpose(stride, padding, dilation):
    m = _conv_map(stride, padding, dilation)
    out_shape = m.apply(torch.zeros(1, 3, 9, 9, dtype=torch.float64)).shape[1:]
    n = out_shape.numel()
    rows = Patches.one_hot(torch.arange(0, n, 3), tuple(out_shape), torch.float64)
    (through,) = rows.transpose(m)
    dense = rows.to_dense()
    expected = m.transpose(dense.reshape(-1, *out_shape))[0].view(1, -1, 3, 9, 9)
    assert torch.allclose(through.to_dense(), expected, atol=1e-12)


def test_window_transpose_gemm_path_equals_conv_transpose():
    m = _conv_map((2, 2), (0, 0))
    P = torch.randn(64, 4, 2, 2, dtype=torch.float64)  # small windows, many of them: the GEMM path
    ref = torch.nn.functional.conv_transpose2d(P, m.weight, None, m.stride)
    assert torch.allclose(window_conv_transpose(P, m), ref, atol=1e-12)


def test_adding_windows_of_different_size_equals_dense_sum():
    m1, m2 = _conv_map((1, 1), (1, 1)), _conv_map((1, 1), (1, 1), (2, 2))
    m2 = ConvMap(m2.weight, None, (1, 1), (2, 2), (2, 2), (3, 9, 9))
    rows = Patches.one_hot(torch.tensor([0, 40, 80, 300]), (4, 9, 9), torch.float64)
    (a,) = rows.transpose(m1)
    (b,) = rows.transpose(m2)
    total = add_coefficients(a, b)
    assert isinstance(total, Patches)
    assert torch.allclose(total.to_dense(), a.to_dense() + b.to_dense(), atol=1e-12)


def _context(model, x):
    from certorch.bounds.context import BoundContext
    from certorch.graph.capture import capture

    return BoundContext(graph=capture(model, tuple(x.shape[1:])), box=ct.linf_ball(x, 0.1), x=x, dtype=x.dtype)


def test_window_rows_are_budgeted_smaller_than_dense_rows():
    from certorch.bounds.backward import row_numel

    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(), nn.Flatten())
    x = torch.rand(2, 3, 16, 16)
    ctx = _context(model, x)
    target = [n.index for n in ctx.graph.nodes if n.op.kind == "conv2d"][1]  # the second conv
    windows, dense = row_numel(ctx, target, windows=True), row_numel(ctx, target, windows=False)
    assert windows < dense
    assert windows >= 8 * 3 * 3  # the 3x3 window of the first ReLU's 8 channels


def test_float64_rows_budget_the_conv_transpose_column_buffer():
    from certorch.bounds.backward import row_numel

    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1)).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    ctx = _context(model, x)
    # dense rows through the second conv: its column buffer is Cin * k * k per output position
    assert row_numel(ctx, ctx.graph.output, windows=False) >= 8 * 3 * 3 * 16 * 16
