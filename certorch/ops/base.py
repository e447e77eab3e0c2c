"""Op base classes. An op is a pure description of one graph node's computation.

* :class:`AffineOp` exposes only :meth:`AffineOp.affine`, its affine map (ops/maps.py).
* :class:`ActivationOp` is element-wise and carries a relaxation object (relax/).
Ops read module parameters at call time (never copies), so bounds stay differentiable
w.r.t. the live parameters; ``dtype`` casts parameters on the fly (float64 certification).
"""
from __future__ import annotations

from torch import Tensor

from certorch.ops.maps import AffineMap


class Op:
    kind: str = "op"

    def forward(self, *xs: Tensor) -> Tensor:
        raise NotImplementedError


class InputOp(Op):
    kind = "input"


class AffineOp(Op):
    kind = "affine"

    def affine(self, dtype, values: list[Tensor] | None = None) -> AffineMap:
        """The op's affine map. ``values``: the clean inputs of this node (used by train-mode BatchNorm)."""
        raise NotImplementedError

    def forward(self, *xs: Tensor) -> Tensor:
        return self.affine(xs[0].dtype, list(xs))(*xs)


class ActivationOp(Op):
    """Element-wise nonlinearity ``y = f(x)`` with a relaxation object (see certorch.relax)."""

    kind = "activation"
    relaxation = None

    def forward(self, x: Tensor) -> Tensor:
        return self.relaxation.fn(x)
