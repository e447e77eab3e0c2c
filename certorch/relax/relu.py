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


def parallel_lines(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two parallel lines ``lam z + b_low <= relu(z) <= lam z + b_up`` on ``[l, u]`` (``lam >= 0``),
    for the forward methods (DeepZ, symbolic intervals): the chord's slope, ``b_low = 0``."""
    lam, b_up = upper_line(l, u)
    return lam, torch.zeros_like(b_up), b_up


def backward_lines(l: Tensor, u: Tensor, mode: str = "adaptive") -> tuple[Tensor, Tensor, Tensor, None]:
    """The relaxation in the form backward passes use, each (B, *shape):
    ``(s_low, s_up - s_low, b_up, b_low)``; lower line ``s_low * z + b_low``, upper line
    ``s_up * z + b_up``. ReLU's lower lines pass through 0: ``b_low`` is None (no work)."""
    s_low = lower_slope(l, u, mode)
    s_up, b_up = upper_line(l, u)
    return s_low, s_up - s_low, b_up, None


def needs_bounds(l: Tensor, u: Tensor) -> Tensor:
    """Neurons whose relaxation tightens with tighter pre-activation bounds: the unstable ones."""
    return (l < 0) & (u > 0)


def apply_lines(A: Tensor, s_low: Tensor, ds: Tensor, b_up: Tensor) -> tuple[Tensor, Tensor]:
    """Lower-bound ``A . relu(z)`` by a linear function of z.

    ``A``: (..., n) coefficients with the neurons flattened into the last dim; the lines
    (``backward_lines`` output) laid out to broadcast against A, e.g. (B, 1, n) for dense
    (L, S, n) coefficients. Positive coefficients take the lower line, negative ones the upper:
    ``A+ s_low + A- s_up == A s_low + A- (s_up - s_low)``, one clamp and one fused multiply-add
    (s_up == s_low on stable neurons). Returns (coefficients of z, like A; constant A.shape[:-1]
    broadcast with the lines').
    """
    A_neg = A.clamp(max=0)
    A_new = torch.addcmul(A * s_low, A_neg, ds)
    if A.dim() == 3 and b_up.shape[1] == 1 and A.shape[1] != 1:  # dense: a matmul, no temporary of A's size
        const = (A_neg @ b_up.transpose(1, 2)).squeeze(2)
    else:
        const = (A_neg * b_up).sum(-1)
    return A_new, const


def backward(A: Tensor, l: Tensor, u: Tensor, mode: str = "adaptive") -> tuple[Tensor, Tensor]:
    """Push a lower-bound coefficient ``A`` back through relu.

    ``A``: (B, S, *shape) coefficients of ``relu(z)`` in a quantity to lower-bound;
    ``l``, ``u``: (B, *shape). Returns (coefficients of z (B, S, *shape), constant (B, S)).
    """
    lines = (t.flatten(1).unsqueeze(1) for t in backward_lines(l, u, mode)[:3])
    A_new, const = apply_lines(A.flatten(2), *lines)
    return A_new.view(A_new.shape[:2] + A.shape[2:]), const


def free_lower_lines(s_low: Tensor, ds: Tensor, unstable: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Lines of :func:`backward_lines` form with free lower slopes (alpha-CROWN).

    ``relu(z) >= a * z`` holds for every z when ``0 <= a <= 1``, so on unstable neurons the
    lower slope becomes ``alpha`` clamped to [0, 1]; stable neurons keep their exact line.
    ``s_low``, ``ds``, ``unstable``: the neuron's lines and mask laid out to broadcast against
    ``alpha`` (e.g. (B, 1, n) against per-row slopes (B, S, n)). Returns (s_low, s_up - s_low),
    each of the broadcast shape; the upper line (``s_up``, ``b_up``) is unchanged.
    """
    s = torch.where(unstable, alpha.clamp(0.0, 1.0), s_low)
    return s, s_low + ds - s
