"""Latent adversarial attack (COLT, Balunovic & Vechev 2020; MAAR).

The zonotope of a hidden node ``l`` over the input ball is a convex region ``a + A e`` with
``e in [-1, 1]^m``. The latent attack runs PGD over the error coefficients ``e`` (projected by
clamping) on the sub-network from ``l`` to the output, maximizing the loss. A latent point whose
output is misclassified shows that the convex relaxation up to layer ``l`` is too loose to
certify (it need not be reachable from a real input). COLT's layerwise training trains on these
points; as an evaluation the attack reports the *latent robustness* of each example.

    res = latent_attack(model, x, y, eps=0.1, layer="3", steps=40)
    res.latent      # (B, *latent_shape) adversarial latent points
    res.success     # (B,) latent region contains a point the rest of the net misclassifies
    out = forward_from(capture(model, x.shape[1:]), "3", res.latent)   # differentiable (training)

The latent attack does not fit :class:`certorch.attacks.Attack` (whose result lives in input
space), so it is a function returning a :class:`LatentAttackResult`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certorch.attacks.base import frozen_parameters, worst_margin
from certorch.attacks.pgd_attack import LOSSES, attack_loss, _check_int, _check_positive, _check_seed
from certorch.bounds.api import bound
from certorch.domains.zonotope import Zonotope
from certorch.errors import CertorchError
from certorch.graph.capture import capture
from certorch.graph.ir import Graph, Node

__all__ = ["LatentAttackResult", "latent_attack", "latent_region", "forward_from", "cut_nodes"]


@dataclass(frozen=True)
class LatentAttackResult:
    """Outcome of :func:`latent_attack` on a batch.

    Attributes:
        latent: (B, *latent_shape) best latent points ``a + A e`` found (detached).
        coefficients: (B, m) their error coefficients ``e`` in [-1, 1].
        loss: (B,) loss of the sub-network output at ``latent`` (the attack maximizes it).
        logits: (B, K) sub-network output at ``latent``, re-evaluated in float64.
        margin: (B,) ``min_{j != y} logit[y] - logit[j]`` (float64 re-check); < 0 = violation.
        success: (B,) bool, ``margin < 0``: the latent region holds a misclassified point.
        layer: the name of the latent node.
    """

    latent: Tensor
    coefficients: Tensor
    loss: Tensor
    logits: Tensor
    margin: Tensor
    success: Tensor
    layer: str

    @property
    def latent_robust_accuracy(self) -> float:
        """Fraction of the batch without a latent violation."""
        return float((~self.success).float().mean()) if self.success.numel() else float("nan")


def cut_nodes(graph: Graph, node: Node) -> list[Node]:
    """Nodes after ``node`` needed for the output, in topological order.

    Raises :class:`CertorchError` unless ``node`` is a cut: every path from the input to the
    output passes through it (no skip connection jumps over it).
    """
    needed = set(graph.ancestors(graph.output))
    if node.index not in needed:
        raise CertorchError(f"layer {node.name!r} does not feed the output")
    after = []
    for n in graph.nodes[node.index + 1:]:
        if n.index not in needed:
            continue
        for i in n.inputs:
            if i < node.index:
                raise CertorchError(
                    f"layer {node.name!r} is not a cut of the graph: node {n.name!r} also reads "
                    f"{graph.nodes[i].name!r} from before it"
                )
        after.append(n)
    return after


def forward_from(graph: Graph, layer: str | int, value: Tensor) -> Tensor:
    """Output of the sub-network from node ``layer`` on (B, *layer_shape) ``value``.

    Evaluates the nodes after ``layer`` with ``node.op.forward`` (differentiable w.r.t. ``value``
    and the live model parameters); returns (B, *output_shape).
    """
    node = graph.node(layer)
    if tuple(value.shape[1:]) != tuple(node.shape):
        raise CertorchError(f"latent value of shape {tuple(value.shape[1:])} does not match layer {node.name!r} {node.shape}")
    vals: dict[int, Tensor] = {node.index: value}
    for n in cut_nodes(graph, node):
        vals[n.index] = n.op.forward(*(vals[i] for i in n.inputs))
    return vals[graph.output]


def latent_region(model: nn.Module, x: Tensor, eps: float | Tensor, layer: str | int, lo=0.0, hi=1.0) -> tuple[Tensor, Tensor]:
    """The zonotope ``a + A e`` of node ``layer`` over ``linf_ball(x, eps, lo, hi)``, detached.

    Returns ``(a (B, *shape), A (B, m, *shape))`` with all generator blocks concatenated.
    """
    graph = capture(model, tuple(x.shape[1:]))
    node = graph.node(layer)
    if node.index == graph.output:
        raise CertorchError(f"layer {node.name!r} is the output; pick a hidden layer")
    with torch.no_grad():
        res = bound(model, x, eps, method="zonotope", lo=lo, hi=hi, return_intermediate=True)
    z = res.regions.get(node.name)
    if not isinstance(z, Zonotope):
        raise CertorchError(f"no zonotope region for layer {node.name!r}; layers with one: {', '.join(res.regions)}")
    if z.projected:
        raise CertorchError("the zonotope uses random projections; latent attacks need the exact region")
    blocks = [G.detach() for _, G in sorted(z.blocks.items())]
    if not blocks:
        A = torch.zeros(z.center.shape[0], 0, *z.center.shape[1:], dtype=z.center.dtype, device=z.center.device)
    else:
        A = torch.cat(blocks, dim=1)
    return z.center.detach(), A


def _point(a: Tensor, A: Tensor, e: Tensor) -> Tensor:
    """``a + sum_k e_k A_k``: (B, *shape) from a (B, *shape), A (B, m, *shape), e (B, m)."""
    return a + torch.einsum("bm,bm...->b...", e, A)


def latent_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    layer: str | int,
    steps: int = 40,
    *,
    step_size: float = 0.25,
    loss: str = "ce",
    restarts: int = 1,
    random_start: bool = True,
    lo: float | Tensor = 0.0,
    hi: float | Tensor = 1.0,
    seed: int | None = None,
) -> LatentAttackResult:
    """PGD over ``e in [-1, 1]^m`` in the zonotope ``a + A e`` of node ``layer`` (see module doc).

    Args:
        x: (B, *input_shape) inputs; y: (B,) labels; eps: L-inf radius (float or tensor).
        layer: node name (as in ``capture(model, ...)``) or index; must be a cut of the graph.
        steps: sign-gradient steps per restart (>= 1); ``step_size``: step in coefficient units
            (coefficients live in [-1, 1]; COLT uses 0.25 with 8 steps).
        loss: ``"ce"`` or ``"margin"``; restarts: independent runs, best kept per example.
        random_start: start at uniform ``e`` (else at ``e = 0``, the zonotope center).
        seed: seed of a private generator for the random starts.
    Model parameters are frozen during the attack (no ``.grad`` written); train/eval mode is
    left as given. The final logits/margins are recomputed in float64.
    """
    if not isinstance(model, nn.Module):
        raise CertorchError(f"latent_attack needs an nn.Module, got {type(model).__name__}")
    steps = _check_int("steps", steps, 1)
    restarts = _check_int("restarts", restarts, 1)
    seed = _check_seed(seed)
    step_size = _check_positive("step_size", step_size)
    if loss not in LOSSES:
        raise CertorchError(f"unknown attack loss {loss!r}; valid: {', '.join(LOSSES)}")
    if restarts > 1 and not random_start:
        raise CertorchError("restarts > 1 needs random_start=True (deterministic restarts are identical)")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise CertorchError(f"labels y must be an integer tensor of shape ({x.shape[0]},)")
    y = y.to(x.device, torch.long)
    with torch.inference_mode(False), torch.enable_grad(), frozen_parameters(model):
        graph = capture(model, tuple(x.shape[1:]))
        node = graph.node(layer)
        a, A = latent_region(model, x, eps, node.name, lo, hi)
        gen = torch.Generator(device=x.device).manual_seed(seed) if seed is not None else None
        B, m = A.shape[:2]
        best_e = torch.zeros(B, m, dtype=a.dtype, device=a.device)
        best_l = torch.full((B,), -math.inf, dtype=a.dtype, device=a.device)
        shape = (-1, 1)
        for _ in range(restarts):
            if random_start:
                e = 2 * torch.rand(B, m, dtype=a.dtype, device=a.device, generator=gen) - 1
            else:
                e = torch.zeros(B, m, dtype=a.dtype, device=a.device)
            for t in range(steps + 1):
                e = e.detach().requires_grad_(t < steps)
                out = forward_from(graph, node.name, _point(a, A, e))
                if out.dim() != 2:
                    raise CertorchError(f"model must return logits of shape (B, K), got {tuple(out.shape)}")
                ls = attack_loss(out, y, loss)
                better = ls.detach() > best_l
                best_l = torch.where(better, ls.detach(), best_l)
                best_e = torch.where(better.view(shape), e.detach(), best_e)
                if t < steps:
                    (g,) = torch.autograd.grad(ls.sum(), e)
                    e = (e + step_size * torch.nan_to_num(g).sign()).clamp(-1.0, 1.0)
        latent = _point(a, A, best_e).detach()
        with torch.no_grad():  # float64 re-check of the reported points
            logits = forward_from(graph, node.name, latent.to(torch.float64))
    margin = worst_margin(logits, y)
    return LatentAttackResult(latent, best_e, best_l.detach(), logits, margin, margin < 0, node.name)
