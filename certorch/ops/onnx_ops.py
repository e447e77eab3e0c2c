"""Modules of imported ONNX networks: :class:`OnnxNetwork` (the graph as a plan over named
layers) and the element-wise affine module ``x * scale + shift``.

ONNX graphs express normalization and constant bias as ``Sub``/``Div``/``Mul``/``Add`` with
constant tensors (per channel, per element or scalar). :class:`ElementwiseAffine` is the one
module the ONNX importer emits for all of them (and for folded ``BatchNormalization``). It is
registered with the op registry as a diagonal affine map, so every bound method, the MILP and
the graph capture support it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from certorch.errors import CertorchError, UnsupportedOperationError
from certorch.ops.base import AffineOp
from certorch.ops.affine import NonNegativeModuleOp
from certorch.ops.maps import AffineMap
from certorch.ops.registry import register_module_op

__all__ = ["ElementwiseAffine", "ElementwiseAffineMap", "ElementwiseAffineOp", "OnnxNetwork", "Permute"]


class Permute(nn.Module):
    """Permute the per-example dimensions (ONNX ``Transpose`` with the batch kept first, e.g. an
    NHWC input to NCHW): ``dims`` is a permutation of ``range(example ndim)``.
    Input (B, *shape) -> (B, *[shape[d] for d in dims])."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        if sorted(dims) != list(range(len(dims))):
            raise CertorchError(f"Permute: {list(dims)} is not a permutation of 0..{len(dims) - 1}")
        self.dims = tuple(int(d) for d in dims)

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, *(d + 1 for d in self.dims))

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class ElementwiseAffine(nn.Module):
    """``x * scale + shift`` with constant tensors broadcastable to one example's shape.

    ``scale``/``shift``: tensors whose shape broadcasts to ``(*example_shape)`` without growing
    it (e.g. ``()``, ``(C, 1, 1)``, ``(C, H, W)``); ``None`` means 1 / 0. Stored as buffers.
    Input (B, *example_shape) -> output of the same shape.
    """

    scale: Tensor | None
    shift: Tensor | None

    def __init__(self, scale: Tensor | None = None, shift: Tensor | None = None) -> None:
        super().__init__()
        for name, t in (("scale", scale), ("shift", shift)):
            if t is not None and (not isinstance(t, Tensor) or not bool(torch.isfinite(t).all())):
                raise CertorchError(f"ElementwiseAffine: {name} must be a finite tensor")
        self.register_buffer("scale", None if scale is None else scale.detach().clone())
        self.register_buffer("shift", None if shift is None else shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.scale is not None:
            x = x * self.scale
        if self.shift is not None:
            x = x + self.shift
        return x

    def extra_repr(self) -> str:
        shp = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        return f"scale={shp(self.scale)}, shift={shp(self.shift)}"


class OnnxNetwork(nn.Module):
    """An imported ONNX graph: named submodules in ``layers`` evaluated in topological order.

    ``plan`` is a list of steps ``(out_name, key, in_names)``; ``key`` names a module in
    ``layers`` or is ``"+"`` (sum of two same-shape tensors) or ``"concat:<axis>"``. Plain Python control flow over a
    constant plan, so ``torch.fx`` (certorch's graph capture) traces it into a flat graph.
    Input (B, *input_shape) -> output (B, *output_shape).
    """

    def __init__(self, layers: dict[str, nn.Module], plan: list[tuple[str, str, tuple[str, ...]]], input_name: str, output_name: str):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.plan = [(o, k, tuple(i)) for o, k, i in plan]
        self.input_name = input_name
        self.output_name = output_name

    def forward(self, x: Tensor) -> Tensor:
        env = {self.input_name: x}
        for out, key, ins in self.plan:
            if key == "+":
                env[out] = env[ins[0]] + env[ins[1]]
            elif key.startswith("concat:"):  # concatenation along a per-example axis
                env[out] = torch.cat([env[i] for i in ins], dim=int(key[7:]))
            else:
                env[out] = self.layers[key](env[ins[0]])
        return env[self.output_name]


@dataclass
class ElementwiseAffineMap(AffineMap):
    """Diagonal map ``v -> v * scale + shift``; scale/shift broadcast to one example's shape."""

    scale: Tensor | None
    shift: Tensor | None
    diagonal = True

    def apply(self, x: Tensor) -> Tensor:
        return x if self.scale is None else x * self.scale

    def apply_abs(self, x: Tensor) -> Tensor:
        return x if self.scale is None else x * self.scale.abs()

    def transpose(self, A: Tensor) -> list[Tensor]:
        return [self.apply(A)]

    def offset(self) -> Tensor | None:
        return self.shift


class ElementwiseAffineOp(AffineOp):
    kind = "elementwise_affine"

    def __init__(self, module: ElementwiseAffine, in_shape, out_shape):
        if tuple(in_shape) != tuple(out_shape):
            raise CertorchError(
                f"ElementwiseAffine must keep the shape: input {tuple(in_shape)} became {tuple(out_shape)}"
            )
        self.module = module

    def affine(self, dtype, values=None) -> AffineMap:
        m = self.module
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return ElementwiseAffineMap(cast(m.scale), cast(m.shift))


register_module_op(ElementwiseAffine)(lambda m, ins, out: ElementwiseAffineOp(m, ins[0], out))


def _zero_pad(m: nn.ConstantPad2d, ins, out) -> AffineOp:
    if float(m.value) != 0.0:
        raise UnsupportedOperationError(f"constant padding with value {m.value} is not supported (zero padding only)")
    return NonNegativeModuleOp(m, ins[0], "zeropad2d")


register_module_op(Permute)(lambda m, ins, out: NonNegativeModuleOp(m, ins[0], "permute"))
register_module_op(nn.ZeroPad2d, nn.ConstantPad2d)(_zero_pad)
