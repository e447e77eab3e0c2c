"""The one Box (interval) type of certorch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Box:
    """Element-wise interval ``lower <= v <= upper``; both tensors share one shape.

    A bound is a returned value: nothing is ever stored on modules.
    """

    lower: Tensor
    upper: Tensor

    @staticmethod
    def from_center_radius(center: Tensor, radius: Tensor) -> "Box":
        return Box(center - radius, center + radius)

    @staticmethod
    def point(x: Tensor) -> "Box":
        return Box(x, x)

    @property
    def center(self) -> Tensor:
        return (self.upper + self.lower) * 0.5

    @property
    def radius(self) -> Tensor:
        return (self.upper - self.lower) * 0.5

    @property
    def shape(self) -> torch.Size:
        return self.lower.shape

    def to(self, *args, **kwargs) -> "Box":
        return Box(self.lower.to(*args, **kwargs), self.upper.to(*args, **kwargs))

    def intersect(self, other: "Box") -> "Box":
        return Box(torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper))

    def contains(self, v: Tensor, tol: float = 0.0) -> Tensor:
        """Bool tensor, per element: ``lower - tol <= v <= upper + tol``."""
        return (v >= self.lower - tol) & (v <= self.upper + tol)

    def __getitem__(self, idx) -> "Box":
        return Box(self.lower[idx], self.upper[idx])
