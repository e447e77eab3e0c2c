"""The adjoint of a convolution (``ConvMap.transpose``) by ``fold_transpose``: the same values and
gradients as ``conv_transpose2d``, for every stride / padding / dilation and input sizes the
stride leaves ambiguous (output padding)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certorch.ops.maps import ConvMap, fold_transpose, use_fold_transpose

pytestmark = pytest.mark.usefixtures("one_thread")

#: (Cin, Cout, kernel, stride, padding, dilation, input H, W)
CASES = [
    (1, 32, (5, 5), (2, 2), (2, 2), (1, 1), (28, 28)),  # colt_mnist's first conv
    (3, 8, (3, 3), (1, 1), (1, 1), (1, 1), (9, 9)),
    (2, 4, (4, 3), (2, 3), (1, 0), (1, 2), (11, 10)),  # odd sizes: output padding 1 and 2
    (3, 5, (3, 3), (2, 2), (0, 0), (2, 2), (12, 13)),
]


def _map(cin, cout, k, stride, padding, dilation, hw, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, *k, generator=g, dtype=dtype)
    return ConvMap(w, None, stride, padding, dilation, (cin, *hw))


def _out_shape(m: ConvMap) -> tuple[int, ...]:
    return tuple(m.apply(torch.zeros(1, *m.in_shape, dtype=m.weight.dtype)).shape[1:])


@pytest.mark.parametrize("case", CASES)
def test_fold_transpose_equals_conv_transpose(case):
    m = _map(*case)
    A = torch.randn(7, *_out_shape(m), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H, W = m.in_shape[1:]
    got = fold_transpose(A, m.weight, m.stride, m.padding, m.dilation, (H, W))
    x = torch.zeros(7, *m.in_shape, dtype=torch.float64, requires_grad=True)  # the adjoint is the VJP of the conv
    (ref,) = torch.autograd.grad(m.apply(x), x, A)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_fold_transpose_gradient_equals_conv_transpose_gradient(case):
    m = _map(*case)
    A = torch.randn(5, *_out_shape(m), dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    H, W = m.in_shape[1:]
    G = torch.randn(5, *m.in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (g_fold,) = torch.autograd.grad((fold_transpose(A, m.weight, m.stride, m.padding, m.dilation, (H, W)) * G).sum(), A)
    op = [H - ((A.shape[2] - 1) * m.stride[0] - 2 * m.padding[0] + m.dilation[0] * (m.weight.shape[2] - 1) + 1),
          W - ((A.shape[3] - 1) * m.stride[1] - 2 * m.padding[1] + m.dilation[1] * (m.weight.shape[3] - 1) + 1)]
    ref = F.conv_transpose2d(A, m.weight, None, m.stride, m.padding, tuple(op), 1, m.dilation)
    (g_ref,) = torch.autograd.grad((ref * G).sum(), A)
    assert torch.allclose(g_fold, g_ref, atol=1e-12)


def test_conv_map_takes_the_fold_path_for_float32_with_few_input_channels():
    A32 = torch.zeros(2, 32, 14, 14)
    assert use_fold_transpose(A32, torch.zeros(32, 1, 5, 5), (2, 2))
    assert not use_fold_transpose(A32.double(), torch.zeros(32, 1, 5, 5, dtype=torch.float64), (2, 2))
    assert not use_fold_transpose(torch.zeros(2, 64, 7, 7), torch.zeros(64, 32, 4, 4), (2, 2))


def test_stride_1_convs_take_the_fold_path_only_with_many_output_channels_per_input_channel():
    """At stride 1 the fold's column buffer costs more than it saves for e.g. colt_cifar's and the
    CIFAR ResNets' first conv (3 -> 32 / 16, 3x3): measured 2x slower there."""
    A = torch.zeros(2, 32, 32, 32)
    assert not use_fold_transpose(A, torch.zeros(32, 3, 3, 3), (1, 1))
    assert not use_fold_transpose(A, torch.zeros(16, 3, 3, 3), (1, 1))
    assert use_fold_transpose(A, torch.zeros(32, 1, 3, 3), (1, 1))
    assert use_fold_transpose(A, torch.zeros(64, 3, 3, 3), (1, 1))
    assert use_fold_transpose(A, torch.zeros(16, 3, 3, 3), (2, 2))


@pytest.mark.parametrize("case", CASES)
def test_float32_conv_map_adjoint_matches_float64(case):
    m64 = _map(*case)
    m32 = ConvMap(m64.weight.float(), None, m64.stride, m64.padding, m64.dilation, m64.in_shape)
    A = torch.randn(6, *_out_shape(m64), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (ref,) = m64.transpose(A)
    (got,) = m32.transpose(A.float())
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_float32_rows_budget_the_fold_column_buffer():
    """With few input channels the float32 adjoint builds Cin * k * k columns per output position
    (as float64's ``conv_transpose2d`` does): the row budget counts them."""
    from torch import nn

    import certorch as ct
    from certorch.bounds.backward import row_numel
    from certorch.bounds.context import BoundContext
    from certorch.graph.capture import capture

    model = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.ReLU(), nn.Conv2d(8, 4, 3, 1, 1))
    x = torch.rand(2, 3, 16, 16)
    ctx = BoundContext(graph=capture(model, tuple(x.shape[1:])), box=ct.linf_ball(x, 0.1), x=x, dtype=x.dtype)
    assert row_numel(ctx, ctx.graph.output, windows=False) >= 3 * 5 * 5 * 8 * 8
