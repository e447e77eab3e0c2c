"""Symbolic intervals (ReluVal / Neurify / MixTrain): two linear functions of the input per neuron.

Each bound is an affine form ``const + coef . e`` in the normalized input ``e in [-1, 1]^n``
(``x = c + r * e``): ``low`` <= value <= ``up``. Affine maps split their coefficients by sign
(computed as ``L mid -/+ |L| half``: two maps per layer, see :meth:`SymbolicInterval.map`);
ReLU uses the *symbolic linear relaxation*: two parallel lines of slope u/(u-l)
(``lower = lam * low``, ``upper = lam * (up - l)``).

**Shared coefficients.** Both forms start as the same tensor (the input box), every affine map
sends equal coefficients to equal coefficients, and every activation scales both by the same
slope (parallel lines), so from a box the two forms differ only in their constants. The
coefficient tensor is therefore kept *once* (``low.coef is up.coef``) and mapped with one
affine map per layer instead of two (the ``|L| half`` map of the coefficients would be exactly
zero); forms built with distinct coefficient tensors still take the general path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from certorch.domains.box import Box
from certorch.ops.maps import AffineMap, map_rows


@dataclass
class AffineForm:
    const: Tensor  # (B, *shape)
    coef: Tensor  # (B, n, *shape)

    def lower(self) -> Tensor:
        return self.const - self.coef.abs().sum(1)

    def upper(self) -> Tensor:
        return self.const + self.coef.abs().sum(1)


@dataclass
class SymbolicInterval:
    low: AffineForm
    up: AffineForm

    @staticmethod
    def from_box(box: Box) -> "SymbolicInterval":
        c, r = box.center, box.radius
        B, shape = c.shape[0], c.shape[1:]
        n = r[0].numel()
        coef = torch.eye(n, dtype=c.dtype, device=c.device).view(1, n, *shape) * r.unsqueeze(1)
        f = AffineForm(c, coef)
        return SymbolicInterval(f, f)

    @property
    def shared(self) -> bool:
        """Whether both forms use one coefficient tensor (see the module docstring)."""
        return self.low.coef is self.up.coef

    def box(self) -> Box:
        if self.shared:
            dev = self.low.coef.abs().sum(1)
            return Box(self.low.const - dev, self.up.const + dev)
        return Box(self.low.lower(), self.up.upper())

    @property
    def center(self) -> Tensor:
        return self.low.const

    def terms(self) -> int:
        """Coefficients stored per neuron (lower and upper forms; once when shared)."""
        return self.low.coef.shape[1] * (1 if self.shared else 2)

    def tensors(self) -> list[Tensor]:
        ts = [self.low.const, self.low.coef]
        if self.up is not self.low:
            ts += [self.up.const] + ([] if self.shared else [self.up.coef])
        return ts

    @staticmethod
    def cat(parts: list["SymbolicInterval"]) -> "SymbolicInterval":
        """Concatenate symbolic intervals of example chunks along the batch."""
        def form(fs: list[AffineForm], coef: Tensor | None = None) -> AffineForm:
            coef = torch.cat([f.coef for f in fs]) if coef is None else coef
            return AffineForm(torch.cat([f.const for f in fs]), coef)

        low = form([p.low for p in parts])
        if all(p.up is p.low for p in parts):
            return SymbolicInterval(low, low)
        shared = low.coef if all(p.shared for p in parts) else None
        return SymbolicInterval(low, form([p.up for p in parts], shared))

    def map(self, m: AffineMap, *others: "SymbolicInterval") -> "SymbolicInterval":
        """The forms through the affine map ``m`` (the inputs' forms for a map of several inputs).

        ``L+ low + L- up`` and ``L+ up + L- low`` are computed as ``L mid -/+ |L| half`` with
        ``mid = (low + up) / 2`` and ``half = (up - low) / 2`` (the same linear functions: two maps
        instead of four); forms with ``low is up`` (the input box) take one map."""
        ss = (self,) + others
        off = m.offset()
        B, n = self.low.coef.shape[:2]
        flat = lambda t: t.reshape(B * n, *t.shape[2:])  # noqa: E731
        k = len(ss)
        if all(s.up is s.low for s in ss):
            c = m.apply(*(s.low.const for s in ss))
            c = c if off is None else c + off
            coef = map_rows(m.apply, [flat(s.low.coef) for s in ss])
            f = AffineForm(c, coef.reshape(B, n, *c.shape[1:]))
            return SymbolicInterval(f, f)

        def both(*t: Tensor) -> Tensor:
            """(rows, 2, *out): the lower then the upper form's values of lows t[:k], ups t[k:]."""
            mid = m.apply(*((a + b) * 0.5 for a, b in zip(t[:k], t[k:])))
            half = m.apply_abs(*((b - a) * 0.5 for a, b in zip(t[:k], t[k:])))
            return torch.stack([mid - half, mid + half], 1)

        c = both(*(s.low.const for s in ss), *(s.up.const for s in ss))
        low_c, up_c = c[:, 0], c[:, 1]
        if off is not None:
            low_c, up_c = low_c + off, up_c + off
        shape = low_c.shape[1:]
        if all(s.shared for s in ss):  # equal coefficients stay equal: one map
            coef = map_rows(m.apply, [flat(s.low.coef) for s in ss]).reshape(B, n, *shape)
            return SymbolicInterval(AffineForm(low_c, coef), AffineForm(up_c, coef))
        coef = map_rows(both, [flat(s.low.coef) for s in ss] + [flat(s.up.coef) for s in ss])
        return SymbolicInterval(AffineForm(low_c, coef[:, 0].reshape(B, n, *shape)),
                                AffineForm(up_c, coef[:, 1].reshape(B, n, *shape)))

    def relu(self, slope: Tensor, up_bias: Tensor, low_bias: Tensor | None = None) -> "SymbolicInterval":
        """``low -> slope * low + low_bias``, ``up -> slope * up + up_bias`` (each (B, *shape));
        an activation bounded by two parallel lines of slope ``slope >= 0``."""
        s = slope.unsqueeze(1)
        low_const = slope * self.low.const if low_bias is None else slope * self.low.const + low_bias
        low_coef = s * self.low.coef
        return SymbolicInterval(
            AffineForm(low_const, low_coef),
            AffineForm(slope * self.up.const + up_bias, low_coef if self.shared else s * self.up.coef),
        )

    def linear_bounds(self, A: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Bounds of ``A . v + bias`` with A: (B, S, *shape). Returns (lower, upper), each (B, S)."""
        Af = A.flatten(2)
        Ap, An = Af.clamp(min=0), Af.clamp(max=0)
        lc, uc = self.low.const.flatten(1), self.up.const.flatten(1)
        lk, uk = self.low.coef.flatten(2), self.up.coef.flatten(2)
        lo_c = torch.einsum("bsi,bi->bs", Ap, lc) + torch.einsum("bsi,bi->bs", An, uc)
        hi_c = torch.einsum("bsi,bi->bs", Ap, uc) + torch.einsum("bsi,bi->bs", An, lc)
        if self.shared:  # Ap k + An k = A k for both forms
            lo_k = hi_k = torch.einsum("bsi,bni->bsn", Af, lk)
        else:
            lo_k = torch.einsum("bsi,bni->bsn", Ap, lk) + torch.einsum("bsi,bni->bsn", An, uk)
            hi_k = torch.einsum("bsi,bni->bsn", Ap, uk) + torch.einsum("bsi,bni->bsn", An, lk)
        lower = lo_c - lo_k.abs().sum(-1)
        upper = hi_c + hi_k.abs().sum(-1)
        if bias is not None:
            lower, upper = lower + bias, upper + bias
        return lower, upper
