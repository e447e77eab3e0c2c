"""Certificates for L_inf-dist nets (pure functions; the model is only run in eval mode).

* An L_inf-dist net at ``p = inf`` is 1-Lipschitz w.r.t. L-inf in the *normalized* space;
  with a ``Normalize(mean, std)`` in front it is ``L = 1 / s``-Lipschitz in pixel space for a
  scalar std ``s`` (per-channel std: ``L = max_c 1 / s_c``, which bounds every channel).
* Margin rule (Fact 3.6): if the clean prediction is ``y`` and the top-1 margin
  ``z_y - max_{j != y} z_j`` exceeds ``2 * eps * L``, no ``x'`` with ``||x' - x||_inf <= eps``
  changes the prediction (each logit moves by at most ``eps * L``). Radius: ``margin / (2 L)``.
* Net+MLP (Sec. 6): the backbone features move by at most ``delta = eps * L`` in L-inf, so
  interval bound propagation of the box ``features +- delta`` through the head (Appendix B,
  with the margin matrix merged into the last Linear, Eq. 21) certifies the composite net.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from certorch.errors import CertorchError
from certorch.nn.linf_dist import Negate, _LInfDistBase, check_lipschitz_backbone, split_backbone_head
from certorch.nn.normalize import Normalize
from certorch.spec import check_eps, margin_matrix, margins


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (mean shift uses running means) and restore the flags after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in flags:
            m.training = t


def lipschitz_factor(model: nn.Module) -> float:
    """L-inf Lipschitz constant of the backbone of ``model`` in pixel space.

    Product of ``1 / min_c std_c`` over the ``Normalize`` modules of the feature part (one
    in practice; 1.0 without any). Raises :class:`CertorchError` if the backbone holds a
    module without a Lipschitz guarantee (for example BatchNorm).
    """
    check_lipschitz_backbone(model)
    features, _ = split_backbone_head(model)
    factor = 1.0
    for m in features.modules():
        if isinstance(m, Normalize):
            factor *= m.lipschitz_factor()
    return factor


def _is_lipschitz_head(head: nn.Module) -> bool:
    return all(isinstance(m, (nn.Identity, Negate, nn.Sequential, nn.Flatten)) for m in head.modules())


def _top1_margin(logits: Tensor, y: Tensor) -> Tensor:
    return margins(logits, y).min(dim=1).values


def _check_xy(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() < 2 or y.shape != x.shape[:1]:
        raise CertorchError("expected x (B, ...) and labels y (B,) as tensors with matching batch size")


def _prepare(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor | None
) -> tuple[nn.Sequential, nn.Module, float]:
    _check_xy(x, y)
    if eps is not None:
        check_eps(eps)
    check_lipschitz_backbone(model, require_inf=True)
    features, head = split_backbone_head(model)
    return features, head, lipschitz_factor(model)


def _eps_vector(eps: float | Tensor, like: Tensor) -> Tensor:
    e = torch.as_tensor(eps, dtype=like.dtype, device=like.device).flatten()
    return e.expand(like.shape[0]) if e.numel() == 1 else e


def margin_certificate(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """Bool (B,): certified iff ``argmax model(x) == y`` and top-1 margin > ``2 eps L``.

    ``model``: an L_inf-dist net at p = inf (its head must be Lipschitz-free: identity or
    negation); x: (B, ...) pixels; y: (B,); eps: scalar or (B,). For a Net+MLP model use
    :func:`head_ibp_certificate` (or :func:`certify`, which picks the right rule).
    """
    features, head, factor = _prepare(model, x, y, eps)
    if not _is_lipschitz_head(head):
        raise CertorchError("margin_certificate needs a pure L_inf-dist net; this model has a conventional head "
                            "(use head_ibp_certificate or certify)")
    with _eval_mode(model):
        logits = model(x)
    m = _top1_margin(logits, y)
    return m > 2.0 * _eps_vector(eps, m) * factor


def certified_radius(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Certified L-inf radius (B,) in pixel space: ``margin / (2 L)``, 0 where misclassified."""
    features, head, factor = _prepare(model, x, y, None)
    if not _is_lipschitz_head(head):
        raise CertorchError("certified_radius needs a pure L_inf-dist net; this model has a conventional head")
    with _eval_mode(model):
        logits = model(x)
    return (_top1_margin(logits, y) / (2.0 * factor)).clamp_min(0.0)


def interval_forward(module: nn.Module, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Interval bound propagation through Sequential / Linear / Tanh / ReLU / Sigmoid / Flatten / Identity / Negate.

    ``lower``, ``upper``: (B, ...). Other modules raise :class:`CertorchError` (the full bound
    engine handles more).
    """
    if isinstance(module, nn.Sequential):
        for m in module:
            lower, upper = interval_forward(m, lower, upper)
        return lower, upper
    if isinstance(module, nn.Linear):
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        c = nn.functional.linear(mid, module.weight, module.bias)
        r = nn.functional.linear(rad, module.weight.abs())
        return c - r, c + r
    if isinstance(module, (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Flatten, nn.Identity)):
        return module(lower), module(upper)  # monotone elementwise (or reshape)
    if isinstance(module, Negate):
        return -upper, -lower
    raise CertorchError(f"interval_forward does not support {type(module).__name__} in a head")


def head_margin_lower_bound(head: nn.Module, lower: Tensor, upper: Tensor, y: Tensor) -> Tensor:
    """Lower bounds (B, K-1) on ``z_y - z_j`` (j != y) for head inputs in ``[lower, upper]``.

    IBP through every head layer but the last; when the last layer is a Linear, the margin
    matrix is merged into it (Eq. 21), which is tighter than differencing logit intervals.
    """
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    if layers and isinstance(layers[-1], nn.Linear):
        last = layers.pop()
        lo, hi = interval_forward(nn.Sequential(*layers), lower, upper)
        C = margin_matrix(y, last.out_features).to(lo.dtype)  # (B, K-1, K)
        Wc = C @ last.weight  # (B, K-1, D)
        bc = C @ last.bias if last.bias is not None else torch.zeros(Wc.shape[:2], dtype=lo.dtype, device=lo.device)
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        return torch.einsum("bsd,bd->bs", Wc, mid) + bc - torch.einsum("bsd,bd->bs", Wc.abs(), rad)
    lo, hi = interval_forward(nn.Sequential(*layers), lower, upper)
    C = margin_matrix(y, lo.shape[1]).to(lo.dtype)
    return torch.einsum("bsk,bk->bs", C.clamp_min(0), lo) + torch.einsum("bsk,bk->bs", C.clamp_max(0), hi)


def head_ibp_certificate(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """Bool (B,): certified iff every margin lower bound is > 0 on the feature box.

    Features ``f = backbone(normalize(x))`` (eval mode) lie within ``+- eps * L`` of the
    clean features under any ``||x' - x||_inf <= eps``; the head is bounded by IBP.
    """
    features, head, factor = _prepare(model, x, y, eps)
    with _eval_mode(model):
        f = features(x).flatten(1)
        delta = (_eps_vector(eps, f) * factor).unsqueeze(1)
        lb = head_margin_lower_bound(head, f - delta, f + delta, y)
    return (lb > 0).all(dim=1)


def certify(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """Bool (B,): the margin rule for pure L_inf-dist nets, head IBP for Net+MLP models."""
    _, head = split_backbone_head(model)
    if _is_lipschitz_head(head):
        return margin_certificate(model, x, y, eps)
    return head_ibp_certificate(model, x, y, eps)


def is_linf_dist_model(model: nn.Module) -> bool:
    """True when ``model`` contains L_inf-dist layers (then :func:`certify` is its certificate)."""
    return any(isinstance(m, _LInfDistBase) for m in model.modules())
