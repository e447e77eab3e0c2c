"""Zonotopes ``center + sum_k G_k e_k`` (e in [-1, 1]) with optional Cauchy projections.

Generators are kept in blocks (exact: one per source of error terms, the input box and each
ReLU layer; projected: one merged block, below), ``blocks[k]`` of shape (B, m_k, *shape). A
block marked *projected* holds ``r`` random Cauchy projections ``G_k R`` instead of ``G_k``; its
L1 row norms are then estimated by the median of absolute values (Wong et al. 2018, section
3.2) — an estimate for training, never a sound bound.
This is also the convex region ``a + A e`` of COLT / MAAR (``center``, generators).

Projected blocks are **merged**: a ReLU's new error terms are projected with their own
independent Cauchy matrix and added into the existing projected block,
``G R + M R' = [G, M] [R; R']``, which is again a Cauchy projection of all the generators
together (each entry is a sum of independent standard Cauchy variables weighted by the
generators, so Cauchy with scale equal to the L1 norm of that row). The median then estimates
the L1 norm of all error terms at once, and each layer maps one (B, r, *shape) block instead of
one per earlier ReLU layer (convex_adversarial keeps one per layer and sums their medians:
also an estimate of the same norm; the merged one costs a constant number of maps per layer).

One Cauchy matrix is drawn per call and **shared by the examples of the batch**: example ``b``'s
block is ``G_b R`` with ``R`` (r, m) i.i.d. standard Cauchy, so each example's estimate has exactly
the distribution it has with a matrix of its own (the median of r independent Cauchy variables
of scale ``||row||_1``); only the estimates of different examples of one batch are correlated.
It draws B times fewer random numbers (convex_adversarial draws one matrix per example: at
``colt_mnist``'s ReLU "4", batch 100, r = 50, the draws were a quarter of the region's time).
The median itself is numpy's introselect on the CPU (see :func:`_abs_lower_median`): it is
written here, not taken from ``torch.median``, because that was the largest single cost left.

A projected block may be kept in a lower precision (``projection_dtype``, e.g. bfloat16): it is
drawn in the center's precision, mapped in its own (each map cast with :meth:`AffineMap.to`),
and its medians are selected in float32; the center and every box stay in the center's dtype.
On hardware with bfloat16 units that halves the maps' time; the estimates move by rounding
only (0.3 % median against a 20 % spread between two draws, tested).

A zonotope *owns* the blocks its map made (:attr:`Zonotope.owned`: fresh memory, not a view of
an input's); the DeepZ ReLU image (:meth:`Zonotope.scale_and_extend`) scales an owned block in
place when told its input is not used again (``consume``: the interpreter's pre-activation value
with one user and regions not kept) and autograd does not need the old values.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from certorch.domains.box import Box
from certorch.ops.maps import AffineMap, map_rows


def cauchy_like(shape, ref: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Cauchy samples ``tan(pi (u - 1/2))``, u uniform, of ``shape`` with ``ref``'s dtype/device.

    Computed in place on the uniform draw: half the time of the out-of-place expression on a CPU
    (one pass over memory instead of three); ``Tensor.cauchy_`` is slower still (measured, torch 2.13)."""
    u = torch.rand(shape, dtype=ref.dtype, device=ref.device, generator=generator)
    return u.sub_(0.5).mul_(torch.pi).tan_()


def auto_projection_dtype(device: torch.device | str) -> torch.dtype | None:
    """``torch.bfloat16`` where ``device`` computes it natively (a CUDA device that supports it; a
    CPU whose oneDNN has bfloat16 kernels, e.g. AVX512-BF16 or AMX), else None (keep the
    input's dtype: emulated bfloat16 is slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        try:
            native = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without the query
            native = False
        return torch.bfloat16 if native else None
    return None


def resolve_projection_dtype(name: str | None, device: torch.device | str) -> torch.dtype | None:
    """A config's ``projection_dtype`` on ``device``: ``auto`` (:func:`auto_projection_dtype`),
    ``float32`` / ``float64`` / ``bfloat16``, or None (the input's dtype)."""
    if name is None:
        return None
    if name == "auto":
        return auto_projection_dtype(device)
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"projection_dtype must be auto, float32, float64, bfloat16 or null, got {name!r}")
    return dt


NUMPY_MEDIAN_MAX_THREADS = 8  # see _abs_lower_median


def _abs_lower_median(Gt: Tensor, need_index: bool) -> tuple[Tensor, Tensor | None]:
    """``|Gt|``'s lower median over the last dim (``torch.median``'s value: the ``(m - 1) // 2``-th
    smallest of m) and, if ``need_index``, the index of an entry holding it.

    On the CPU the selection is numpy's introselect (``ndarray.partition``, in place on our own
    buffer): 3-7x faster than a one-thread ``torch.median`` over 50 projections, 5x faster than a
    two-thread one (measured, torch 2.13, numpy 2.4, loaded 2-core VM); the index is then the
    first entry equal to the median (one more pass, only when a gradient is needed: 1.7x faster
    than ``torch.median`` with it). numpy's selection runs on one
    thread, ``torch.median``'s on all of torch's: beyond :data:`NUMPY_MEDIAN_MAX_THREADS` threads
    (not measured here) torch's is used. Also elsewhere (CUDA, half precision), and with a NaN
    present (numpy sorts it last and would hide it; ``torch.median`` propagates it)."""
    low = Gt.device.type == "cpu" and Gt.dtype in (torch.bfloat16, torch.float16)
    A = torch.empty(Gt.shape, dtype=torch.float32 if low else Gt.dtype, device=Gt.device)

    def fill() -> None:  # |G| straight into the layout the selection runs in
        if low:  # a low-precision block (``projection_dtype``): selected in float32 (numpy has no bfloat16)
            A.copy_(Gt).abs_()
        else:
            torch.abs(Gt, out=A)

    fill()
    if A.device.type != "cpu" or A.dtype not in (torch.float32, torch.float64) or A.numel() == 0 \
            or torch.get_num_threads() > NUMPY_MEDIAN_MAX_THREADS or bool(torch.isnan(A.sum())):  # |.| >= 0: NaN iff one is
        values, idx = A.median(dim=-1)
        return values, idx
    k = (A.shape[-1] - 1) // 2
    A.numpy().partition(k, axis=-1)
    values = A[..., k].clone()
    if not need_index:
        return values, None
    fill()  # the selection reordered the buffer
    return values, torch.eq(A, values.unsqueeze(-1)).to(torch.uint8).argmax(dim=-1)


class _MedianAbs(torch.autograd.Function):
    """``|G|.median(dim=1).values`` for G (B, m, *shape), with less memory traffic than autograd's.

    Forward: |G| is written straight into a (B, *shape, m) buffer, the layout the selection runs
    in (:func:`_abs_lower_median`; no index without a gradient to route). Backward: the gradient
    reaches the selected entry of each column only, times its sign (autograd's version keeps |G|
    and runs a full-size ``sgn`` and product). Same values and gradients as autograd's median
    (tested; where several entries of a column tie at the median any of them may be the one)."""

    @staticmethod
    def forward(ctx, G: Tensor) -> Tensor:
        values, idx = _abs_lower_median(G.movedim(1, -1), ctx.needs_input_grad[0])
        ctx.shape = G.shape
        if idx is None:
            return values
        idx = idx.unsqueeze(1)
        ctx.save_for_backward(idx, G.gather(1, idx).sign())
        return values

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        idx, sign = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_(1, idx, grad.unsqueeze(1) * sign)


def l1_estimate(G: Tensor, projected: bool) -> Tensor:
    """Per-position L1 norm over generators (dim 1): exact sum, or the Cauchy median estimate
    (``G``: (B, m, *shape) -> (B, *shape))."""
    if projected:
        return _MedianAbs.apply(G)
    return torch.linalg.vector_norm(G, ord=1, dim=1)  # one fused reduction: no |G| copy of the block


@dataclass
class Zonotope:
    center: Tensor  # (B, *shape)
    blocks: dict[int, Tensor]  # id -> (B, m, *shape)
    projected: frozenset = field(default_factory=frozenset)
    #: ids of blocks whose memory this zonotope alone holds (made by the map that made it, not a
    #: view of an input's): :meth:`scale_and_extend` may overwrite them when told the zonotope is
    #: not used again
    owned: frozenset = field(default_factory=frozenset)

    def terms(self) -> int:
        """Error terms (generators) per neuron."""
        return sum(G.shape[1] for G in self.blocks.values())

    def tensors(self) -> list[Tensor]:
        return [self.center, *self.blocks.values()]

    @staticmethod
    def cat(parts: list["Zonotope"]) -> "Zonotope":
        """Concatenate zonotopes of example chunks along the batch (blocks padded with zero generators)."""
        ids = sorted({k for z in parts for k in z.blocks})
        blocks = {}
        for k in ids:
            m = max(z.blocks[k].shape[1] for z in parts if k in z.blocks)
            padded = []
            for z in parts:
                G = z.blocks.get(k)
                if G is None:
                    ref = next(p.blocks[k] for p in parts if k in p.blocks)
                    G = ref.new_zeros(z.center.shape[0], m, *z.center.shape[1:])
                elif G.shape[1] < m:
                    G = torch.cat([G, G.new_zeros(G.shape[0], m - G.shape[1], *G.shape[2:])], 1)
                padded.append(G)
            blocks[k] = torch.cat(padded, 0)
        return Zonotope(torch.cat([z.center for z in parts]), blocks, frozenset().union(*(z.projected for z in parts)),
                        frozenset(blocks))

    def radius(self) -> Tensor:
        r = torch.zeros_like(self.center)
        for k, G in self.blocks.items():
            r = r + l1_estimate(G, k in self.projected)
        return r

    def box(self) -> Box:
        return Box.from_center_radius(self.center, self.radius())

    @staticmethod
    def from_box(box: Box, projections: int | None = None, generator=None, block_id: int = 0,
                 projection_dtype: torch.dtype | None = None) -> "Zonotope":
        """The box as a zonotope: one generator per input position, or ``projections`` Cauchy
        projections of them (one R for the batch) kept in ``projection_dtype`` (default: the box's;
        see the module docstring)."""
        c, r = box.center, box.radius
        B, shape = c.shape[0], c.shape[1:]
        if projections:
            R = cauchy_like((1, projections, *shape), c, generator)  # drawn in the box's precision
            G = (R * r.unsqueeze(1)).to(projection_dtype or c.dtype)
            return Zonotope(c, {block_id: G}, frozenset({block_id}), frozenset({block_id}))
        n = r[0].numel()
        eye = torch.eye(n, dtype=c.dtype, device=c.device).view(1, n, *shape)
        return Zonotope(c, {block_id: eye * r.unsqueeze(1)}, frozenset(), frozenset({block_id}))

    def map(self, m: AffineMap, *others: "Zonotope") -> "Zonotope":
        """Image under an affine map of ``(self, *others)`` (others: extra inputs, e.g. Add)."""
        zs = (self,) + others
        center = m(*(z.center for z in zs))
        B = center.shape[0]
        out_shape = center.shape[1:]
        ids = sorted({k for z in zs for k in z.blocks})
        blocks = {}
        inputs = {G.untyped_storage().data_ptr() for z in zs for G in z.blocks.values()}
        for k in ids:
            gens = []
            ref = next(z.blocks[k] for z in zs if k in z.blocks)
            for z in zs:
                g = z.blocks.get(k)
                gens.append(torch.zeros_like(ref) if g is None else g)
            m_k = ref.shape[1]
            flat = [g.reshape(B * m_k, *g.shape[2:]) for g in gens]
            blocks[k] = map_rows(m.to(ref.dtype).apply, flat, out_per_row=center[0].numel()).reshape(B, m_k, *out_shape)
        projected = frozenset().union(*(z.projected for z in zs))
        owned = frozenset(k for k, G in blocks.items() if G.untyped_storage().data_ptr() not in inputs)
        return Zonotope(center, blocks, projected, owned)

    def scale(self, s: Tensor, shift: Tensor, consume: bool = False) -> "Zonotope":
        """Element-wise ``s * z + shift`` (s, shift: (B, *shape)).

        ``consume``: ``self`` is not used afterwards, so its :attr:`owned` blocks are scaled in
        place (no new full-size block: the allocation and first touch of its memory were half of
        the scaling's time on a CPU), unless autograd needs their old values."""
        blocks = {}
        for k, G in self.blocks.items():
            sk = s.unsqueeze(1).to(G.dtype)
            keep = torch.is_grad_enabled() and (G.requires_grad or sk.requires_grad)
            blocks[k] = G.mul_(sk) if consume and k in self.owned and not keep else G * sk
        return Zonotope(s * self.center + shift, blocks, self.projected, frozenset(blocks))

    def scale_and_extend(self, s: Tensor, shift: Tensor, mu: Tensor, block_id: int, projections: int | None = None,
                         generator=None, consume: bool = False) -> "Zonotope":
        """``self.scale(s, shift).add_block(block_id, mu, projections, generator)`` (the DeepZ ReLU
        image), same values and draws, with the merged projected block updated in place on the
        product ``scale`` has just made (no one else holds it): one full-size pass and
        allocation fewer per layer. ``consume``: see :meth:`scale`."""
        return self.scale(s, shift, consume).add_block(block_id, mu, projections, generator, in_place=True)

    def add_block(self, block_id: int, mu: Tensor, projections: int | None = None, generator=None,
                  in_place: bool = False) -> "Zonotope":
        """Add new independent error terms ``mu_i * e_i`` for positions with mu != 0.

        Exact: one generator per position that is nonzero for some example (union over the
        batch), as a (B, k, *shape) block. Projected: ``r`` Cauchy projections ``mu * R``, ``R``
        (1, r, *shape) shared by the batch (see the class docstring). ``in_place``: add them into
        the existing projected block itself (only when ``self`` is not used again; the result then
        owns what ``self`` owned, else only its new block).
        """
        B, shape = mu.shape[0], mu.shape[1:]
        owned = self.owned if in_place else frozenset()  # the other blocks are self's: shared unless self is spent
        if projections:
            R = cauchy_like((1, projections, *shape), mu, generator)  # drawn in mu's precision
            into = self.projected_block(projections)
            if into is not None:  # merged: sum of independent projections (see the class docstring)
                G = self.blocks[into]
                R, m = R.to(G.dtype), mu.unsqueeze(1).to(G.dtype)  # the block's precision (projection_dtype)
                merged = G.addcmul_(R, m) if in_place else torch.addcmul(G, R, m)
                return Zonotope(self.center, {**self.blocks, into: merged}, self.projected, owned | {into})
            return Zonotope(self.center, {**self.blocks, block_id: R * mu.unsqueeze(1)}, self.projected | {block_id},
                            owned | {block_id})
        flat = mu.reshape(B, -1)
        idx = (flat != 0).any(dim=0).nonzero().flatten()
        if idx.numel() == 0:
            return self
        G = torch.zeros(B, idx.numel(), flat.shape[1], dtype=mu.dtype, device=mu.device)
        G.scatter_(2, idx.view(1, -1, 1).expand(B, -1, 1), flat[:, idx].unsqueeze(2))  # in place: one copy
        return Zonotope(self.center, {**self.blocks, block_id: G.view(B, idx.numel(), *shape)}, self.projected,
                        owned | {block_id})

    def projected_block(self, projections: int) -> int | None:
        """Id of the projected block with ``projections`` columns (new ones merge into it), if any."""
        return next((k for k in sorted(self.projected) if self.blocks[k].shape[1] == projections), None)

    def linear_bounds(self, A: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Bounds of ``A . z + bias`` with A: (B, S, *shape). Returns (lower, upper), each (B, S)."""
        c = torch.einsum("bsi,bi->bs", A.flatten(2), self.center.flatten(1))
        if bias is not None:
            c = c + bias
        rad = torch.zeros_like(c)
        for k, G in self.blocks.items():
            AG = torch.einsum("bsi,bmi->bsm", A.flatten(2), G.flatten(2).to(A.dtype))
            rad = rad + l1_estimate(AG.transpose(1, 2), k in self.projected)
        return c - rad, c + rad
