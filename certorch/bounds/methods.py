"""Bound methods as compositions: (intermediate-bound strategy) + (final-layer strategy).

``crown-ibp`` is literally IBP intermediate bounds + a backward pass for the last layer; a method
name maps to a :class:`BoundMethod` value, not to flags inside one big function (DESIGN.md item 4).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from certorch.bounds.alpha import alpha_bounds
from certorch.bounds.backward import backward_bounds, offset_dot
from certorch.bounds.context import BoundContext
from certorch.bounds.forward import symbolic_region, zonotope_region
from certorch.bounds.ibp import ibp_box
from certorch.bounds.intermediate import pre_bounds
from certorch.errors import CertorchError
from certorch.relax.relu import LOWER_SLOPES


@dataclass(frozen=True)
class BoundMethod:
    name: str
    final: str  # ibp | zonotope | symbolic | backward | alpha
    intermediate: str  # ibp | crown | zonotope | symbolic | alpha
    slope: str = "adaptive"  # ReLU lower slope in backward passes
    supports_projections: bool = False
    description: str = ""
    #: intermediate strategy when no projections are asked for, if it gives the same bounds faster
    exact_intermediate: str | None = None


def intermediate_for(m: BoundMethod, projections: int | None) -> str:
    """The intermediate-bound strategy ``m`` runs with (``projections``: Cauchy estimates or None)."""
    return m.intermediate if projections or m.exact_intermediate is None else m.exact_intermediate


METHODS: dict[str, BoundMethod] = {}

#: final strategies that plug in from modules above the bound engine (DESIGN.md: they register,
#: the engine does not import them): ``fn(ctx, C, upper) -> (lower (B, S), upper (B, S) | None)``.
FINALS: dict[str, Callable] = {}
#: modules that register methods with such strategies, imported on the first lookup they can answer
PLUGIN_MODULES: tuple[str, ...] = ("certorch.verify.triangle",)
_plugins_loaded = False


def register_method(m: BoundMethod) -> BoundMethod:
    METHODS[m.name] = m
    return m


def register_final(name: str, fn: Callable) -> None:
    """Register the final strategy ``name`` (see :data:`FINALS`)."""
    FINALS[name] = fn


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for mod in PLUGIN_MODULES:
            importlib.import_module(mod)


register_method(BoundMethod("ibp", "ibp", "ibp", description="interval bound propagation"))
register_method(
    BoundMethod(
        "zonotope",
        "zonotope",
        "zonotope",
        supports_projections=True,
        description="forward zonotope (DeepZ; COLT/MAAR convex regions a + A e)",
    )
)
register_method(
    BoundMethod("symbolic", "symbolic", "symbolic", description="symbolic intervals with symbolic linear relaxation (MixTrain)")
)
register_method(
    BoundMethod("crown", "backward", "crown", "adaptive", description="backward linear relaxation, CROWN intermediate bounds (DeepPoly)")
)
register_method(
    BoundMethod("crown-ibp", "backward", "ibp", "adaptive", description="IBP intermediate bounds + CROWN final layer")
)
register_method(
    BoundMethod(
        "dual",
        "backward",
        "zonotope",
        "parallel",
        supports_projections=True,
        description="Wong-Kolter dual network (u/(u-l) slopes); projections=r for Cauchy estimates",
        # exact: the dual network's layer-by-layer bounds are backward passes with u/(u-l) slopes,
        # equal to the forward zonotope's (tests/unit/test_bounds.py); bound_many picks the cheaper
        # form by a cost model (memory.backward_beats_zonotope): backward on conv nets (5-17x faster
        # on mnist_small / cifar_small), the zonotope on deep wide dense nets (mnist_fc2, mnist_large)
        exact_intermediate="crown",
    )
)
register_method(
    BoundMethod(
        "alpha-crown",
        "alpha",
        "alpha",
        "adaptive",
        description="CROWN with optimised ReLU lower slopes per neuron and spec row (alpha_iters=, alpha_lr=, alpha_state=)",
    )
)


def get_method(name: str) -> BoundMethod:
    key = name.lower().replace("_", "-")
    if key not in METHODS:
        _load_plugins()
    if key not in METHODS:
        raise CertorchError(f"unknown bound method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[key]


def list_methods() -> list[str]:
    _load_plugins()
    return list(METHODS)


def merge_spec(ctx: BoundContext, C: Tensor) -> tuple[int, Tensor, Tensor]:
    """Fold the spec ``C`` (B, S, *out_shape) into the trailing single-input affine ops.

    Returns (node, A, bias) with ``C . f(x) = A . v_node + bias``; ``node`` is the last
    node that is not part of that affine tail (the last layer is merged with the spec).
    """
    graph = ctx.graph
    B, S = C.shape[:2]
    A, bias = C, torch.zeros(B, S, dtype=C.dtype, device=C.device)
    i = graph.output
    while True:
        node = graph.nodes[i]
        if not node.is_affine or len(node.inputs) != 1:
            break
        j = node.inputs[0]
        if len(graph.users[j]) != 1 and not graph.nodes[j].is_input:
            break
        m = ctx.affine_map(i)
        off = m.offset()
        if off is not None:
            bias = bias + offset_dot(A, off)
        (A_j,) = m.transpose(A.reshape(B * S, *A.shape[2:]))
        A = A_j.reshape(B, S, *A_j.shape[1:])
        i = j
    return i, A, bias


def run_method(method: BoundMethod, ctx: BoundContext, C: Tensor, upper: bool = True) -> tuple[Tensor, Tensor | None]:
    """Lower/upper bounds (B, S) of ``C . f(x)`` over the context's input box.

    ``upper=False`` lets backward methods skip the upper bound (None), halving their last pass;
    forward methods get both at no extra cost and return both. A spec with no rows (S = 0) bounds
    nothing at the output: only the activations' input bounds are computed (for
    ``return_intermediate``, e.g. the ReLU relaxations of a COLT latent region).
    """
    if C.shape[1] == 0:
        for n in ctx.graph.activation_nodes():
            pre_bounds(ctx, n.inputs[0])
        empty = C.new_zeros(C.shape[:2])
        return empty, (empty if upper else None)
    if method.final == "backward":
        return backward_bounds(ctx, ctx.graph.output, C, lambda i: pre_bounds(ctx, i), upper)
    if method.final == "alpha":
        return alpha_bounds(ctx, C, upper)
    if method.final in FINALS:
        return FINALS[method.final](ctx, C, upper)
    node, A, bias = merge_spec(ctx, C)
    if method.final == "ibp":
        box = ibp_box(ctx, node)
        Af = A.flatten(2)
        c = torch.einsum("bsi,bi->bs", Af, box.center.flatten(1)) + bias
        r = torch.einsum("bsi,bi->bs", Af.abs(), box.radius.flatten(1))
        return c - r, c + r
    if method.final == "zonotope":
        return zonotope_region(ctx, node).linear_bounds(A, bias)
    if method.final == "symbolic":
        return symbolic_region(ctx, node).linear_bounds(A, bias)
    raise ValueError(f"unknown final strategy {method.final!r}")


def check_slope(slope: str) -> None:
    if slope not in LOWER_SLOPES:
        raise CertorchError(f"unknown ReLU lower slope {slope!r}; valid: {', '.join(LOWER_SLOPES)}")
