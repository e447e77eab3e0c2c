"""The relaxation of 2-d max pooling (max over each window of a (C, H, W) map).

Not element-wise, so it provides ``backward(A, l, u)`` on dense coefficients instead of
per-neuron lines (the backward interpreter converts window coefficients to dense first), plus
``fn``, ``interval`` and ``needs_bounds`` (see :mod:`certorch.relax.sshape` for the protocol).
For an output ``o = max_{k in window} x_k`` with input bounds ``l, u`` (DeepPoly's rule):

* lower: ``o >= x_{k*}`` with ``k*`` the input of largest lower bound (every input of the window
  is a valid lower bound);
* upper: ``o <= x_{k*}`` when ``k*`` dominates (``l_{k*} >= u_j`` for every other ``j``: then
  ``o == x_{k*}``), else the constant ``max_j u_j``.

Padding (at most half the kernel, as torch allows) counts as -inf: it never wins a max, so a
window's bounds come from its real inputs only. ``dilation`` must be 1; ``ceil_mode`` is refused.
Forward zonotope / symbolic transformers and LP / MILP constraints are not provided yet.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from certorch.domains.box import Box
from certorch.errors import UnsupportedOperationError


def make(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False) -> SimpleNamespace:
    """The relaxation namespace of ``nn.MaxPool2d(kernel_size, stride, ...)``."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    k = pair(kernel_size)
    s = pair(stride if stride is not None else kernel_size)
    p = pair(padding)
    if pair(dilation) != (1, 1) or ceil_mode:
        raise UnsupportedOperationError("MaxPool2d bounds support dilation=1 and ceil_mode=False only")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise UnsupportedOperationError(f"MaxPool2d padding {p} must be at most half the kernel {k}")
    pad4 = (p[1], p[1], p[0], p[0])

    def fn(x: Tensor) -> Tensor:
        return F.max_pool2d(x, k, s, p)

    def _windows(t: Tensor, fill: float) -> Tensor:
        """(B*C, K, n_out) window entries of a (B*C, 1, H, W) map padded with ``fill`` (-inf:
        the padding never wins a max, as in max pooling)."""
        if any(p):
            t = F.pad(t, pad4, value=fill)
        return F.unfold(t, k, stride=s)

    def interval(box: Box) -> Box:
        return Box(fn(box.lower), fn(box.upper))

    def _choice(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(k* (B, C, n_out) flat input positions of the largest lower bound, dominates (B, C, n_out)
        bool, max upper bound (B, C, n_out)), for inputs l, u (B, C, H, W)."""
        B, C, H, W = l.shape
        _, idx = F.max_pool2d(l, k, s, p, return_indices=True)  # flat positions in the unpadded map
        idx = idx.flatten(2)
        u_win = _windows(u.reshape(B * C, 1, H, W), float("-inf"))  # (B*C, K, n_out) window entries
        pos = _windows(torch.arange(H * W, device=l.device, dtype=l.dtype).view(1, 1, H, W), -1.0)  # (1, K, n_out)
        is_star = pos.round().long() == idx.reshape(B * C, 1, -1)  # (B*C, K, n_out)
        others = u_win.masked_fill(is_star, float("-inf")).amax(1).view(B, C, -1)
        l_star = l.flatten(2).gather(2, idx)
        u_max = u_win.amax(1).view(B, C, -1)
        return idx, l_star >= others, u_max

    def backward(A: Tensor, l: Tensor, u: Tensor, mode: str = "adaptive") -> tuple[Tensor, Tensor]:
        """Lower-bound ``A . maxpool(x)`` by a linear function of x. ``A``: (L, S, C, Ho, Wo) with
        L in {1, B}; l, u: (B, C, H, W). Returns (coefficients (B, S, C, H, W), constant (B, S))."""
        B, C, H, W = l.shape
        idx, dom, u_max = _choice(l, u)
        S = A.shape[1]
        Af = A.expand(B, *A.shape[1:]).reshape(B, S, C, -1)
        A_pos, A_neg = Af.clamp(min=0), Af.clamp(max=0)
        to_star = A_pos + torch.where(dom.unsqueeze(1), A_neg, torch.zeros_like(A_neg))  # coefficients on x_{k*}
        const = (torch.where(dom.unsqueeze(1), torch.zeros_like(A_neg), A_neg) * u_max.unsqueeze(1)).sum((2, 3))
        A_in = Af.new_zeros(B, S, C, H * W)
        A_in.scatter_add_(3, idx.unsqueeze(1).expand(B, S, C, idx.shape[2]), to_star)
        return A_in.view(B, S, C, H, W), const

    def needs_bounds(l: Tensor, u: Tensor) -> Tensor:
        return torch.ones_like(l, dtype=torch.bool)  # any input of a window may set its bound

    return SimpleNamespace(name="maxpool", fn=fn, interval=interval, backward=backward, backward_lines=None,
                           needs_bounds=needs_bounds, deepz=None)
