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
  The head is bounded by the bound engine (``ct.bound(head, method="ibp")`` with an explicit
  feature box), not by interval code of its own.

:func:`certified_margins` is the one certifier of the family (float64, eval semantics, the
caller's model untouched; finite ``p`` is refused, never approximated). It is registered with
:mod:`certorch.bounds.certifiers`, so ``ct.certified`` and the verifier's ``linf`` stage both
use it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from certorch.bounds.certifiers import Certifier, register_certifier
from certorch.domains.box import Box
from certorch.errors import CertorchError
from certorch.nn.linf_dist import Negate, _LInfDistBase, check_lipschitz_backbone, split_backbone_head
from certorch.nn.mode import eval_mode
from certorch.nn.normalize import Normalize
from certorch.spec import check_eps, margins


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (mean shift uses running means), no grad; every flag restored."""
    with eval_mode(model), torch.no_grad():
        yield


def _float64(module: nn.Module, *args: Tensor) -> Tensor:
    """``module(*args)`` in float64 on float64 copies of its parameters and buffers (module untouched)."""
    state = {n: (t.detach().to(torch.float64) if t.is_floating_point() else t.detach().clone())
             for n, t in list(module.named_parameters()) + list(module.named_buffers())}
    return torch.func.functional_call(module, state, tuple(a.to(torch.float64) for a in args), strict=False)


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
    _, head = split_backbone_head(model)
    if not _is_lipschitz_head(head):
        raise CertorchError("margin_certificate needs a pure L_inf-dist net; this model has a conventional head "
                            "(use head_ibp_certificate or certify)")
    return certified_margins(model, x, y, eps) > 0


def certified_radius(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Certified L-inf radius (B,) in pixel space: ``margin / (2 L)``, 0 where misclassified."""
    features, head, factor = _prepare(model, x, y, None)
    if not _is_lipschitz_head(head):
        raise CertorchError("certified_radius needs a pure L_inf-dist net; this model has a conventional head")
    with _eval_mode(model):
        logits = model(x)
    return (_top1_margin(logits, y) / (2.0 * factor)).clamp_min(0.0)


def head_margin_lower_bound(head: nn.Module, lower: Tensor, upper: Tensor, y: Tensor) -> Tensor:
    """Lower bounds (B, K-1) on ``z_y - z_j`` (j != y) for head inputs in ``[lower, upper]``.

    IBP through the head by the bound engine (``ct.bound(method="ibp")`` on the feature box),
    which merges the margin matrix into a last Linear (Eq. 21: tighter than differencing logit
    intervals). Differentiable w.r.t. the head's parameters and the box (training, Eq. 22);
    computed in the dtype of ``lower``.
    """
    from certorch.bounds.api import bound

    box = Box(lower, upper)
    return bound(head, box.center, method="ibp", y=y, box=box, dtype=lower.dtype, upper=False).lower


def head_ibp_certificate(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """Bool (B,): certified iff every margin lower bound is > 0 on the feature box.

    Features ``f = backbone(normalize(x))`` (eval mode) lie within ``+- eps * L`` of the
    clean features under any ``||x' - x||_inf <= eps``; the head is bounded by IBP (float64).
    """
    return certified_margins(model, x, y, eps) > 0


def certified_margins(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """Lower bounds (B,) float64 of ``min_j (z_y - z_j)`` over the L-inf ball of radius ``eps``.

    Pure L_inf-dist net (Lipschitz head): ``clean top-1 margin - 2 eps L``. Net+MLP: IBP of the
    head over the feature box ``f +- eps L``. Eval semantics and float64 throughout; the
    caller's model (flags, parameters, running statistics) is not changed. Raises
    :class:`CertorchError` for networks outside the family's guarantee (finite ``p``,
    BatchNorm in the backbone): there is no fallback.
    """
    features, head, factor = _prepare(model, x, y, eps)
    with _eval_mode(model):
        f = _float64(features, x).flatten(1)
        delta = (_eps_vector(eps, f) * factor).unsqueeze(1)
        if _is_lipschitz_head(head):
            logits = _float64(head, f)
            return _top1_margin(logits, y) - 2.0 * delta.squeeze(1)
        return head_margin_lower_bound(head, f - delta, f + delta, y).min(dim=1).values


def certify(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """Bool (B,): every margin's certified lower bound is > 0 (so the clean prediction is ``y``).

    The margin rule for pure L_inf-dist nets, head IBP for Net+MLP models (see
    :func:`certified_margins`).
    """
    return certified_margins(model, x, y, eps) > 0


def is_linf_dist_model(model: nn.Module) -> bool:
    """True when ``model`` contains L_inf-dist layers (then :func:`certify` is its certificate)."""
    return any(isinstance(m, _LInfDistBase) for m in model.modules())


register_certifier(Certifier("linf_dist", is_linf_dist_model, certified_margins,
                             "L_inf-dist nets: Lipschitz margin rule / head IBP over the feature box (p = inf only)"))
