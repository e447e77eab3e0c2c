"""Per-call scratch for bound computation (DESIGN.md item 1: bounds are returned values).

A :class:`BoundContext` lives for one ``bound()`` call: the graph, the input box, dtype, the
clean point's forward values, and caches of per-node boxes and abstract values. Nothing is
ever written onto modules.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from certorch.domains.box import Box
from certorch.errors import DeadlineExceeded
from certorch.graph.ir import Graph
from certorch.ops.maps import AffineMap


@dataclass
class BoundContext:
    graph: Graph
    box: Box  # input box, (B, *input_shape)
    x: Tensor  # the clean point (B, *input_shape), for train-mode BatchNorm statistics
    dtype: torch.dtype
    intermediate: str = "ibp"  # how pre-activation bounds are computed: ibp | crown | zonotope | symbolic
    slope: str = "adaptive"  # ReLU lower slope for backward passes
    projections: int | None = None  # Cauchy projections for zonotope / dual intermediate bounds
    projection_dtype: torch.dtype | None = None  # dtype of the projected generator block (None: ``dtype``)
    generator: torch.Generator | None = None
    max_elements: int = 2**27  # largest coefficient tensor a backward pass may build (chunks the spec)
    patches: bool = True  # window coefficients for intermediate bounds of conv maps (False: dense)
    memory_budget: int | None = None  # bytes; forward interpreters check each node against it
    deadline: float | None = None  # time.perf_counter() value; checked between nodes
    keep_regions: bool = False  # keep every node's forward abstract value (return_intermediate)
    options: dict[str, Any] = field(default_factory=dict)  # method options from bound() (alpha_iters, ...)
    alpha: Any = None  # per-row ReLU lower slopes of one alpha-CROWN pass (certorch.bounds.alpha)
    #: split constraints (branch and bound): node index -> (B, n) int8 per neuron of that node,
    #: +1: the domain has z >= 0, -1: z <= 0, 0: free (see :func:`apply_splits`)
    splits: dict[int, Tensor] = field(default_factory=dict)
    #: bounds of nodes known to hold over the domain (e.g. a parent domain's), used instead of computing them
    given: dict[int, Box] = field(default_factory=dict)
    #: nodes whose ``given`` boxes are priors: computed anyway and intersected with them (the
    #: other given boxes are used as they are)
    refine: frozenset[int] = frozenset()
    extra: dict[str, Any] = field(default_factory=dict)  # method outputs for BoundResult.extra
    boxes: dict[int, Box] = field(default_factory=dict)  # bounds per node (the best known)
    ibp_boxes: dict[int, Box] = field(default_factory=dict)
    regions: dict[int, Any] = field(default_factory=dict)  # forward abstract values (zonotope/symbolic)
    forward_done: set[int] = field(default_factory=set)  # nodes the forward interpreter has computed
    _values: list[Tensor] | None = None
    _maps: dict[int, AffineMap] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.box.lower.shape[0]

    @property
    def values(self) -> list[Tensor]:
        if self._values is None:
            self._values = self.graph.forward(self.x)
        return self._values

    def tick(self) -> None:
        """Raise :class:`DeadlineExceeded` once the deadline has passed (called between nodes)."""
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise DeadlineExceeded("bound computation ran past its deadline")

    def known(self, idx: int, box: Box) -> Box:
        """``box`` of node ``idx`` intersected with its given bounds (nodes in ``refine``) and
        restricted to the split constraints: what a computed box becomes."""
        if idx in self.refine and idx in self.given:
            box = box.intersect(self.given[idx])
        return self.constrain(idx, box)

    def constrain(self, idx: int, box: Box) -> Box:
        """``box`` of node ``idx`` restricted to the domain's split constraints (identity without
        splits on ``idx``): ``z >= 0`` raises the lower bound to 0, ``z <= 0`` lowers the upper
        bound to 0. Where a split contradicts the bounds the box is empty (lower > upper): the
        domain is infeasible, and every bound of an empty domain is sound."""
        s = self.splits.get(idx)
        return box if s is None else constrain_to_splits(box, s)

    def affine_map(self, idx: int) -> AffineMap:
        """The node's affine map (cached for this call)."""
        if idx not in self._maps:
            node = self.graph.nodes[idx]
            needs_values = getattr(node.op, "kind", "") == "batchnorm"
            vals = [self.values[i] for i in node.inputs] if needs_values else None
            self._maps[idx] = node.op.affine(self.dtype, vals)
        return self._maps[idx]


def constrain_to_splits(box: Box, signs: Tensor) -> Box:
    """``box`` (B, *shape) of a pre-activation restricted to split signs (B, *shape) int8: +1
    (``z >= 0``) raises the lower bound to 0, -1 (``z <= 0``) lowers the upper bound to 0, 0 keeps
    it. A split that contradicts the bounds leaves an empty box (lower > upper)."""
    s = signs.view(box.lower.shape)
    zero = torch.zeros((), dtype=box.lower.dtype, device=box.lower.device)
    return Box(torch.where(s > 0, torch.maximum(box.lower, zero), box.lower),
               torch.where(s < 0, torch.minimum(box.upper, zero), box.upper))
