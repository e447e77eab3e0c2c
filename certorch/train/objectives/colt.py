"""Layerwise latent adversarial training: COLT, MAT and MAAR.

COLT (Balunovic & Vechev 2020) trains in stages. In stage ``l`` the convex region of layer
``l`` over the input ball, the DeepZ zonotope ``C_l(x) = {a_l + A_l e : e in [-1, 1]^m}``, is
searched by a latent PGD attack (MAAR paper, Eq. 21-22)::

    e <- clip(e + step * sign(A_l^T grad_x' ADV(x', y)), -1, 1),   x' = a_l + A_l e

and the rest of the network (layers after ``l``; the prefix is frozen by the stage's
``freeze``) is trained on ``x'``. Stage 0 is the input layer: ``C_0(x)`` is the input box and
the attack is PGD in it (steps in coefficient units: ``step_size * eps`` in pixels).

* ``colt``: ``clean_weight * CE(p(x), y) + adv_weight * CE(p(x'), y)``.
* ``mat`` (MAAR paper, Eq. 2): the same, but misclassified examples use the network's own
  prediction ``argmax p(x)`` as the label of the adversarial term (and of the attack).
* ``maar`` (Eq. 14): ``CE(p(x), y) + CE(p(x'), y) + kl_weight * KL(p(x) || p(x')) * (1 - p_y(x))``,
  ``kl_weight`` (lambda) 6 by default; the soft weight ``1 - p_y(x)`` is not detached.

The region is held implicitly: ``A_l`` is never formed. With the ReLU relaxations
``relu(z) in lam z + mu + mu e`` fixed by pre-activation bounds, ``a_l + A_l e`` is a forward
pass of the prefix on ``center + radius * e_0`` with ReLU ``i`` replaced by
``lam_i z + mu_i + mu_i e_i`` (one coefficient block per input pixel and per ReLU neuron),
so ``A_l^T grad`` is ordinary backpropagation to the blocks ``e_i``. The pre-activation bounds
come from ``ct.bound(method="zonotope")``, with ``projections`` Cauchy random projections for
the L1 norms (training estimates, as in COLT; ``projections: null`` uses the exact zonotope, and
the region is then exactly the zonotope ``ct.bound`` returns). The projected generators are
mapped in ``projection_dtype`` (``auto``: bfloat16 where the hardware computes it natively,
about 2x faster, moving the estimates by about 0.3 %, far less than their Cauchy spread of about
20 %; ``float32`` or null keeps the model's dtype).

The latent layer of stage ``s`` is ``layers[s]`` (node names as in ``capture(model)``; the
registry's Sequential models name them by position: ``"2"`` is the first ReLU of
``colt_mnist``); the default is ``input`` followed by every ReLU node. Freeze the prefix in
the run's ``stages:`` (``freeze: "2"`` in the stage whose latent layer is ``"2"``).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certorch.attacks.base import frozen_parameters
from certorch.attacks.latent import cut_nodes, forward_from
from certorch.bounds.api import bound
from certorch.bounds.methods import get_method
from certorch.domains.zonotope import resolve_projection_dtype
from certorch.errors import CertorchError, UnsupportedOperationError, require
from certorch.graph.capture import capture
from certorch.graph.ir import Graph, Node
from certorch.nn.mode import eval_mode
from certorch.spec import linf_ball
from certorch.train.objectives.base import LossOutput, Objective, TrainState, register_objective
from certorch.train.objectives.certified import verified_accuracies

__all__ = ["LatentRegion", "latent_region_of", "latent_pgd", "consistency_kl", "misclassification_weight",
           "COLT", "MAT", "MAAR"]


# ---------------------------------------------------------------------- the region
@dataclass
class LatentRegion:
    """``C_l(x) = {a + A e}`` of node ``node``, held as the prefix's relaxed forward pass.

    ``center``/``radius``: (B, *input_shape) input box; ``relu``: node index -> (lam, mu), each
    (B, *node_shape), the DeepZ lines of every ReLU before (and at) ``node``. Coefficient blocks
    (see :meth:`shapes`): block 0 has the input's shape, block ``k`` the shape of the k-th ReLU.
    """

    graph: Graph
    node: Node
    order: list[Node]
    center: Tensor
    radius: Tensor
    relu: dict[int, tuple[Tensor, Tensor]]
    _maps: dict[int, Any] | None = field(default=None, repr=False, compare=False)  # affine maps, for linear()

    def shapes(self) -> list[tuple[int, ...]]:
        """Per-example shapes of the coefficient blocks ``e_0, e_1, ...``."""
        return [tuple(self.center.shape[1:])] + [tuple(self.relu[n.index][1].shape[1:]) for n in self.order
                                                 if n.index in self.relu]

    def coefficients(self, random: bool, generator: torch.Generator | None = None) -> list[Tensor]:
        """Blocks ``e_k`` (B, *shape_k): uniform in [-1, 1] (``random``) or 0 (the center ``a``)."""
        B, ref = self.center.shape[0], self.center
        out = []
        for shape in self.shapes():
            if random:
                out.append(2 * torch.rand(B, *shape, dtype=ref.dtype, device=ref.device, generator=generator) - 1)
            else:
                out.append(torch.zeros(B, *shape, dtype=ref.dtype, device=ref.device))
        return out

    def point(self, es: list[Tensor]) -> Tensor:
        """``a + A e`` (B, *node_shape) for coefficient blocks ``es``; differentiable in ``es``."""
        vals: dict[int, Tensor] = {0: self.center + self.radius * es[0]}
        k = 1
        for n in self.order:
            if n.is_affine:
                vals[n.index] = n.op.forward(*(vals[i] for i in n.inputs))
            else:  # a ReLU (checked when the region was built)
                lam, mu = self.relu[n.index]
                vals[n.index] = lam * vals[n.inputs[0]] + mu + mu * es[k]
                k += 1
        return vals[self.node.index]

    def linear(self, es: list[Tensor]) -> Tensor:
        """``A e`` (B, *node_shape): ``point(es)`` less the center ``point(0)``, differentiable in
        ``es``; the affine maps' linear parts and the ReLU lines' ``lam z + mu e`` only (two passes
        per ReLU layer instead of four: the latent attack's inner loop). The maps are the
        modules' fixed ones (eval mode: a BatchNorm in training mode raises)."""
        maps = self._linear_maps()
        vals: dict[int, Tensor] = {0: self.radius * es[0]}
        k = 1
        for n in self.order:
            if n.is_affine:
                vals[n.index] = maps[n.index].apply(*(vals[i] for i in n.inputs))
            else:
                lam, mu = self.relu[n.index]
                vals[n.index] = torch.addcmul(lam * vals[n.inputs[0]], mu, es[k])
                k += 1
        return vals[self.node.index]

    def _linear_maps(self) -> dict[int, Any]:
        if self._maps is None:
            self._maps = {n.index: n.op.affine(self.center.dtype) for n in self.order if n.is_affine}
        return self._maps


def _prefix_nodes(graph: Graph, node: Node) -> list[Node]:
    order = [graph.nodes[i] for i in graph.ancestors(node.index) if not graph.nodes[i].is_input]
    for n in order:
        if not n.is_affine and not (n.is_activation and n.op.kind == "relu"):
            raise UnsupportedOperationError(f"latent regions support affine layers and ReLU only, not "
                                            f"{n.op.kind!r} at {n.name!r}")
    return order


def latent_region_of(
    model: nn.Module, graph: Graph, node: Node, x: Tensor, eps: float, projections: int | None,
    lo: float = 0.0, hi: float = 1.0, projection_dtype: torch.dtype | None = None,
) -> LatentRegion:
    """The region of ``node`` of ``graph`` (a capture of ``model``) over ``linf_ball(x, eps)``.

    Pre-activation bounds of its ReLUs from ``ct.bound(model, method="zonotope",
    projections=projections, projection_dtype=projection_dtype)`` (no gradient; modules in
    their current modes). The region itself (center, radius, DeepZ lines) is in ``x``'s dtype.
    """
    box = linf_ball(x.detach(), eps, lo, hi)
    order = _prefix_nodes(graph, node)
    relus = [n for n in order if not n.is_affine]
    relu: dict[int, tuple[Tensor, Tensor]] = {}
    if relus:
        with torch.no_grad():
            C = torch.zeros(0, _numel(graph.output_shape), dtype=x.dtype, device=x.device)  # no spec rows: only the ReLUs' input bounds
            res = bound(model, x.detach(), eps, method="zonotope", C=C, lo=lo, hi=hi, return_intermediate="boxes",
                        projections=projections, projection_dtype=projection_dtype if projections else None,
                        upper=True)
        for n in relus:
            pre = res.intermediate[graph.nodes[n.inputs[0]].name]
            relu[n.index] = tuple(t.detach() for t in n.op.relaxation.deepz(pre.lower, pre.upper))
    return LatentRegion(graph, node, order, box.center, box.radius, relu)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def latent_pgd(region: LatentRegion, rest: Callable[[Tensor], Tensor], y: Tensor, steps: int, step_size: float,
               random_start: bool = True, ascent: str = "sign") -> list[Tensor]:
    """Maximize ``CE(rest(a + A e), y)`` over ``e in [-1, 1]``: ``steps`` ascent steps of
    ``step_size`` (``sign`` of ``A^T grad``, or the raw ``A^T grad`` as in Eq. 21), each
    followed by clipping to [-1, 1]. Returns the final coefficient blocks (detached).

    The center ``a`` is computed once; each step maps only ``A e`` (:meth:`LatentRegion.linear`)
    and updates the blocks in place (a NaN gradient entry counts as 0)."""
    with torch.no_grad():
        a = region.point(region.coefficients(False))
    es = region.coefficients(random_start)
    for _ in range(steps):
        es = [e.detach().requires_grad_(True) for e in es]
        loss = F.cross_entropy(rest(a + region.linear(es)), y, reduction="sum")
        grads = torch.autograd.grad(loss, es)
        with torch.no_grad():
            for e, g in zip(es, grads):
                g = torch.nan_to_num_(g, 0.0, 0.0, 0.0)  # the gradients are ours: fresh tensors
                e.add_(g.sign_() if ascent == "sign" else g, alpha=step_size).clamp_(-1.0, 1.0)
    return [e.detach() for e in es]


# ---------------------------------------------------------------------- loss parts
def consistency_kl(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """``KL(p(x) || p(x'))`` per example (B,), from (B, K) logits (MAAR Eq. 10)."""
    lp = F.log_softmax(clean_logits, dim=1)
    lq = F.log_softmax(adv_logits, dim=1)
    return (lp.exp() * (lp - lq)).sum(dim=1)


def misclassification_weight(clean_logits: Tensor, y: Tensor) -> Tensor:
    """The soft misclassification indicator ``1 - p_y(x)`` (B,) of MAAR Eq. 14."""
    return 1.0 - F.softmax(clean_logits, dim=1).gather(1, y.view(-1, 1)).squeeze(1)


# ---------------------------------------------------------------------- objectives
class _LatentTraining(Objective):
    """Shared machinery of COLT / MAT / MAAR (see the module doc)."""

    @dataclass(kw_only=True)
    class Params:
        layers: list[str | int] | None = None
        steps: int = 8
        step_size: float = 0.25
        projections: int | None = 50
        projection_dtype: Literal["auto", "float32", "float64", "bfloat16"] | None = "auto"  # of the projected generators
        random_start: bool = True
        ascent: Literal["sign", "gradient"] = "sign"
        clean_weight: float = 1.0
        adv_weight: float = 1.0
        l1: float = 0.0
        eval_latent_steps: int = 0
        eval_latent_step_size: float = 0.01
        eval_latent_layer: str | int | None = None
        eval_bounds: list[str] = field(default_factory=list)  # certify the held-out set with these at evaluation

        def __post_init__(self) -> None:
            self.eval_bounds = [get_method(b).name for b in self.eval_bounds]
            require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
            require(self.step_size > 0, f"step_size must be > 0, got {self.step_size}")
            require(self.projections is None or self.projections >= 1, f"projections must be >= 1 or null, got {self.projections}")
            require(self.clean_weight >= 0 and self.adv_weight >= 0, "clean_weight and adv_weight must be >= 0")
            require(self.l1 >= 0, f"l1 must be >= 0, got {self.l1}")
            require(self.eval_latent_steps >= 0, f"eval_latent_steps must be >= 0, got {self.eval_latent_steps}")
            require(self.eval_latent_step_size > 0, f"eval_latent_step_size must be > 0, got {self.eval_latent_step_size}")
            require(self.layers is None or len(self.layers) > 0, "layers must not be empty (null: input, then every ReLU)")
            if self.layers is not None:
                self.layers = [str(v) for v in self.layers]
            if self.eval_latent_layer is not None:
                self.eval_latent_layer = str(self.eval_latent_layer)

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._stage = 0
        self._prefix_cache: dict[str, tuple[Any, nn.Module]] = {}

    # -------------------------------------------------------------- layers
    def latent_layers(self, graph: Graph) -> list[str]:
        """Latent layer of each stage: ``params.layers`` or ``input`` then every ReLU node."""
        if self.params.layers is not None:
            return list(self.params.layers)
        return [graph.nodes[0].name] + [n.name for n in graph.activation_nodes() if n.op.kind == "relu"]

    def _node(self, graph: Graph, name: str) -> Node:
        try:
            node = graph.node(name)
        except KeyError:
            raise CertorchError(f"{self.name}: no layer named {name!r}; layers: "
                                f"{', '.join(n.name for n in graph.nodes)}") from None
        if node.index == graph.output:
            raise CertorchError(f"{self.name}: layer {name!r} is the output; pick the input or a hidden layer")
        if not node.is_input:
            cut_nodes(graph, node)  # a latent layer must be a cut of the graph
        return node

    def layer_for(self, graph: Graph, stage: int) -> Node:
        names = self.latent_layers(graph)
        if stage >= len(names):
            raise CertorchError(f"{self.name}: stage {stage} has no latent layer (layers: {', '.join(names)}); "
                                "set method.params.layers or use fewer stages")
        return self._node(graph, names[stage])

    def check(self, cfg: Any) -> None:
        from certorch.data.registry import dataset_info
        from certorch.models import build

        model = build(cfg.model.name, dataset=cfg.data.dataset, **cfg.model.kwargs)
        graph = capture(model, tuple(dataset_info(cfg.data.dataset).input_shape))
        n = len(cfg.stages) if cfg.stages else 1
        names = self.latent_layers(graph)
        if n > len(names):
            raise CertorchError(f"{self.name}: {n} stages but only {len(names)} latent layers ({', '.join(names)}); "
                                "set method.params.layers")
        for name in names[:n] + ([self.params.eval_latent_layer] if self.params.eval_latent_layer else []):
            self._node(graph, name)

    # -------------------------------------------------------------- pieces
    def _prefix(self, model: nn.Module, node: Node) -> nn.Module:
        """The model the region's bounds come from: for an ``nn.Sequential`` whose child is the
        latent node, its children up to that node (cached); otherwise the whole model."""
        if not isinstance(model, nn.Sequential) or node.name not in model._modules:
            return model
        hit = self._prefix_cache.get(node.name)
        if hit is not None and hit[0]() is model:
            return hit[1]
        names = list(model._modules)
        prefix = nn.Sequential(*[model._modules[k] for k in names[: names.index(node.name) + 1]])
        self._prefix_cache[node.name] = (weakref.ref(model), prefix)
        return prefix

    def region(self, model: nn.Module, x: Tensor, eps: float, node: Node) -> LatentRegion:
        """The latent region of ``node`` over the eps-ball around ``x`` (modules as they are)."""
        prefix = self._prefix(model, node)
        pgraph = capture(prefix, tuple(x.shape[1:])) if prefix is not model else capture(model, tuple(x.shape[1:]))
        return latent_region_of(prefix, pgraph, pgraph.node(node.name), x, eps, self.params.projections,
                                projection_dtype=self.projection_dtype(x.device))

    def projection_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype of the region's projected generators on ``device`` (``params.projection_dtype``;
        ``auto``: bfloat16 where the device computes it natively, see
        :func:`certorch.domains.zonotope.auto_projection_dtype`; null: the model's)."""
        return resolve_projection_dtype(self.params.projection_dtype, device) if self.params.projections else None

    @staticmethod
    def rest(model: nn.Module, graph: Graph, node: Node) -> Callable[[Tensor], Tensor]:
        """The network after ``node``: the model's own modules for the input and for children of
        an ``nn.Sequential`` (so BatchNorm updates its statistics in training), else the graph."""
        if node.is_input:
            return model
        if isinstance(model, nn.Sequential) and node.name in model._modules:
            names = list(model._modules)
            mods = [model._modules[k] for k in names[names.index(node.name) + 1:]]

            def run(z: Tensor) -> Tensor:
                for m in mods:
                    z = m(z)
                return z

            return run
        return lambda z: forward_from(graph, node.name, z)

    def adversarial_latent(self, model: nn.Module, graph: Graph, node: Node, x: Tensor, y: Tensor, eps: float,
                           steps: int, step_size: float) -> Tensor:
        """Latent adversarial points (B, *node_shape) for labels ``y`` (eval mode, detached)."""
        p = self.params
        with eval_mode(model), frozen_parameters(model), torch.enable_grad():
            region = self.region(model, x, eps, node)
            es = latent_pgd(region, self.rest(model, graph, node), y, steps, step_size, p.random_start, p.ascent)
            with torch.no_grad():
                return region.point(es).detach()

    def attack_labels(self, clean_logits: Tensor, y: Tensor) -> Tensor:
        """Labels of the adversarial term (COLT, MAAR: the true labels)."""
        return y

    def extra(self, clean: Tensor, adv: Tensor, y: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
        """An extra loss term and its metrics (MAAR's consistency term); default none."""
        return None, {}

    # -------------------------------------------------------------- the loss
    def loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        p = self.params
        self._stage = state.stage
        graph = capture(model, tuple(x.shape[1:]))
        node = self.layer_for(graph, state.stage)
        clean = model(x)
        y_adv = self.attack_labels(clean.detach(), y)
        latent = self.adversarial_latent(model, graph, node, x, y_adv, eps, p.steps, p.step_size)
        adv = self.rest(model, graph, node)(latent)
        adv_loss = F.cross_entropy(adv, y_adv)
        loss = p.clean_weight * F.cross_entropy(clean, y) + p.adv_weight * adv_loss
        term, metrics = self.extra(clean, adv, y)
        if term is not None:
            loss = loss + term
        ok = clean.argmax(1) == y
        adv_ok = adv.argmax(1) == y
        metrics = {
            "adv_loss": adv_loss.detach(),
            "adv_acc": adv_ok.float().mean().detach(),
            # Eq. 25 on the batch: correctly classified examples whose latent adversarial is not
            "verified_error": ((~adv_ok & ok).sum() / ok.sum().clamp(min=1)).float().detach(),
            **metrics,
        }
        return LossOutput(loss, metrics, clean.detach())

    def regularizer(self, model: nn.Module, state: TrainState) -> Tensor | None:
        if self.params.l1 <= 0:
            return None
        ws = [w.abs().sum() for n, w in model.named_parameters() if n.endswith("weight") and w.requires_grad]
        return self.params.l1 * torch.stack(ws).sum() if ws else None

    def eval_metrics(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> dict[str, float]:
        """``verified_acc_<m>`` for each bound method ``m`` of ``eval_bounds`` (certificates, as
        every objective's) and ``latent_acc`` (Eq. 26): correct on ``x`` and on the latent attack of
        ``eval_latent_steps`` steps of ``eval_latent_step_size`` at ``eval_latent_layer`` (default:
        the current stage's layer); only when ``eval_latent_steps > 0``."""
        p = self.params
        if eps <= 0:
            return {}
        out = verified_accuracies(model, x, y, eps, p.eval_bounds)
        if p.eval_latent_steps <= 0:
            return out
        graph = capture(model, tuple(x.shape[1:]))
        node = self._node(graph, p.eval_latent_layer) if p.eval_latent_layer else self.layer_for(graph, self._stage)
        latent = self.adversarial_latent(model, graph, node, x, y, eps, p.eval_latent_steps, p.eval_latent_step_size)
        with torch.no_grad(), eval_mode(model):
            ok = (model(x).argmax(1) == y) & (self.rest(model, graph, node)(latent).argmax(1) == y)
        return {**out, "latent_acc": float(ok.float().mean())}


@register_objective("colt")
class COLT(_LatentTraining):
    """COLT layerwise training: CE(clean) + CE(latent adversarial of the stage's layer)."""


@register_objective("mat")
class MAT(_LatentTraining):
    """MAT (MAAR paper Eq. 2): COLT with the network's own prediction as the adversarial label of misclassified examples."""

    def attack_labels(self, clean_logits: Tensor, y: Tensor) -> Tensor:
        pred = clean_logits.argmax(1)
        return torch.where(pred == y, y, pred)


@register_objective("maar")
class MAAR(_LatentTraining):
    """MAAR (Eq. 14): COLT + kl_weight * KL(p(x) || p(x')) * (1 - p_y(x))."""

    @dataclass(kw_only=True)
    class Params(_LatentTraining.Params):
        kl_weight: float = 6.0

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}")

    def extra(self, clean: Tensor, adv: Tensor, y: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
        kl = consistency_kl(clean, adv)
        w = misclassification_weight(clean, y)
        term = self.params.kl_weight * (kl * w).mean()
        return term, {"kl": kl.mean().detach(), "kl_term": term.detach()}
