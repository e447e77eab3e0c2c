"""Affine ops: Linear, Conv2d, Flatten/reshape, AvgPool2d, Normalize, BatchNorm, Add, Identity."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certorch.errors import UnsupportedOperationError
from certorch.nn.normalize import Normalize
from certorch.ops.base import AffineOp
from certorch.ops.maps import (
    AffineMap,
    ConvMap,
    DenseMap,
    NonNegativeLinearMap,
    ReshapeMap,
    ScaleShiftMap,
    SumMap,
    ConcatMap,
)
from certorch.ops.registry import register_function_op, register_module_op


def _cast(t: Tensor | None, dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


class LinearOp(AffineOp):
    kind = "linear"

    def __init__(self, module: nn.Linear):
        self.module = module

    def affine(self, dtype, values=None) -> AffineMap:
        return DenseMap(self.module.weight.to(dtype), _cast(self.module.bias, dtype))


class Conv2dOp(AffineOp):
    kind = "conv2d"

    def __init__(self, module: nn.Conv2d, in_shape):
        if module.groups != 1:
            raise UnsupportedOperationError(f"Conv2d with groups={module.groups} is not supported (groups=1 only)")
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UnsupportedOperationError("Conv2d supports numeric zero padding only")
        self.module = module
        self.in_shape = tuple(in_shape)

    def affine(self, dtype, values=None) -> AffineMap:
        m = self.module
        return ConvMap(m.weight.to(dtype), _cast(m.bias, dtype), m.stride, m.padding, m.dilation, self.in_shape)


class ReshapeOp(AffineOp):
    kind = "reshape"

    def __init__(self, in_shape, out_shape):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def affine(self, dtype, values=None) -> AffineMap:
        return ReshapeMap(self.in_shape, self.out_shape)


class NonNegativeModuleOp(AffineOp):
    """A module computing a linear map with non-negative coefficients (average pooling, a
    permutation, zero padding): exact in every bound method through :class:`NonNegativeLinearMap`."""

    kind = "nonnegative-linear"

    def __init__(self, module: nn.Module, in_shape, kind: str | None = None):
        self.module, self.in_shape = module, tuple(in_shape)
        if kind is not None:
            self.kind = kind

    def affine(self, dtype, values=None) -> AffineMap:
        return NonNegativeLinearMap(self.module, self.in_shape)


class AvgPool2dOp(NonNegativeModuleOp):
    kind = "avgpool2d"


class NormalizeOp(AffineOp):
    kind = "normalize"

    def __init__(self, module: Normalize, in_shape):
        self.module = module
        self.channel_dims = len(in_shape) - 1

    def affine(self, dtype, values=None) -> AffineMap:
        std = self.module.channel_std.to(dtype)
        mean = self.module.channel_mean.to(dtype)
        return ScaleShiftMap(1.0 / std, -mean / std, self.channel_dims)


class BatchNormOp(AffineOp):
    """BatchNorm as a per-channel affine map: running stats in eval mode; in training mode the
    statistics of the clean batch (``values``), as in IBP / CROWN-IBP training."""

    kind = "batchnorm"

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, in_shape):
        self.module = module
        self.channel_dims = len(in_shape) - 1

    def affine(self, dtype, values=None) -> AffineMap:
        m = self.module
        if m.training or not m.track_running_stats:
            if values is None:
                raise UnsupportedOperationError("BatchNorm in training mode needs the clean batch to take statistics from")
            x = values[0].to(dtype)
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
        else:
            mean, var = m.running_mean.to(dtype), m.running_var.to(dtype)
        inv = torch.rsqrt(var + m.eps)
        w = m.weight.to(dtype) if m.affine else torch.ones_like(inv)
        b = m.bias.to(dtype) if m.affine else torch.zeros_like(inv)
        scale = w * inv
        return ScaleShiftMap(scale, b - mean * scale, self.channel_dims)

    def forward(self, x: Tensor) -> Tensor:
        # Functional form: never updates running statistics (bounding must not change the model).
        return self.affine(x.dtype, [x])(x)


class AddOp(AffineOp):
    kind = "add"

    def __init__(self, n: int = 2):
        self.n = n

    def affine(self, dtype, values=None) -> AffineMap:
        return SumMap(self.n)


class ConcatOp(AffineOp):
    kind = "concat"

    def __init__(self, dim: int, sizes: tuple[int, ...]):
        self.dim, self.sizes = dim, sizes

    def affine(self, dtype, values=None) -> AffineMap:
        return ConcatMap(self.dim, self.sizes)


class IdentityOp(AffineOp):
    kind = "identity"

    def __init__(self, shape):
        self.shape = tuple(shape)

    def affine(self, dtype, values=None) -> AffineMap:
        return ReshapeMap(self.shape, self.shape)


# --- registrations -----------------------------------------------------------------------

register_module_op(nn.Linear)(lambda m, ins, out: LinearOp(m))
register_module_op(nn.Conv2d)(lambda m, ins, out: Conv2dOp(m, ins[0]))
register_module_op(nn.Flatten, nn.Unflatten)(lambda m, ins, out: ReshapeOp(ins[0], out))
register_module_op(nn.AvgPool2d)(lambda m, ins, out: AvgPool2dOp(m, ins[0]))
register_module_op(Normalize)(lambda m, ins, out: NormalizeOp(m, ins[0]))
register_module_op(nn.BatchNorm1d, nn.BatchNorm2d)(lambda m, ins, out: BatchNormOp(m, ins[0]))
register_module_op(nn.Identity, nn.Dropout)(lambda m, ins, out: IdentityOp(out))


@register_function_op(torch.flatten, "flatten", "view", "reshape", torch.reshape)
def _reshape(ins, out, args, kwargs):
    return ReshapeOp(ins[0], out)


@register_function_op(operator.add, torch.add, "add")
def _add(ins, out, args, kwargs):
    if len(ins) != 2 or tuple(ins[0]) != tuple(ins[1]) or kwargs.get("alpha", 1) != 1:
        raise UnsupportedOperationError("add is supported between two tensors of the same shape only")
    return AddOp(2)


@register_function_op(torch.cat, torch.concat, "cat")
def _concat(ins, out, args, kwargs):
    """torch.cat of tensors along a per-example dimension (the batch dimension stays first)."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    nd = len(out) + 1
    dim = dim + nd if dim < 0 else dim
    if dim == 0 or not 0 < dim < nd:
        raise UnsupportedOperationError("cat is supported along a per-example dimension only (not the batch)")
    return ConcatOp(dim - 1, tuple(int(s[dim - 1]) for s in ins))


def avg_pool_fn(kernel, stride, padding):  # used by tests of the generic map
    return lambda x: F.avg_pool2d(x, kernel, stride, padding)
