"""Threat model and specification, shared by attacks, bounds and verification.

* :func:`linf_ball` builds the validated input set: the L-inf ball of radius ``eps``
  around ``x``, intersected with the data box ``[lo, hi]`` (pixels are in [0, 1]).
* :func:`margin_matrix` builds the output spec ``C`` with rows ``e_y - e_j`` (j != y),
  so ``C @ logits`` are the margins ``logit[y] - logit[j]``; the property holds when all
  margins are > 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from certorch.domains.box import Box
from certorch.errors import CertorchError


def check_eps(eps: float | Tensor, max_eps: float | None = 1.0) -> None:
    """Raise a one-line error unless ``0 <= eps <= max_eps`` and finite."""
    values = eps.detach().flatten().tolist() if isinstance(eps, Tensor) else [float(eps)]
    for e in values:
        if not math.isfinite(e):
            raise CertorchError(f"eps must be a finite number, got {e}")
        if e < 0:
            raise CertorchError(f"eps must be >= 0, got {e}")
        if max_eps is not None and e > max_eps:
            raise CertorchError(f"eps must be <= {max_eps} (inputs are pixels in [0, 1]), got {e}")


def check_finite(x: Tensor, what: str = "input") -> None:
    if not torch.isfinite(x).all():
        raise CertorchError(f"{what} contains NaN or infinite values")


def linf_ball(x: Tensor, eps: float | Tensor, lo: float | Tensor = 0.0, hi: float | Tensor = 1.0) -> Box:
    """Validated input box ``[max(x - eps, lo), min(x + eps, hi)]``.

    ``x``: (B, *input_shape). ``eps``: scalar, or a tensor broadcastable to ``x``
    (for example one eps per example, shape (B, 1, 1, 1)). ``lo``/``hi``: scalars or
    tensors broadcastable to ``x``.
    """
    if not isinstance(x, Tensor):
        raise CertorchError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_finite(x, "x")
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    if (lo_t > hi_t).any():
        raise CertorchError("lo must be <= hi for the input box")
    span = float((hi_t - lo_t).max()) if lo_t.numel() and hi_t.numel() else 1.0
    check_eps(eps, max_eps=span)
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    lower = torch.maximum(x - eps_t, lo_t)
    upper = torch.minimum(x + eps_t, hi_t)
    # If x itself lies outside [lo, hi] the intersection can be empty: refuse.
    if (lower > upper).any():
        raise CertorchError("x lies outside the data box [lo, hi] by more than eps")
    return Box(lower, upper)


def margin_matrix(y: Tensor, num_classes: int) -> Tensor:
    """Spec matrix ``C`` of shape (B, K-1, K): row j is ``e_y - e_j`` over j != y.

    Used by bounds, attacks and the verifier alike (one spec builder).
    """
    if y.dim() != 1:
        raise CertorchError(f"labels y must have shape (B,), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise CertorchError(f"labels y must lie in [0, {num_classes - 1}], got range [{int(y.min())}, {int(y.max())}]")
    B, K = y.shape[0], num_classes
    eye = torch.eye(K, device=y.device)
    others = torch.arange(K, device=y.device).unsqueeze(0).expand(B, K)
    keep = others != y.unsqueeze(1)
    j = others[keep].view(B, K - 1)  # the wrong classes, in increasing order
    return eye[y].unsqueeze(1) - eye[j]


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Concrete margins ``logit[y] - logit[j]`` for j != y, shape (B, K-1)."""
    C = margin_matrix(y, logits.shape[-1]).to(logits.dtype)
    return torch.einsum("bsk,bk->bs", C, logits)
