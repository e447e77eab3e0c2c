"""The ReLU relaxation: one object shared by every bound method (DESIGN.md item 3).

Given pre-activation bounds ``l <= z <= u`` (element-wise), it provides:

* the upper line ``relu(z) <= up_slope * z + up_bias`` (the triangle's chord; exact when stable),
* lower lines ``relu(z) >= low_slope * z`` with slope choice ``adaptive`` (CROWN: 1 if u > -l
  else 0), ``parallel`` (u/(u-l), Wong & Kolter / DeepZ / MixTrain), or ``zero``,
* the DeepZ form ``relu(z) in lam*z + mu +- mu`` (``lam = u/(u-l)``, ``mu = -lam*l/2``),
* interval bounds, and (for LP/MILP) the triangle constraints and big-M data derive from the same
  ``l``, ``u`` and ``up_slope``/``up_bias``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from certorch.domains.box import Box

LOWER_SLOPES = ("adaptive", "parallel", "zero")


def fn(x: Tensor) -> Tensor:
    return torch.relu(x)


def interval(box: Box) -> Box:
    return Box(torch.relu(box.lower), torch.relu(box.upper))


def masks(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(active, inactive, unstable) boolean masks."""
    active = l >= 0
    inactive = u <= 0
    return active, inactive, ~(active | inactive)


def chord_slope(l: Tensor, u: Tensor) -> Tensor:
    """``u / (u - l)`` on unstable neurons, 1 on active, 0 on inactive."""
    active, inactive, unstable = masks(l, u)
    denom = torch.where(unstable, u - l, torch.ones_like(u))
    return torch.where(unstable, u / denom, active.to(u.dtype))


def upper_line(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Slope and intercept of the upper relaxation ``relu(z) <= s*z + b``."""
    s = chord_slope(l, u)
    _, _, unstable = masks(l, u)
    b = torch.where(unstable, -s * l, torch.zeros_like(l))
    return s, b


def lower_slope(l: Tensor, u: Tensor, mode: str = "adaptive") -> Tensor:
    """Slope of the lower relaxation ``relu(z) >= s*z`` (intercept 0)."""
    active, inactive, unstable = masks(l, u)
    if mode == "adaptive":
        s_unstable = (u > -l).to(u.dtype)
    elif mode == "parallel":
        s_unstable = chord_slope(l, u)
    elif mode == "zero":
        s_unstable = torch.zeros_like(u)
    else:
        raise ValueError(f"unknown lower slope {mode!r}; valid: {', '.join(LOWER_SLOPES)}")
    return torch.where(unstable, s_unstable, active.to(u.dtype))


def deepz(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """DeepZ transformer: ``relu(z) in lam*z + mu + mu*e``, e in [-1, 1]. Returns (lam, mu)."""
    lam = chord_slope(l, u)
    _, _, unstable = masks(l, u)
    mu = torch.where(unstable, -lam * l / 2, torch.zeros_like(l))
    return lam, mu


def backward(A: Tensor, l: Tensor, u: Tensor, mode: str = "adaptive") -> tuple[Tensor, Tensor]:
    """Push a lower-bound coefficient ``A`` back through relu.

    ``A``: (B, S, *shape) coefficients of ``relu(z)`` in a quantity to lower-bound;
    ``l``, ``u``: (B, *shape). Returns (coefficients of z (B, S, *shape), constant (B, S)).
    Positive coefficients take the lower line, negative ones the upper line.
    """
    s_low = lower_slope(l, u, mode)
    s_up, b_up = upper_line(l, u)
    # A+ s_low + A- s_up == A s_low + A- (s_up - s_low): one clamp and one fused multiply-add
    # (s_up == s_low on stable neurons, so only unstable ones see the second term).
    A_neg = A.clamp(max=0)
    A_new = torch.addcmul(A * s_low.unsqueeze(1), A_neg, (s_up - s_low).unsqueeze(1))
    const = A_neg.flatten(2) @ b_up.flatten(1).unsqueeze(2)
    return A_new, const.squeeze(2)
