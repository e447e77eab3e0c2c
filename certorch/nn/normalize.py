"""Per-channel input normalization as a module.

Every zoo model starts with :class:`Normalize` so that models take pixels in ``[0, 1]``
and ``eps`` is always measured in pixel space. The bound engine treats ``Normalize`` as a
leaf (an affine, diagonal map), and Lipschitz code reads :attr:`Normalize.std` /
:meth:`Normalize.lipschitz_factor`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from certorch.errors import CertorchError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (dim 1), ``mean`` and ``std`` stored as buffers.

    Buffers have shape ``(C, 1, 1)`` so the module broadcasts over ``(B, C, H, W)`` input.
    For flat input ``(B, D)`` use ``Normalize(..., ndim=1)`` (buffers of shape ``(C,)``);
    zoo models always normalize before flattening.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float, ndim: int = 3) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.numel() != s.numel():
            raise CertorchError(f"Normalize: mean has {m.numel()} channels but std has {s.numel()}")
        if not bool(torch.all(s > 0)):
            raise CertorchError(f"Normalize: std must be positive, got {s.tolist()}")
        if ndim not in (1, 3):
            raise CertorchError(f"Normalize: ndim must be 1 (B,C) or 3 (B,C,H,W), got {ndim}")
        shape = (-1,) + (1,) * (ndim - 1)
        self.register_buffer("mean", m.reshape(shape))
        self.register_buffer("std", s.reshape(shape))

    @property
    def channel_std(self) -> torch.Tensor:
        """Per-channel std as a flat tensor of shape ``(C,)``."""
        return self.std.flatten()

    @property
    def channel_mean(self) -> torch.Tensor:
        """Per-channel mean as a flat tensor of shape ``(C,)``."""
        return self.mean.flatten()

    def lipschitz_factor(self) -> float:
        """L-inf -> L-inf (and L2 -> L2) Lipschitz constant of this map: ``1 / min(std)``."""
        return float(1.0 / self.channel_std.min())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4g}" for v in t.tolist()) + ")"  # noqa: E731
        return f"mean={fmt(self.channel_mean)}, std={fmt(self.channel_std)}"
