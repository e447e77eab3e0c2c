"""The LeakyReLU relaxation ``f(z) = max(z, a z)`` with ``0 <= a <= 1`` (convex, piecewise linear).

Same protocol as :mod:`certorch.relax.relu` (its special case ``a = 0``): on an unstable
neuron (``l < 0 < u``) the upper line is the chord, the lower line any ``s z`` with
``a <= s <= 1`` (``adaptive``: 1 if ``u > -l`` else ``a``; ``parallel``: the chord's slope;
``zero``: ``a``; alpha-CROWN optimises it in ``[a, 1]``); stable neurons are exact. The forward
methods use the chord and the parallel line through the kink. LP / MILP constraints are not
provided yet: the verifier's LP / MILP stages skip such networks.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from certorch.domains.box import Box
from certorch.errors import CertorchError
from certorch.relax import relu as relu_relax


def make(a: float) -> SimpleNamespace:
    """The relaxation namespace of LeakyReLU with negative slope ``a``."""
    a = float(a)
    if not 0.0 <= a <= 1.0:
        raise CertorchError(f"LeakyReLU relaxations need a negative slope in [0, 1], got {a}")

    def fn(z: Tensor) -> Tensor:
        return torch.nn.functional.leaky_relu(z, a)

    def interval(box: Box) -> Box:
        return Box(fn(box.lower), fn(box.upper))

    def upper_line(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        active, inactive, unstable = relu_relax.masks(l, u)
        w = torch.where(unstable, u - l, torch.ones_like(u))
        s = torch.where(unstable, (u - a * l) / w, torch.where(active, torch.ones_like(u), torch.full_like(u, a)))
        return s, torch.where(unstable, (a - s) * l, torch.zeros_like(l))

    def lower_slope(l: Tensor, u: Tensor, mode: str = "adaptive") -> Tensor:
        active, inactive, unstable = relu_relax.masks(l, u)
        if mode == "adaptive":
            s_un = torch.where(u > -l, torch.ones_like(u), torch.full_like(u, a))
        elif mode == "parallel":
            s_un = upper_line(l, u)[0]
        elif mode == "zero":
            s_un = torch.full_like(u, a)
        else:
            raise ValueError(f"unknown lower slope {mode!r}; valid: {', '.join(relu_relax.LOWER_SLOPES)}")
        return torch.where(unstable, s_un, torch.where(active, torch.ones_like(u), torch.full_like(u, a)))

    def backward_lines(l: Tensor, u: Tensor, mode: str = "adaptive"):
        s_low = lower_slope(l, u, mode)
        s_up, b_up = upper_line(l, u)
        return s_low, s_up - s_low, b_up, None

    def backward(A: Tensor, l: Tensor, u: Tensor, mode: str = "adaptive") -> tuple[Tensor, Tensor]:
        s_low, ds, b_up, _ = backward_lines(l, u, mode)
        ls = (t.flatten(1).unsqueeze(1) for t in (s_low, ds, b_up))
        A_new, const = relu_relax.apply_lines(A.flatten(2), *ls)
        return A_new.view(A_new.shape[:2] + A.shape[2:]), const

    def needs_bounds(l: Tensor, u: Tensor) -> Tensor:
        return (l < 0) & (u > 0)

    def parallel_lines(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Chord slope ``lam`` in [a, 1]; ``f - lam z`` is convex with its minimum 0 at the kink."""
        lam, b_up = upper_line(l, u)
        return lam, torch.zeros_like(b_up), b_up

    def free_lower_lines(s_low: Tensor, ds: Tensor, unstable: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """alpha-CROWN's free lower slope: any ``s`` in ``[a, 1]`` gives a valid line ``s z``."""
        s = torch.where(unstable, alpha.clamp(a, 1.0), s_low)
        return s, s_low + ds - s

    return SimpleNamespace(name="leaky_relu", negative_slope=a, fn=fn, interval=interval, upper_line=upper_line,
                           lower_slope=lower_slope, backward_lines=backward_lines, apply_lines=relu_relax.apply_lines,
                           backward=backward, needs_bounds=needs_bounds, masks=relu_relax.masks, parallel_lines=parallel_lines,
                           free_lower_lines=free_lower_lines, deepz=None)
