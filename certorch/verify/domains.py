"""Sub-domains of one branch-and-bound search (:mod:`certorch.verify.bab`) and their queue.

:class:`Domains` holds D sub-domains of one example as batched tensors (the domains are the
batch). :class:`DomainQueue` keeps the open ones between steps in preallocated buffers whose
capacity grows when full, so that a step copies only the domains it takes out (the ``batch``
with the lowest bounds) and the children it puts in, not the whole queue: removal moves the
last live domains into the holes, insertion writes after the last live one; the capacity
grows by half when full, and the search's memory bound counts the buffers' bytes. Before (a select of
the rest and a concatenation with the children per step, two copies of the queue) this was 8.0
of 56 s on oval21 ``cifar_base_kw-img9410`` (sixteenth session's cProfile).

Why hand-written: the domains are a small tree of tensors (dicts of per-node splits, bounds and
slopes) that share their first dimension; no library keeps such a tree in growable buffers. The
queue is a set (the search takes the lowest bounds with ``topk`` each step), so its order does
not matter. Children whose layout differs from the queue's (a node's slopes or split
multipliers seen for the first time, other rows) are merged through :meth:`Domains.cat`, which
fills what a part lacks with NaN (unknown) and the queue is rebuilt around the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from certorch.bounds.alpha import AlphaState
from certorch.domains.box import Box


@dataclass
class Domains:
    """D sub-domains of one example, as batched tensors.

    ``rows``: (D, S) lower bounds of the spec rows (offsets ``d`` included); ``lb``: (D,) lower
    bound of the smallest region value; ``sound``: (D, S) float64 row bounds proven on the domain
    (``rows`` when the domain was bounded in float64; else its parent's or those of a float64
    confirmation: ``rows`` may then be low-precision estimates that steer the search, and a
    positive ``lb`` is always a float64 proof); ``box``: input boxes (D, *in); ``splits``: pre-activation
    node name -> (D, *shape) int8 signs; ``bounds``: pre-activation node name -> Box (D, *shape);
    ``alpha``: slopes and multipliers (:class:`AlphaState`, batch D) or None; ``coeffs``: node
    name -> (D, S, *shape) coefficients of the rows at activation outputs and at the input, kept
    only while the domains are fresh (the counterexample search starts from them); ``choice``:
    (D,) the split each domain gets when it is branched (:func:`settle`), set when the domains
    join the queue, which then drops the coefficients: they were most of its bytes (S rows per
    neuron), copied at every step.
    """

    rows: Tensor
    lb: Tensor
    sound: Tensor
    box: Box
    splits: dict[str, Tensor]
    bounds: dict[str, Box]
    alpha: AlphaState | None
    coeffs: dict[str, Tensor]
    choice: Tensor | None = None

    @property
    def size(self) -> int:
        return self.lb.shape[0]

    def select(self, idx: Tensor) -> "Domains":
        return _build({k: v[idx] for k, v in _leaves(self).items()}, _alpha_ids(self),
                      self.alpha.signature if self.alpha is not None else None)

    @staticmethod
    def cat(parts: list["Domains"]) -> "Domains":
        """Concatenation along the domains. Coefficients are kept for the nodes every part has:
        a bound call cut by its deadline inside its first pass records them only for the nodes
        that pass reached (they steer branching and the attack only; both work without)."""
        parts = [p for p in parts if p.size]
        first = parts[0]
        if len(parts) == 1:
            return first
        alpha = AlphaState.cat([p.alpha for p in parts]) if all(p.alpha is not None for p in parts) else None
        coeff_keys = [k for k in first.coeffs if all(k in p.coeffs for p in parts)]
        choice = torch.cat([p.choice for p in parts]) if all(p.choice is not None for p in parts) else None
        return Domains(torch.cat([p.rows for p in parts]), torch.cat([p.lb for p in parts]),
                       torch.cat([p.sound for p in parts]),
                       Box(torch.cat([p.box.lower for p in parts]), torch.cat([p.box.upper for p in parts])),
                       {k: torch.cat([p.splits[k] for p in parts]) for k in first.splits},
                       {k: Box(torch.cat([p.bounds[k].lower for p in parts]),
                               torch.cat([p.bounds[k].upper for p in parts])) for k in first.bounds},
                       alpha, {k: torch.cat([p.coeffs[k] for p in parts]) for k in coeff_keys}, choice)

    def sound_lb(self, problem: Problem) -> Tensor:
        """(D,) proven lower bound of each domain's smallest region value (float64)."""
        return problem.region_max(self.sound).amin(dim=1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _leaves(self).values())


def _leaves(doms: Domains) -> dict[tuple, Tensor]:
    """Every per-domain tensor of ``doms`` (first dimension D) under a key naming its place."""
    out: dict[tuple, Tensor] = {("rows",): doms.rows, ("lb",): doms.lb, ("sound",): doms.sound,
                                ("box", "lower"): doms.box.lower, ("box", "upper"): doms.box.upper}
    out.update({("splits", k): v for k, v in doms.splits.items()})
    for k, b in doms.bounds.items():
        out[("bounds", k, "lower")], out[("bounds", k, "upper")] = b.lower, b.upper
    out.update({("coeffs", k): v for k, v in doms.coeffs.items()})
    if doms.choice is not None:
        out[("choice",)] = doms.choice
    if doms.alpha is not None:
        out.update({("alpha", s, k): v for s, d in doms.alpha.sides.items() for k, (_, v) in d.items()})
    return out


def _alpha_ids(doms: Domains) -> dict[tuple, Tensor] | None:
    """The rows (ids) of each stored slope block: the same for every domain, not per domain."""
    if doms.alpha is None:
        return None
    return {(s, k): ids for s, d in doms.alpha.sides.items() for k, (ids, _) in d.items()}


def _build(leaves: dict[tuple, Tensor], ids: dict[tuple, Tensor] | None, signature: tuple | None) -> Domains:
    """Inverse of :func:`_leaves` (``ids``, ``signature``: the slopes' rows and graph)."""
    splits = {key[1]: v for key, v in leaves.items() if key[0] == "splits"}
    bounds = {key[1]: Box(v, leaves[("bounds", key[1], "upper")])
              for key, v in leaves.items() if key[0] == "bounds" and key[2] == "lower"}
    coeffs = {key[1]: v for key, v in leaves.items() if key[0] == "coeffs"}
    alpha = None
    if ids is not None:
        sides: dict[str, dict] = {}
        for (s, k), r in ids.items():
            sides.setdefault(s, {})[k] = (r, leaves[("alpha", s, k)])
        alpha = AlphaState(signature, leaves[("lb",)].shape[0], sides)
    return Domains(leaves[("rows",)], leaves[("lb",)], leaves[("sound",)],
                   Box(leaves[("box", "lower")], leaves[("box", "upper")]), splits, bounds, alpha, coeffs,
                   leaves.get(("choice",)))


def _grown(n: int) -> int:
    """Capacity for ``n`` domains: 1.5 n (at least 64), so that growing is rare (amortised
    O(1) copies per domain) and the buffers stay within 1.5 times the live domains."""
    return max(n + n // 2, 64)


class DomainQueue:
    """The open domains of one search (see the module doc): ``size``, :meth:`view` (the live
    domains, views of the buffers), :meth:`pop_lowest`, :meth:`push`, :meth:`nbytes`."""

    def __init__(self, doms: Domains):
        self._reset(doms)

    def _reset(self, doms: Domains) -> None:
        leaves = _leaves(doms)
        self.n = doms.size
        cap = _grown(self.n)
        self.buf = {}
        for k, v in leaves.items():
            b = v.new_empty((cap, *v.shape[1:]))
            b[: self.n] = v
            self.buf[k] = b
        self.ids = _alpha_ids(doms)
        self.signature = doms.alpha.signature if doms.alpha is not None else None

    @property
    def size(self) -> int:
        return self.n

    @property
    def capacity(self) -> int:
        return self.buf[("lb",)].shape[0]

    def view(self) -> Domains:
        """The live domains (views of the buffers: valid until the next pop or push)."""
        return _build({k: b[: self.n] for k, b in self.buf.items()}, self.ids, self.signature)

    def pop_lowest(self, k: int) -> Domains:
        """Take out the (at most) ``k`` domains with the lowest ``lb`` (a copy, in no set order)."""
        k = min(k, self.n)
        take = torch.topk(self.buf[("lb",)][: self.n], k, largest=False, sorted=False).indices
        out = _build({key: b[: self.n][take] for key, b in self.buf.items()}, self.ids, self.signature)
        gone = torch.zeros(self.n, dtype=torch.bool, device=take.device)
        gone[take] = True
        m = self.n - k
        holes = gone[:m].nonzero().flatten()  # taken domains before the new end
        movers = (~gone[m:]).nonzero().flatten() + m  # live domains after it, as many as holes
        if holes.numel():
            for b in self.buf.values():
                b[holes] = b[movers]
        self.n = m
        return out

    def _fits(self, leaves: dict[tuple, Tensor], doms: Domains) -> bool:
        if leaves.keys() != self.buf.keys():
            return False
        for key, v in leaves.items():
            b = self.buf[key]
            if v.shape[1:] != b.shape[1:] or v.dtype != b.dtype or v.device != b.device:
                return False
        ids = _alpha_ids(doms)
        return ids is None or all(torch.equal(r, self.ids[key]) for key, r in ids.items())

    def push(self, doms: Domains) -> None:
        """Put ``doms`` in (copies them)."""
        if doms.size == 0:
            return
        leaves = _leaves(doms)
        if not self._fits(leaves, doms):
            self._reset(Domains.cat([self.view(), doms]) if self.n else doms)
            return
        need = self.n + doms.size
        if need > self.capacity:
            cap = _grown(need)
            for key, b in self.buf.items():
                nb = b.new_empty((cap, *b.shape[1:]))
                nb[: self.n] = b[: self.n]
                self.buf[key] = nb
        for key, v in leaves.items():
            self.buf[key][self.n : need] = v
        self.n = need

    def nbytes(self) -> int:
        """Bytes of the buffers: what the queue holds in memory (room for 1.5 times the most
        domains it held; :meth:`Domains.nbytes` of :meth:`view` counts the live ones only)."""
        return sum(b.numel() * b.element_size() for b in self.buf.values())


__all__ = ["DomainQueue", "Domains"]
