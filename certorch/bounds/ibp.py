"""Interval bound propagation (IBP)."""
from __future__ import annotations

from certorch.bounds.context import BoundContext
from certorch.domains.box import Box
from certorch.errors import UnsupportedOperationError


def ibp_box(ctx: BoundContext, idx: int) -> Box:
    """IBP box of node ``idx`` (computes and caches its ancestors)."""
    if idx in ctx.ibp_boxes:
        return ctx.ibp_boxes[idx]
    for i in ctx.graph.ancestors(idx):
        if i not in ctx.ibp_boxes:
            ctx.tick()
            ctx.ibp_boxes[i] = ctx.known(i, _ibp_node(ctx, i))
    return ctx.ibp_boxes[idx]


def _ibp_node(ctx: BoundContext, i: int) -> Box:
    node = ctx.graph.nodes[i]
    if node.is_input:
        return ctx.box
    ins = [ctx.ibp_boxes[j] for j in node.inputs]
    if node.is_affine:
        m = ctx.affine_map(i)
        if m.monotone:  # non-negative coefficients (reshape, sum, pooling): bounds map to bounds
            return Box(m(*(b.lower for b in ins)), m(*(b.upper for b in ins)))
        center = m(*(b.center for b in ins))
        radius = m.apply_abs(*(b.radius for b in ins))
        return Box.from_center_radius(center, radius)
    if node.is_activation:
        return node.op.relaxation.interval(ins[0])
    raise UnsupportedOperationError(f"IBP does not support node {node.name!r} ({node.op.kind})")


def ibp_is_exact(ctx: BoundContext, idx: int) -> bool:
    """True when node ``idx`` is an affine image of the input box with at most one
    non-diagonal map on the way (then IBP bounds are exact)."""
    general = 0
    for i in ctx.graph.ancestors(idx):
        node = ctx.graph.nodes[i]
        if node.is_input:
            continue
        if not node.is_affine or len(node.inputs) != 1:
            return False
        if not ctx.affine_map(i).diagonal:
            general += 1
    return general <= 1
