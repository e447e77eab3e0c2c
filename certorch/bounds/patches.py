"""Patch ("window") coefficients for backward passes that start at a convolutional layer.

CROWN's intermediate bounds of a conv layer's neurons need one coefficient row per neuron.
Pushed back through convolutions and ReLUs, a row stays zero outside the neuron's receptive
field, so a dense (S, C, H, W) row wastes most of its memory and time on zeros. A
:class:`Patches` value stores only the window: row ``s`` holds ``P[:, s]`` of shape
(C, kh, kw), placed with its top-left corner at ``(oh[s] * sh - ph, ow[s] * sw - pw)`` of the
node's (C, H, W) map. Window entries outside [0, H) x [0, W) stand for the zero padding of a
convolution and multiply nothing.

The backward interpreter (certorch.bounds.backward) keeps coefficients in this form through
convolutions, per-channel scale/shift maps, residual sums and element-wise relaxations, and
converts to dense (:meth:`Patches.to_dense`) at anything else (Linear, reshape, pooling) or
when a window grows as large as the whole map. Every operation is batched tensor code
(``conv_transpose2d`` on the windows, one gather per relaxation); values and gradients equal
the dense computation's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from certorch.ops.maps import AffineMap, ConvMap, ScaleShiftMap, SumMap


@dataclass(frozen=True, eq=False)
class Patches:
    """Window coefficients of S = U * G spec rows at a node of shape (C, H, W).

    The rows come in U groups of G rows that share a window position (e.g. all channels of a
    conv neuron's position): row ``s = u * G + g`` has coefficients ``P[:, u, g]`` (C, kh, kw).
    P: (L, U, G, C, kh, kw) with L = 1 (shared by the batch) or B.
    oh, ow: (U,) int64 window positions; stride, padding: window placement (see module doc).
    clean: True when every window entry that falls in the padding is known to be zero.
    """

    P: Tensor
    oh: Tensor
    ow: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    shape: tuple[int, int, int]
    clean: bool = True

    # --- construction ---------------------------------------------------------------------

    @staticmethod
    def one_hot(flat_idx: Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> "Patches":
        """Rows selecting the neurons ``flat_idx`` (S,) of a (C, H, W) node: S groups of one 1x1 window."""
        C, H, W = shape
        S = flat_idx.numel()
        c, hw = flat_idx // (H * W), flat_idx % (H * W)
        P = torch.zeros(1, S, 1, C, 1, 1, dtype=dtype, device=flat_idx.device)
        P[0, torch.arange(S, device=flat_idx.device), 0, c] = 1.0
        return Patches(P, hw // W, hw % W, (1, 1), (0, 0), tuple(shape))

    @staticmethod
    def all_channels(pos: Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> "Patches":
        """Rows selecting every channel at the spatial positions ``pos`` (U,) (flat h * W + w):
        U groups of C rows; row (u, c) is neuron ``c * H * W + pos[u]``."""
        C, H, W = shape
        eye = torch.eye(C, dtype=dtype, device=pos.device).view(1, 1, C, C, 1, 1)
        return Patches(eye.expand(1, pos.numel(), C, C, 1, 1), pos // W, pos % W, (1, 1), (0, 0), tuple(shape))

    # --- geometry -----------------------------------------------------------------------

    @property
    def groups(self) -> int:
        return self.P.shape[1]

    @property
    def rows(self) -> int:
        return self.P.shape[1] * self.P.shape[2]

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.P.shape[-2:])

    @cached_property
    def canvas(self) -> tuple[int, int]:
        """(Hp, Wp): the zero-padded map that contains every window."""
        _, H, W = self.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        top = int(self.oh.max()) * sh + kh if self.groups else 0
        left = int(self.ow.max()) * sw + kw if self.groups else 0
        return max(H + ph, top), max(W + pw, left)

    @cached_property
    def index(self) -> Tensor:
        """(U * C * kh * kw,) flat indices of each window entry in the padded canvas (C, Hp, Wp)."""
        C = self.shape[0]
        (kh, kw), (sh, sw) = self.kernel, self.stride
        Hp, Wp = self.canvas
        dev = self.oh.device
        r = self.oh[:, None] * sh + torch.arange(kh, device=dev)  # (U, kh)
        q = self.ow[:, None] * sw + torch.arange(kw, device=dev)  # (U, kw)
        ch = torch.arange(C, device=dev) * (Hp * Wp)
        idx = ch[None, :, None, None] + r[:, None, :, None] * Wp + q[:, None, None, :]
        return idx.flatten()

    def _padded(self, t: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C * Hp * Wp), zero-padded to the canvas."""
        _, H, W = self.shape
        (ph, pw), (Hp, Wp) = self.padding, self.canvas
        return F.pad(t, (pw, Wp - W - pw, ph, Hp - H - ph)).flatten(1)

    def gather(self, t: Tensor) -> Tensor:
        """The windows of a per-neuron tensor t (N, C, H, W): (N, U, 1, C, kh, kw), zero in the
        padding (one window per group, broadcasting over the group's rows)."""
        flat = torch.index_select(self._padded(t), 1, self.index)
        return flat.view(t.shape[0], self.groups, 1, self.shape[0], *self.kernel)

    # --- conversions --------------------------------------------------------------------

    def to_dense(self) -> Tensor:
        """Dense coefficients (L, S, C, H, W)."""
        L, U, G = self.P.shape[:3]
        C, H, W = self.shape
        (ph, pw), (Hp, Wp) = self.padding, self.canvas
        idx = self.index.view(1, U, 1, -1).expand(L, U, G, -1)
        out = torch.zeros(L, U, G, C * Hp * Wp, dtype=self.P.dtype, device=self.P.device)
        out = out.scatter(3, idx, self.P.reshape(L, U, G, -1))
        return out.view(L, U * G, C, Hp, Wp)[..., ph : ph + H, pw : pw + W]

    def with_P(self, P: Tensor, clean: bool | None = None) -> "Patches":
        return replace(self, P=P, clean=self.clean if clean is None else clean)

    def stacked_with_negation(self) -> "Patches":
        """Each group followed by its negation (2G rows per group); see :meth:`split_negation`."""
        return self.with_P(torch.cat([self.P, -self.P], 2))

    @staticmethod
    def split_negation(res: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """Results (B, U * 2G) of :meth:`stacked_with_negation` rows -> (rows, negated rows), each (B, U * G)."""
        B = res.shape[0]
        r = res.view(B, groups, 2, -1)
        return r[:, :, 0].reshape(B, -1), r[:, :, 1].reshape(B, -1)

    def masked(self) -> "Patches":
        """The same rows with the padding entries set to zero."""
        if self.clean:
            return self
        C, H, W = self.shape
        ones = torch.ones(1, C, H, W, dtype=self.P.dtype, device=self.P.device)
        return self.with_P(self.P * self.gather(ones), clean=True)

    # --- what the backward interpreter needs --------------------------------------------

    def flat_rows(self, t: Tensor) -> Tensor:
        """(N, U, G) per-row results -> (N, S)."""
        return t.reshape(t.shape[0], -1)

    def offset_dot(self, off: Tensor) -> Tensor:
        """``sum A * off`` per row, off broadcastable to (C, H, W): (L, S)."""
        C, H, W = self.shape
        full = off.reshape((1,) * (3 - off.dim()) + tuple(off.shape)).expand(C, H, W)
        w = self.gather(full.unsqueeze(0)).flatten(3)  # (1, U, 1, D), zero in the padding
        return self.flat_rows((self.P.flatten(3) * w).sum(3))

    def concretize(self, center: Tensor, radius: Tensor) -> Tensor:
        """Lower bound of ``A . x`` over the box center +- radius (B, C, H, W): (B, S)."""
        B = center.shape[0]
        cr = self.gather(torch.cat([center, radius], 0)).flatten(3)  # (2B, U, 1, D)
        P = self.P.flatten(3)
        return self.flat_rows((P * cr[:B]).sum(3) - (P.abs() * cr[B:]).sum(3))

    def transpose(self, m: AffineMap) -> list["Patches"] | None:
        """The rows pushed back through ``m``; None when ``m`` needs dense coefficients."""
        if isinstance(m, SumMap):
            return [self] * m.num_inputs
        if isinstance(m, ScaleShiftMap) and m.channel_dims == 2:
            return [self.with_P(self.P * m.scale.view(1, 1, 1, -1, 1, 1))]
        if isinstance(m, ConvMap):
            return [self._through_conv(m)]
        return None

    def _through_conv(self, m: ConvMap) -> "Patches":
        """Windows at the conv's input: each window is transposed-convolved with the kernel."""
        src = self.masked()
        L, U, G, C, kh, kw = src.P.shape
        P = window_conv_transpose(src.P.reshape(L * U * G, C, kh, kw), m)
        stride = (self.stride[0] * m.stride[0], self.stride[1] * m.stride[1])
        padding = (self.padding[0] * m.stride[0] + m.padding[0], self.padding[1] * m.stride[1] + m.padding[1])
        P = P.view(L, U, G, *P.shape[1:])
        return Patches(P, self.oh, self.ow, stride, padding, tuple(m.in_shape), clean=False)

    def too_wide(self) -> bool:
        """True when a window is at least as large as the map (dense is then no more costly)."""
        kh, kw = self.kernel
        return kh * kw >= self.shape[1] * self.shape[2]


def aligned(a: Patches, b: Patches) -> tuple[Patches, Patches] | None:
    """Both rows re-windowed to a common (padding, kernel), or None if they cannot be."""
    if a.stride != b.stride or a.shape != b.shape or a.P.shape[1:3] != b.P.shape[1:3]:
        return None
    if not (a.oh is b.oh or torch.equal(a.oh, b.oh)) or not (a.ow is b.ow or torch.equal(a.ow, b.ow)):
        return None
    pad = tuple(max(pa, pb) for pa, pb in zip(a.padding, b.padding))
    end = tuple(max(ka - pa, kb - pb) for ka, kb, pa, pb in zip(a.kernel, b.kernel, a.padding, b.padding))

    def grow(p: Patches) -> Patches:
        top, left = pad[0] - p.padding[0], pad[1] - p.padding[1]
        bottom = end[0] + pad[0] - p.kernel[0] - top
        right = end[1] + pad[1] - p.kernel[1] - left
        if top == left == bottom == right == 0:
            return p
        return replace(p, P=F.pad(p.P, (left, right, top, bottom)), padding=pad)

    return grow(a), grow(b)


def add_coefficients(a: Tensor | Patches, b: Tensor | Patches) -> Tensor | Patches:
    """Sum of two coefficient values of the same node (dense, patches, or one of each)."""
    if isinstance(a, Patches) and isinstance(b, Patches):
        pair = aligned(a, b)
        if pair is not None:
            x, y = pair
            return x.with_P(x.P + y.P, clean=x.clean and y.clean)
    if isinstance(a, Patches):
        a = a.to_dense()
    if isinstance(b, Patches):
        b = b.to_dense()
    return a + b


# Cost model (CPU, measured with torch 2.13 on 2 threads): conv_transpose2d pays a fixed cost per
# window of about as much as this many multiply-adds, so for the small windows next to a conv
# target one GEMM with the window-to-window matrix is several times faster.
_PER_WINDOW_OVERHEAD = 137_000


def window_conv_transpose(P: Tensor, m: ConvMap) -> Tensor:
    """``conv_transpose2d`` of N windows (N, C, kh, kw) with the conv's kernel (no padding):
    (N, Cin, (kh - 1) * s + d * (k - 1) + 1, ...).

    Small windows use one GEMM with the (C*kh*kw, Cin*Kh*Kw) matrix of the map, built by
    transposing the identity basis; larger ones call ``conv_transpose2d`` directly.
    """
    N, C, kh, kw = P.shape
    Cin, k1, k2 = m.weight.shape[1:]
    Kh = (kh - 1) * m.stride[0] + m.dilation[0] * (k1 - 1) + 1
    Kw = (kw - 1) * m.stride[1] + m.dilation[1] * (k2 - 1) + 1
    d_in, d_out = C * kh * kw, Cin * Kh * Kw
    gemm = d_in * d_out < d_in * Cin * k1 * k2 + _PER_WINDOW_OVERHEAD
    if not gemm or N < d_in:
        return F.conv_transpose2d(P, m.weight, None, m.stride, 0, 0, 1, m.dilation)
    eye = torch.eye(d_in, dtype=P.dtype, device=P.device).view(d_in, C, kh, kw)
    M = F.conv_transpose2d(eye, m.weight, None, m.stride, 0, 0, 1, m.dilation).reshape(d_in, d_out)
    return (P.reshape(N, d_in) @ M).view(N, Cin, Kh, Kw)
