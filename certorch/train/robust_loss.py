"""Robust cross-entropy bounds: upper bounds of ``max_{x' in ball} CE(f(x'), y)``.

Two bounds of the same quantity, one place:

* :func:`robust_cross_entropy` -- from margin lower bounds ``L_j <= z_y - z_j`` (K-1 spec rows):
  ``CE <= log(1 + sum_j exp(-L_j))`` (Wong & Kolter 2018; Gowal et al. 2018).
* :func:`fused_cross_entropy_bound` -- *loss fusion*: bound ``sum_j exp(z_j - z_y)`` itself with
  one spec row per example. With ``d_j = z_j - z_y`` in ``[lo_j, hi_j]`` (IBP bounds of the
  margins) and the shift ``s = max(0, max_j hi_j)``, each ``exp(d_j - s)`` lies under its chord
  ``a_j d_j + b_j`` on ``[lo_j - s, hi_j - s]`` (exp is convex), so
  ``sum_j exp(d_j - s) <= -sum_j a_j m_j + sum_j (b_j - a_j s)`` with the margins ``m_j = -d_j``,
  and a lower bound of the single row ``sum_j a_j m_j`` from any bound method gives the sum's upper
  bound. It is intersected with the IBP one, ``sum_j exp(hi_j - s)`` (both are sound), and
  ``CE <= s + log(exp(-s) + sum)``. One backward row instead of K-1 is what makes CROWN-IBP's
  training step cheap (the idea of auto_LiRPA's loss fusion; written from the math above). The
  two bounds are different, neither is always tighter; both upper-bound the loss at every point
  of the ball (tests/unit/test_robust_loss.py samples and attacks them).

Shapes: ``lower`` (B, K-1), ``y`` (B,); the fused bound returns per-example values (B,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import certorch.bounds as bounds
from certorch.spec import margin_matrix


def robust_cross_entropy(lower: Tensor, y: Tensor) -> Tensor:
    """CE of the worst-case logits: ``lower`` (B, K-1) margin lower bounds -> scalar loss."""
    z = torch.cat([torch.zeros_like(lower[:, :1]), -lower], dim=1)
    return F.cross_entropy(z, torch.zeros_like(y))


def exp_chord(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Slope and intercept of the chord of ``exp`` on ``[lo, hi]`` (elementwise, lo <= hi <= 0
    keeps it finite): ``exp(t) <= a t + b`` there. Stable for ``hi - lo`` -> 0 (``a -> exp(hi)``)
    and for widths where ``exp(hi - lo)`` overflows."""
    w = (hi - lo).clamp(min=0)
    ratio = torch.where(w > 1e-12, -torch.expm1(-w) / w.clamp(min=1e-12), 1 - w / 2)  # in (0, 1]
    a = torch.exp(hi) * ratio  # (e^hi - e^lo) / (hi - lo), finite for any width
    return a, torch.exp(lo) - a * lo


def fused_cross_entropy_bound(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str = "crown-ibp", *,
                              ibp: bounds.BoundResult | None = None, **bound_kwargs) -> tuple[Tensor, Tensor]:
    """Per-example upper bound (B,) of the cross-entropy over the eps-ball, by loss fusion (see the
    module docstring), and the IBP margin lower bounds (B, K-1) it used (for metrics).

    ``method``: the bound of the fused row (any method of the engine); ``ibp``: IBP margin
    bounds already computed (lower and upper) for this batch; ``bound_kwargs`` go to
    :func:`certorch.bounds.bound` (projections, dtype, ...).
    """
    if ibp is None:
        ibp = bounds.bound(model, x, eps, method="ibp", y=y, upper=True, dtype=bound_kwargs.get("dtype"))
    m_lo, m_up = ibp.lower, ibp.upper  # margins z_y - z_j, (B, K-1)
    d_lo, d_hi = -m_up, -m_lo  # d_j = z_j - z_y
    s = d_hi.amax(1, keepdim=True).clamp(min=0)
    ibp_sum = torch.exp(d_hi - s).sum(1)
    if method == "ibp":
        total = ibp_sum
    else:
        a, b = exp_chord(d_lo - s, d_hi - s)  # (B, K-1)
        C = margin_matrix(y, ibp.lower.shape[1] + 1).to(a.dtype)  # (B, K-1, K)
        row = torch.einsum("bj,bjk->bk", a, C).unsqueeze(1)  # sum_j a_j (e_y - e_j): (B, 1, K)
        low = bounds.bound(model, x, eps, method=method, C=row, upper=False, **bound_kwargs).lower[:, 0]
        chord_sum = -low + (b - a * s).sum(1)
        total = torch.minimum(chord_sum, ibp_sum)
    s = s.squeeze(1)
    loss = s + torch.log(torch.exp(-s) + total.clamp(min=0))
    return loss, m_lo
