"""Diagnostics of a relaxation's robust loss as a training objective (issue 12; Jovanovic et al.,
"Certified Defenses: Why Tighter Relaxations May Hurt Training").

The paper explains why looser relaxations (IBP) can train to better certified accuracy than
tighter ones (CROWN, DeepZ) by two properties of the robust loss as a function of the weights:

* **continuity** -- tighter relaxations pick their ReLU lines by the sign of ``u + l`` and similar
  rules, so the loss jumps where a neuron switches; :func:`line_scan` evaluates the loss along a
  fine 1-D line in parameter space and :func:`find_jumps` counts and sizes the jumps;
* **sensitivity** -- how strongly the bound reacts to parameter perturbations: the gradient norm
  of the robust loss and its variation along the same line (:func:`line_scan`);

plus the **tightness** of the relaxation (mean width of the margin bounds, fraction certified)
and the number of unstable ReLUs under its intermediate bounds (:func:`tightness`).

All functions take a model, a batch ``x`` (B, *input_shape), labels ``y`` (B,), ``eps`` and a
bound method name of the engine. Parameters are moved along the line in place under
``torch.no_grad`` and restored exactly afterwards (also on error).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import certorch.bounds as bounds
from certorch.errors import CertorchError
from certorch.graph.capture import capture
from certorch.train.robust_loss import robust_cross_entropy


def robust_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str) -> Tensor:
    """Robust cross-entropy (scalar) from ``method``'s margin lower bounds."""
    return robust_cross_entropy(bounds.bound(model, x, eps, method=method, y=y, upper=False).lower, y)


def random_direction(model: nn.Module, generator: torch.Generator) -> list[Tensor]:
    """A random direction in parameter space, each tensor scaled to its parameter's norm
    (filter-wise normalisation as in loss-landscape plots), one tensor per parameter."""
    out = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        out.append(d * (p.detach().norm() / d.norm().clamp(min=1e-12)))
    return out


@contextmanager
def _moved(model: nn.Module, direction: list[Tensor]):
    """Yield ``set_t(t)`` that puts the parameters at ``theta + t * direction``; restores theta."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]

    def set_t(t: float) -> None:
        with torch.no_grad():
            for p, s, d in zip(params, saved, direction):
                p.copy_(s + t * d)
    try:
        yield set_t
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@dataclass
class LineScan:
    """Loss and gradient norm at ``t`` (P,) along one direction: ``loss`` (P,), ``grad_norm`` (P,)."""

    t: Tensor
    loss: Tensor
    grad_norm: Tensor


def line_scan(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str, direction: list[Tensor],
              radius: float = 0.05, points: int = 201, progress=None) -> LineScan:
    """Robust loss and its gradient norm at ``points`` equally spaced ``t`` in [-radius, radius]
    along ``direction`` (one bound call with gradient per point: the points are separate
    networks, each batched over the examples)."""
    if points < 3:
        raise CertorchError(f"points must be >= 3, got {points}")
    ts = torch.linspace(-radius, radius, points, dtype=torch.float64)
    losses, norms = [], []
    params = [p for p in model.parameters() if p.requires_grad]
    with _moved(model, direction) as set_t:
        for t in ts.tolist():  # one network per point: a loop over evaluations, not over neurons
            set_t(t)
            loss = robust_loss(model, x, y, eps, method)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)).item())
            losses.append(loss.item())
            if progress is not None:
                progress()
    return LineScan(ts, torch.tensor(losses, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64))


def find_jumps(values: Tensor, rel_tol: float = 1e-3, abs_tol: float = 1e-9, factor: float = 2.0) -> Tensor:
    """Jump sizes (J,) of a function sampled on a uniform grid ``values`` (P,).

    A step ``|v[i+1] - v[i]|`` is a jump when it exceeds ``factor`` times both neighbouring steps
    (a continuous function's steps shrink with the grid and change slowly, also across a kink)
    by more than ``rel_tol`` times the range of ``values`` and ``abs_tol``. The size reported is
    the step minus ``factor`` times the larger neighbouring step.
    """
    d = (values[1:] - values[:-1]).abs()
    if d.numel() < 3:
        return d.new_zeros(0)
    left = torch.cat([d[1:2], d[:-1]])  # neighbour steps (mirrored at the ends)
    right = torch.cat([d[1:], d[-2:-1]])
    excess = d - factor * torch.maximum(left, right)
    scale = float(values.max() - values.min())
    return excess[excess > max(abs_tol, rel_tol * scale)]


def tightness(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str) -> dict[str, float]:
    """Mean width of the margin bounds, fraction of examples certified (all margins > 0, among
    all examples), and unstable ReLUs per example under ``method``'s intermediate bounds."""
    with torch.no_grad():
        res = bounds.bound(model, x, eps, method=method, y=y, return_intermediate="boxes")
    graph = capture(model, tuple(x.shape[1:]))
    pre = [graph.nodes[n.inputs[0]].name for n in graph.activation_nodes()]
    unstable = 0.0
    for name in pre:
        box = res.intermediate.get(name)
        if box is not None:
            unstable += float(((box.lower < 0) & (box.upper > 0)).flatten(1).sum(1).double().mean())
    width = (res.upper - res.lower).mean() if res.upper is not None else torch.tensor(float("nan"))
    return {"width": float(width), "certified": float((res.lower > 0).all(1).double().mean()),
            "unstable": unstable}


def diagnose(model: nn.Module, x: Tensor, y: Tensor, eps: float, methods: list[str], radius: float = 0.05,
             points: int = 201, seed: int = 0, progress=None) -> tuple[list[dict], dict[str, LineScan]]:
    """One row per method: continuity (jumps along one random line), sensitivity (gradient norm
    mean and coefficient of variation along it), tightness and unstable ReLUs; and the scans.
    Every method uses the same line (same seed)."""
    methods = [bounds.get_method(m).name for m in methods]
    direction = random_direction(model, torch.Generator().manual_seed(seed))
    rows, scans = [], {}
    for m in methods:
        scan = line_scan(model, x, y, eps, m, direction, radius, points, progress)
        jumps = find_jumps(scan.loss)
        g = scan.grad_norm
        rows.append({
            "method": m, "loss": float(scan.loss[points // 2]), "jumps": int(jumps.numel()),
            "max_jump": float(jumps.max()) if jumps.numel() else 0.0,
            "grad_norm": float(g.mean()), "grad_cv": float(g.std() / g.mean().clamp(min=1e-12)),
            **tightness(model, x, y, eps, m),
        })
        scans[m] = scan
    return rows, scans
