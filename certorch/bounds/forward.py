"""Forward interpreters: zonotope (DeepZ; COLT/MAAR regions; Cauchy projections) and symbolic intervals.

Both walk the graph in topological order and keep one abstract value per node in
``ctx.regions``; ``ctx.boxes`` receives each node's concretized bounds (per-layer access).
"""
from __future__ import annotations

from certorch.bounds.context import BoundContext
from certorch.bounds.ibp import ibp_box, ibp_is_exact
from certorch.domains.box import Box
from certorch.domains.symbolic import SymbolicInterval
from certorch.domains.zonotope import Zonotope
from certorch.bounds.memory import check_node
from certorch.errors import UnsupportedOperationError


def zonotope_region(ctx: BoundContext, idx: int) -> Zonotope:
    """Zonotope of node ``idx`` (DeepZ ReLU transformer; projected generators if ctx.projections)."""
    return _run(ctx, idx, _zono_input, _zono_relu)


def symbolic_region(ctx: BoundContext, idx: int) -> SymbolicInterval:
    """Symbolic interval of node ``idx`` (two parallel linear bounds per ReLU)."""
    return _run(ctx, idx, lambda c: SymbolicInterval.from_box(c.box), _sym_relu)


def _run(ctx: BoundContext, idx: int, make_input, relu_rule):
    """Walk the ancestors of ``idx`` in topological order. A node's value is dropped once all its
    users are computed (unless ``ctx.keep_regions``); each node's size is checked against the
    memory budget before it is computed (:func:`certorch.bounds.memory.check_node`)."""
    if idx in ctx.regions:
        return ctx.regions[idx]
    done = ctx.forward_done
    for i in ctx.graph.ancestors(idx):
        if i in ctx.regions or i in done:
            continue
        ctx.tick()
        node = ctx.graph.nodes[i]
        _check_memory(ctx, i)
        if node.is_input:
            region = make_input(ctx)
        elif node.is_affine:
            ins = [ctx.regions[j] for j in node.inputs]
            region = ins[0].map(ctx.affine_map(i), *ins[1:])
        elif node.is_activation:
            if getattr(node.op.relaxation, "parallel_lines", None) is None:
                raise UnsupportedOperationError(
                    f"forward symbolic methods (zonotope, symbolic) need parallel lines, which {node.op.kind!r} "
                    f"does not provide (node {node.name!r}); use a backward method such as crown"
                )
            region = relu_rule(ctx, i, ctx.regions[node.inputs[0]], node)
        else:
            raise UnsupportedOperationError(f"node {node.name!r} ({node.op.kind}) is not supported")
        ctx.regions[i] = region
        done.add(i)
        if not ctx.keep_regions:
            _release(ctx, node, done)
    return ctx.regions[idx]


def _release(ctx: BoundContext, node, done: set) -> None:
    """Drop the values of ``node``'s inputs whose users are all computed."""
    for j in node.inputs:
        if j in ctx.regions and all(u in done for u in ctx.graph.users[j]):
            del ctx.regions[j]


def _nbytes(region) -> int:
    return sum(t.numel() * t.element_size() for t in region.tensors())


def _check_memory(ctx: BoundContext, i: int) -> None:
    """Estimate node ``i``'s value (as large as its largest input's, per neuron, plus one
    block of new error terms for a ReLU) before computing it."""
    if ctx.memory_budget is None:
        return
    node = ctx.graph.nodes[i]
    if node.is_input:
        per_neuron = ctx.projections or node.numel
        item = ctx.box.lower.element_size()
        new = 2 * ctx.batch * per_neuron * node.numel * item  # eye and its scaled copy
    else:
        ins = [ctx.regions[j] for j in node.inputs]
        per_neuron = max(r.terms() for r in ins)
        if node.is_activation and isinstance(ins[0], Zonotope):
            if ctx.projections:  # r new columns, merged into the projected block
                per_neuron += ctx.projections
            else:  # one generator per neuron unstable for some example
                pre = _pre_box(ctx, node.inputs[0], ins[0])
                per_neuron += int(node.op.relaxation.needs_bounds(pre.lower, pre.upper).flatten(1).any(0).sum())
        item = ins[0].center.element_size()
        new = ctx.batch * per_neuron * node.numel * item
    live = sum(_nbytes(r) for r in ctx.regions.values())
    check_node(ctx, i, new, live)


def _zono_input(ctx: BoundContext) -> Zonotope:
    return Zonotope.from_box(ctx.box, ctx.projections, ctx.generator, block_id=0, projection_dtype=ctx.projection_dtype)


def zonotope_box(ctx: BoundContext, idx: int) -> Box:
    """Bounds of node ``idx`` from its zonotope (see :func:`_pre_box`), which is built only when
    the box needs it (not for a cached box, nor where IBP's box is taken)."""
    needs_region = idx not in ctx.boxes and not _projected_but_ibp_exact(ctx, idx)
    return _pre_box(ctx, idx, zonotope_region(ctx, idx) if needs_region else None)


def _projected_but_ibp_exact(ctx: BoundContext, idx: int) -> bool:
    """With Cauchy projections the zonotope's box is a random estimate of the exact zonotope
    bounds; where those equal IBP's (node ``idx`` an affine image of the input box with one
    general map, e.g. the first layer) IBP's box is that exact value, and cheaper."""
    return bool(ctx.projections) and ibp_is_exact(ctx, idx)


def _pre_box(ctx: BoundContext, idx: int, region) -> Box:
    """Bounds of node ``idx`` from its region (computed once, recorded in ctx.boxes); ``region``
    may be None where it is not read (a cached box, or IBP's exact box under projections)."""
    if idx not in ctx.boxes:
        ctx.boxes[idx] = ibp_box(ctx, idx) if _projected_but_ibp_exact(ctx, idx) else region.box()
    return ctx.boxes[idx]


def _zono_relu(ctx: BoundContext, i: int, z: Zonotope, node) -> Zonotope:
    """DeepZ: ``f(z) in lam z + (b_low + b_up) / 2 +- (b_up - b_low) / 2`` (a new error term per neuron)."""
    pre = _pre_box(ctx, node.inputs[0], z)
    lam, b_low, b_up = node.op.relaxation.parallel_lines(pre.lower, pre.upper)
    mu = (b_up - b_low) / 2
    j = node.inputs[0]  # the pre-activation zonotope: nothing reads it after its only user
    consume = not ctx.keep_regions and ctx.graph.users[j] == [i]
    return z.scale_and_extend(lam, b_low + mu, mu, i, ctx.projections, ctx.generator, consume=consume)


def _sym_relu(ctx: BoundContext, i: int, s: SymbolicInterval, node) -> SymbolicInterval:
    """Symbolic intervals: ``low -> lam low + b_low``, ``up -> lam up + b_up`` (lam >= 0)."""
    pre = _pre_box(ctx, node.inputs[0], s)
    lam, b_low, b_up = node.op.relaxation.parallel_lines(pre.lower, pre.upper)
    return s.relu(lam, b_up, b_low)
