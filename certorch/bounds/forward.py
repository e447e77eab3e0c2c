"""Forward interpreters: zonotope (DeepZ; COLT/MAAR regions; Cauchy projections) and symbolic intervals.

Both walk the graph in topological order and keep one abstract value per node in
``ctx.regions``; ``ctx.boxes`` receives each node's concretized bounds (per-layer access).
"""
from __future__ import annotations

from certorch.bounds.context import BoundContext
from certorch.domains.box import Box
from certorch.domains.symbolic import SymbolicInterval
from certorch.domains.zonotope import Zonotope
from certorch.errors import UnsupportedOperationError


def zonotope_region(ctx: BoundContext, idx: int) -> Zonotope:
    """Zonotope of node ``idx`` (DeepZ ReLU transformer; projected generators if ctx.projections)."""
    return _run(ctx, idx, _zono_input, _zono_relu)


def symbolic_region(ctx: BoundContext, idx: int) -> SymbolicInterval:
    """Symbolic interval of node ``idx`` (two parallel linear bounds per ReLU)."""
    return _run(ctx, idx, lambda c: SymbolicInterval.from_box(c.box), _sym_relu)


def _run(ctx: BoundContext, idx: int, make_input, relu_rule):
    if idx in ctx.regions:
        return ctx.regions[idx]
    for i in ctx.graph.ancestors(idx):
        if i in ctx.regions:
            continue
        node = ctx.graph.nodes[i]
        if node.is_input:
            region = make_input(ctx)
        elif node.is_affine:
            ins = [ctx.regions[j] for j in node.inputs]
            region = ins[0].map(ctx.affine_map(i), *ins[1:])
        elif node.is_activation:
            if node.op.kind != "relu":
                raise UnsupportedOperationError(
                    f"forward symbolic methods support ReLU activations only, not {node.op.kind!r} at {node.name!r}"
                )
            region = relu_rule(ctx, i, ctx.regions[node.inputs[0]], node)
        else:
            raise UnsupportedOperationError(f"node {node.name!r} ({node.op.kind}) is not supported")
        ctx.regions[i] = region
    return ctx.regions[idx]


def _zono_input(ctx: BoundContext) -> Zonotope:
    return Zonotope.from_box(ctx.box, ctx.projections, ctx.generator, block_id=0)


def _record(ctx: BoundContext, idx: int, box: Box) -> Box:
    ctx.boxes.setdefault(idx, box)
    return box


def _zono_relu(ctx: BoundContext, i: int, z: Zonotope, node) -> Zonotope:
    pre = _record(ctx, node.inputs[0], z.box())
    lam, mu = node.op.relaxation.deepz(pre.lower, pre.upper)
    return z.scale(lam, mu).add_block(i, mu, ctx.projections, ctx.generator)


def _sym_relu(ctx: BoundContext, i: int, s: SymbolicInterval, node) -> SymbolicInterval:
    pre = _record(ctx, node.inputs[0], s.box())
    slope, bias = node.op.relaxation.upper_line(pre.lower, pre.upper)
    return s.relu(slope, bias)
