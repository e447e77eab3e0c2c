"""Relaxations of S-shaped activations (Sigmoid, Tanh): convex on z <= 0, concave on z >= 0.

The protocol every relaxation module follows (see :mod:`certorch.relax.relu`, the reference):
``fn``, ``interval(box)``, ``backward_lines(l, u, mode) -> (s_low, s_up - s_low, b_up, b_low)``
(lower line ``s_low z + b_low``, upper ``s_up z + b_up``, valid on ``[l, u]``), ``apply_lines``,
``backward`` and ``needs_bounds(l, u)`` (which neurons profit from tighter pre-activation bounds).
``parallel_lines(l, u) -> (lam, b_low, b_up)`` serves the forward methods (zonotope / DeepZ,
symbolic intervals). LP / MILP constraints are not provided yet: the verifier's LP / MILP stages
skip such networks.

Lines on ``[l, u]`` (CROWN, Zhang et al. 2018, with the tangent points found by bisection):

* ``u <= 0`` (convex part): upper = the chord; lower = the tangent at the midpoint.
* ``l >= 0`` (concave part): lower = the chord; upper = the tangent at the midpoint.
* ``l < 0 < u``: upper = the line through ``(l, f(l))`` with slope ``k = max_{z in (l, u]}
  (f(z) - f(l)) / (z - l)``: the chord if the chord lies above f, else the tangent from
  ``(l, f(l))`` touching f at ``d* in [0, u]``; lower = symmetric, through ``(u, f(u))``.
  Bisection keeps a point on the safe side of ``d*`` (``f'`` decreases on ``[0, inf)``, so
  ``f'(d) >= f'(d*)`` for ``d <= d*``): fewer iterations give a looser line, never an unsound one.
* ``l == u`` (degenerate box): the tangent at ``l`` for both (exact at the only point).

Soundness holds up to float rounding of ``f`` (about one ulp of the output); tests check
it under dense sampling in float64, including saturated and zero-width boxes.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
from torch import Tensor

from certorch.domains.box import Box
from certorch.relax.relu import apply_lines as _apply_relu_lines

BISECTION_STEPS = 30


def _tangent(f, df, d: Tensor) -> tuple[Tensor, Tensor]:
    k = df(d)
    return k, f(d) - k * d


def _chord(f, l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    w = u - l
    safe = torch.where(w > 0, w, torch.ones_like(w))
    k = torch.where(w > 0, (f(u) - f(l)) / safe, torch.zeros_like(w))
    return k, f(l) - k * l


def _anchored_slope(f, df, anchor: Tensor, far: Tensor, upper: bool) -> Tensor:
    """Slope of a line through ``(anchor, f(anchor))`` bounding f on the segment to ``far``
    (upper: anchor = l < 0 < far = u; lower: anchor = u > 0 > far = l); see module doc."""
    fa = f(anchor)
    sign = 1.0 if upper else -1.0

    def gap(d: Tensor) -> Tensor:  # >= 0 on the anchor's side of the tangent point
        return sign * (df(d) * (d - anchor) - (f(d) - fa))

    chord_ok = gap(far) >= 0  # the tangent point lies beyond the segment: the chord is the line
    near, beyond = torch.zeros_like(far), far.clone()  # gap(0) >= 0 by convexity / concavity
    for _ in range(BISECTION_STEPS):
        mid = (near + beyond) / 2
        ok = gap(mid) >= 0
        near = torch.where(ok, mid, near)
        beyond = torch.where(ok, beyond, mid)
    w = far - anchor
    chord = (f(far) - fa) / torch.where(w != 0, w, torch.ones_like(w))
    return torch.where(chord_ok, chord, df(near))


def make(fn: Callable[[Tensor], Tensor], dfn: Callable[[Tensor], Tensor], name: str) -> SimpleNamespace:
    """The relaxation namespace of an S-shaped ``fn`` with derivative ``dfn``."""

    def interval(box: Box) -> Box:
        return Box(fn(box.lower), fn(box.upper))

    def lines(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(lower slope, lower intercept, upper slope, upper intercept), each like l."""
        mid = (l + u) / 2
        kt, bt = _tangent(fn, dfn, mid)
        kc, bc = _chord(fn, l, u)
        kl, bl = _tangent(fn, dfn, l)
        neg, pos = u <= 0, l >= 0
        mixed = ~(neg | pos)
        # mixed case, anchored lines (clamped inputs keep the unused branches finite)
        lm = torch.where(mixed, l, -torch.ones_like(l))
        um = torch.where(mixed, u, torch.ones_like(u))
        k_up = _anchored_slope(fn, dfn, lm, um, upper=True)
        k_lo = _anchored_slope(fn, dfn, um, lm, upper=False)
        b_up_m, b_lo_m = fn(lm) - k_up * lm, fn(um) - k_lo * um
        s_low = torch.where(neg, kt, torch.where(pos, kc, k_lo))
        b_low = torch.where(neg, bt, torch.where(pos, bc, b_lo_m))
        s_up = torch.where(neg, kc, torch.where(pos, kt, k_up))
        b_up = torch.where(neg, bc, torch.where(pos, bt, b_up_m))
        flat = u <= l  # zero-width box: the tangent at the point, both sides
        return (torch.where(flat, kl, s_low), torch.where(flat, bl, b_low),
                torch.where(flat, kl, s_up), torch.where(flat, bl, b_up))

    def backward_lines(l: Tensor, u: Tensor, mode: str = "adaptive"):
        s_low, b_low, s_up, b_up = lines(l, u)
        return s_low, s_up - s_low, b_up, b_low

    def backward(A: Tensor, l: Tensor, u: Tensor, mode: str = "adaptive") -> tuple[Tensor, Tensor]:
        ls = (t.flatten(1).unsqueeze(1) for t in backward_lines(l, u, mode))
        A_new, const = apply_lines(A.flatten(2), *ls)
        return A_new.view(A_new.shape[:2] + A.shape[2:]), const

    def needs_bounds(l: Tensor, u: Tensor) -> Tensor:
        return torch.ones_like(l, dtype=torch.bool)  # every neuron's lines tighten with its bounds

    def parallel_lines(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """DeepZ's (Singh et al. 2018): slope ``lam = min(f'(l), f'(u))``, the smallest slope of f
        on [l, u] (f' is unimodal), so ``f - lam z`` is non-decreasing: ``b_low = f(l) - lam l``,
        ``b_up = f(u) - lam u``."""
        lam = torch.minimum(dfn(l), dfn(u))
        return lam, fn(l) - lam * l, fn(u) - lam * u

    return SimpleNamespace(name=name, fn=fn, interval=interval, lines=lines, backward_lines=backward_lines,
                           apply_lines=apply_lines, backward=backward, needs_bounds=needs_bounds, parallel_lines=parallel_lines, deepz=None)


def apply_lines(A: Tensor, s_low: Tensor, ds: Tensor, b_up: Tensor, b_low: Tensor | None = None):
    """:func:`certorch.relax.relu.apply_lines` with a lower intercept ``b_low``:
    ``A+ (s_low z + b_low) + A- (s_up z + b_up) = A s_low z + A- ds z + A b_low + A- (b_up - b_low)``."""
    if b_low is None:
        return _apply_relu_lines(A, s_low, ds, b_up)
    A_new, const = _apply_relu_lines(A, s_low, ds, b_up - b_low)
    return A_new, const + (A * b_low).sum(-1)


def _dsigmoid(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _dtanh(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return 1 - t * t


sigmoid = make(torch.sigmoid, _dsigmoid, "sigmoid")
tanh = make(torch.tanh, _dtanh, "tanh")
