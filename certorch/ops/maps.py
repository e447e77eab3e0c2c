"""Affine maps: the only thing affine ops expose to the bound interpreters.

An affine map is ``v -> L(v) + offset`` with ``L`` linear. Every interpreter (IBP, zonotope,
symbolic intervals, backward/CROWN, MILP) is written against this small interface, so an op
that provides a map gets every bound method for free (DESIGN.md item 5).

Shapes: ``apply``/``apply_abs`` take tensors of shape (M, *in_shape) with any leading M
(batch, or batch x generators flattened) and return (M, *out_shape). ``transpose`` takes
(M, *out_shape) and returns one (M, *in_shape_i) tensor per input (the adjoint / vector-Jacobian
product). ``offset`` is None or a tensor of per-example shape broadcastable to (*out_shape);
offsets never depend on the example.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


#: rows of one map call when a domain maps many rows at once (zonotope generators, symbolic
#: coefficients): a convolution's unfold buffer is (Cin*kh*kw / Cout) times its output, 9x and
#: more, so mapping 3,072 generator rows of a CIFAR conv at once needed 3 GiB beyond its output
ROW_CHUNK_ELEMENTS = 2**23


def map_rows(fn: Callable[..., Tensor], xs: Sequence[Tensor], max_elements: int = ROW_CHUNK_ELEMENTS,
             out_per_row: int = 0) -> Tensor:
    """``fn(*xs)`` for tensors sharing their leading (row) dimension, computed in row chunks of at
    most ``max_elements`` input (and, given ``out_per_row``, output) elements each and written
    into one preallocated output: the temporaries of ``fn`` stay those of one chunk. Works under
    autograd (slice copies). Bounding the output too keeps a widening map's chunk (a first
    convolution, 8x as many outputs as inputs) smaller: ``colt_mnist``'s first conv over 5,000
    projected bfloat16 images took 0.06 s instead of 0.12 s on one CPU thread (the whole
    latent region about 3 % less)."""
    n = xs[0].shape[0]
    per_row = max(1, out_per_row, max(x[0].numel() for x in xs)) if n else 1
    step = max(1, max_elements // per_row)
    if n <= step:
        return fn(*xs)
    first = fn(*(x[:step] for x in xs))
    out = first.new_empty((n, *first.shape[1:]))
    out[:step] = first
    del first
    for i in range(step, n, step):  # loop over memory chunks, not over neurons or examples
        out[i:i + step] = fn(*(x[i:i + step] for x in xs))
    return out


class AffineMap:
    """Base class; subclasses implement ``apply``, ``apply_abs`` and ``transpose``."""

    num_inputs: int = 1
    diagonal: bool = False  # element-wise map (IBP through it is exact)
    monotone: bool = False  # all coefficients >= 0: the map sends lower/upper bounds to lower/upper bounds

    def apply(self, *xs: Tensor) -> Tensor:
        raise NotImplementedError

    def apply_abs(self, *xs: Tensor) -> Tensor:
        """``|L| (x)``: the linear map with absolute coefficients (x is usually >= 0)."""
        raise NotImplementedError

    def transpose(self, A: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def offset(self) -> Tensor | None:
        return None

    def __call__(self, *xs: Tensor) -> Tensor:
        out = self.apply(*xs)
        off = self.offset()
        return out if off is None else out + off

    def to(self, dtype: torch.dtype) -> "AffineMap":
        """The same map with its tensors (weights, biases, scales) in ``dtype``; ``self`` when
        they already are (e.g. to map generators kept in bfloat16, which ``F.conv2d`` needs
        in the weight's dtype)."""
        changes = {}
        for f in dataclasses.fields(self):  # every map is a dataclass
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != dtype:
                changes[f.name] = v.to(dtype)
        return dataclasses.replace(self, **changes) if changes else self


@dataclass
class DenseMap(AffineMap):
    """``x @ W.T + b`` on the last dimension (nn.Linear). W: (out, in), b: (out,) or None."""

    weight: Tensor
    bias: Tensor | None = None

    def apply(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def apply_abs(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.abs())

    def __call__(self, x: Tensor) -> Tensor:  # the bias fused into the matmul
        return F.linear(x, self.weight, self.bias)

    def transpose(self, A: Tensor) -> list[Tensor]:
        return [A @ self.weight]

    def offset(self) -> Tensor | None:
        return self.bias


#: input channels up to which :func:`fold_transpose` may replace ``conv_transpose2d`` (float32, CPU)
FOLD_MAX_IN_CHANNELS = 3
#: at stride 1, :func:`fold_transpose` only when the conv has at least this many output channels
#: per input channel
FOLD_STRIDE1_CHANNEL_RATIO = 16


def fold_preferred(weight: Tensor, stride: tuple[int, int]) -> bool:
    """Whether :func:`fold_transpose` beats ``conv_transpose2d`` for this conv's shape (float32,
    CPU): torch 2.13's oneDNN kernel is slow for few input channels (the adjoint's outputs), but
    the fold's column buffer (``Cin * kh * kw`` per output position) costs more than it saves at
    stride 1 unless the conv has many output channels. Measured on one thread, 400 rows, adjoint
    only (fold / conv_transpose2d, ms): stride 2: 1 -> 32 k5 16.8 / 55.9, 3 -> 8 k4 33.6 / 34.5,
    3 -> 16 k3 19.4 / 27.5, 3 -> 32 k4 37.9 / 55.1; stride 1: 1 -> 32 k3 29.5 / 58.8, 3 -> 64 k3
    123.8 / 185.0, but 3 -> 16 k3 80.2 / 37.2, 3 -> 32 k3 (colt_cifar) 100.6 / 75.0, 2 -> 16 k3
    41.4 / 28.2, 1 -> 4 k3 17.6 / 14.8."""
    cout, cin = weight.shape[:2]
    if cin > FOLD_MAX_IN_CHANNELS:
        return False
    return min(stride) >= 2 or cout >= FOLD_STRIDE1_CHANNEL_RATIO * cin


def use_fold_transpose(A: Tensor, weight: Tensor, stride: tuple[int, int]) -> bool:
    """Whether the adjoint of A through this conv takes :func:`fold_transpose`: float32 on CPU
    with a shape where it is faster (:func:`fold_preferred`). float64 has no oneDNN kernel and
    is as fast either way; other devices keep ``conv_transpose2d``."""
    return (A.device.type == "cpu" and A.dtype == torch.float32 and weight.dtype == torch.float32
            and fold_preferred(weight, stride))


def fold_transpose(A: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int], in_hw: tuple[int, int]) -> Tensor:
    """Adjoint of ``conv2d(., weight, stride, padding, dilation)`` (groups 1) on an input of
    spatial size ``in_hw``: (M, Cout, h, w) -> (M, Cin, H, W), the same values as
    ``conv_transpose2d`` with the output padding that restores ``in_hw``. One batched matmul
    gives every kernel position's contribution (M, Cin * kh * kw, h * w) and ``F.fold`` adds them
    up at their input positions (``fold`` with the conv's padding drops the padded border, and
    ``in_hw`` fixes the output size where the stride leaves it ambiguous)."""
    M, C, h, w = A.shape
    kh, kw = weight.shape[-2:]
    cols = torch.matmul(weight.reshape(C, -1).t(), A.reshape(M, C, h * w))
    return F.fold(cols, in_hw, (kh, kw), dilation=dilation, padding=padding, stride=stride)


@dataclass
class ConvMap(AffineMap):
    """2-d convolution (nn.Conv2d, groups=1). weight: (Cout, Cin, kh, kw)."""

    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_shape: tuple[int, int, int]  # (Cin, H, W)

    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

    def apply(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight)

    def apply_abs(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight.abs())

    def __call__(self, x: Tensor) -> Tensor:  # the bias fused into the convolution
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def transpose(self, A: Tensor) -> list[Tensor]:
        """Adjoint: (M, Cout, h, w) -> (M, Cin, H, W). A pointwise (1x1, stride 1, no padding)
        conv is a channel matmul, much faster on CPU than ``conv_transpose2d``; so is, in float32
        on CPU, a conv with few input channels (:func:`fold_transpose`)."""
        kh, kw = self.weight.shape[-2:]
        if (kh, kw) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            M, C, h, w = A.shape
            W = self.weight.view(C, -1)
            return [torch.matmul(W.t(), A.reshape(M, C, h * w)).view(M, W.shape[1], h, w)]
        _, H, W = self.in_shape
        if use_fold_transpose(A, self.weight, self.stride):
            return [fold_transpose(A, self.weight, self.stride, self.padding, self.dilation, (H, W))]
        out_h, out_w = A.shape[-2:]
        op = []
        for size, o, s, p, d, k in zip((H, W), (out_h, out_w), self.stride, self.padding, self.dilation, (kh, kw)):
            op.append(size - ((o - 1) * s - 2 * p + d * (k - 1) + 1))
        return [F.conv_transpose2d(A, self.weight, None, self.stride, self.padding, tuple(op), 1, self.dilation)]

    def offset(self) -> Tensor | None:
        return None if self.bias is None else self.bias.view(-1, 1, 1)


@dataclass
class ScaleShiftMap(AffineMap):
    """Per-channel ``x * scale + shift`` (Normalize, eval BatchNorm). scale/shift: (C,).

    ``channel_dims`` is the number of dims after the channel dim (2 for images, 0 for vectors).
    """

    scale: Tensor
    shift: Tensor | None
    channel_dims: int
    diagonal = True

    def _view(self, t: Tensor) -> Tensor:
        return t.view(-1, *([1] * self.channel_dims))

    def apply(self, x: Tensor) -> Tensor:
        return x * self._view(self.scale)

    def apply_abs(self, x: Tensor) -> Tensor:
        return x * self._view(self.scale.abs())

    def transpose(self, A: Tensor) -> list[Tensor]:
        return [A * self._view(self.scale)]

    def offset(self) -> Tensor | None:
        return None if self.shift is None else self._view(self.shift)


@dataclass
class ReshapeMap(AffineMap):
    """Reshape per example (Flatten, view). Shapes exclude the batch dim."""

    monotone = True

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    diagonal = True

    def apply(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def apply_abs(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def transpose(self, A: Tensor) -> list[Tensor]:
        return [A.reshape(A.shape[0], *self.in_shape)]


@dataclass
class SumMap(AffineMap):
    """Sum of ``num_inputs`` same-shape inputs (residual Add)."""

    monotone = True

    num_inputs: int = 2

    def apply(self, *xs: Tensor) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    def apply_abs(self, *xs: Tensor) -> Tensor:
        return self.apply(*xs)

    def transpose(self, A: Tensor) -> list[Tensor]:
        return [A] * self.num_inputs


@dataclass
class ConcatMap(AffineMap):
    """Concatenation of the inputs along per-example dimension ``dim`` (ONNX Concat, torch.cat):
    a 0/1 map, so every bound method is exact through it. ``sizes``: each input's extent along
    ``dim``."""

    dim: int
    sizes: tuple[int, ...]
    monotone = True

    @property
    def num_inputs(self) -> int:  # type: ignore[override]
        return len(self.sizes)

    def apply(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=self.dim + 1)

    def apply_abs(self, *xs: Tensor) -> Tensor:
        return self.apply(*xs)

    def transpose(self, A: Tensor) -> list[Tensor]:
        return list(torch.split(A, list(self.sizes), dim=self.dim + 1))


@dataclass
class NonNegativeLinearMap(AffineMap):
    """A linear map with non-negative coefficients given as a function (e.g. AvgPool2d).

    The transpose is the vector-Jacobian product of ``fn`` (exact for linear ``fn``).
    """

    monotone = True

    fn: Callable[[Tensor], Tensor]
    in_shape: tuple[int, ...]

    def apply(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def apply_abs(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def transpose(self, A: Tensor) -> list[Tensor]:
        zeros = torch.zeros(A.shape[0], *self.in_shape, dtype=A.dtype, device=A.device)
        _, vjp = torch.func.vjp(self.fn, zeros)
        return [vjp(A)[0]]
