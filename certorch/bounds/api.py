"""Public bound API: ``ct.bound`` and ``ct.certified``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from certorch.bounds.context import BoundContext
from certorch.bounds.methods import check_slope, get_method, run_method
from certorch.domains.box import Box
from certorch.errors import CertorchError
from certorch.graph.capture import capture
from certorch.spec import check_eps, check_finite, linf_ball, margin_matrix


@dataclass
class BoundResult:
    """Bounds on ``C @ f(x)`` over the input set: ``lower``/``upper`` of shape (B, S).

    ``intermediate`` maps node names to the bounds of that node (per-layer access), filled
    when ``return_intermediate=True``; ``regions`` holds forward abstract values
    (zonotopes / symbolic intervals) by node name for the forward methods.
    """

    lower: Tensor
    upper: Tensor | None  # None when bound() was called with upper=False (backward methods)
    method: str
    intermediate: dict[str, Box] = field(default_factory=dict)
    regions: dict[str, object] = field(default_factory=dict)


def _check_params(model: nn.Module) -> None:
    params = [p.detach().sum() for p in model.parameters()]
    if params and not bool(torch.isfinite(torch.stack([p.to(torch.float64) for p in params])).all()):
        bad = next(n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all()))
        raise CertorchError(f"model parameter {bad!r} contains NaN or infinite values")


def _spec(C: Tensor | None, y: Tensor | None, B: int, out_shape: tuple[int, ...], dtype, device) -> Tensor:
    K = 1
    for s in out_shape:
        K *= s
    if C is None and y is None:
        C = torch.eye(K, dtype=dtype, device=device).unsqueeze(0).expand(B, K, K)
    elif C is None:
        if not isinstance(y, Tensor):
            y = torch.as_tensor(y)
        if y.shape != (B,):
            raise CertorchError(f"y must have shape ({B},) to match x, got {tuple(y.shape)}")
        C = margin_matrix(y.to(device), K)
    else:
        C = torch.as_tensor(C, device=device)
        if C.dim() == 2:
            C = C.unsqueeze(0).expand(B, *C.shape)
        if C.dim() != 3 or C.shape[0] != B or C.shape[2] != K:
            raise CertorchError(f"C must have shape (S, {K}) or ({B}, S, {K}), got {tuple(C.shape)}")
        check_finite(C, "C")
    return C.to(dtype).reshape(B, C.shape[1], *out_shape)


def bound(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor | None = None,
    method: str = "crown",
    y: Tensor | None = None,
    C: Tensor | None = None,
    lo: float | Tensor = 0.0,
    hi: float | Tensor = 1.0,
    *,
    box: Box | None = None,
    slope: str | None = None,
    projections: int | None = None,
    dtype: torch.dtype | None = None,
    return_intermediate: bool = False,
    generator: torch.Generator | None = None,
    max_elements: int = 2**27,
    upper: bool = True,
    patches: bool = True,
) -> BoundResult:
    """Bounds of ``C @ model(x')`` for every ``x'`` in the L-inf ball of radius ``eps`` around
    ``x`` intersected with ``[lo, hi]`` (or an explicit input ``box``).

    Args:
        x: (B, *input_shape) clean inputs (pixels in [0, 1]).
        eps: radius, a float or a tensor broadcastable to x (e.g. one per example).
        method: ``ibp``, ``zonotope``, ``symbolic``, ``crown``, ``crown-ibp`` or ``dual``.
        y: (B,) labels; with ``C=None`` the spec is the margins ``logit[y] - logit[j]``, j != y,
            so ``lower``/``upper`` have shape (B, K-1).
        C: spec matrix (S, K) or (B, S, K); default identity (bounds on the logits).
        slope: ReLU lower slope for backward methods (``adaptive``, ``parallel``, ``zero``).
        projections: number of Cauchy random projections (``zonotope``/``dual``) for cheap
            training estimates; NOT sound bounds. ``None``: exact.
        dtype: compute in this dtype (e.g. torch.float64 for certification) without
            modifying the model.
        upper: ``False`` when only lower bounds are needed (training losses, certification):
            backward methods then skip the upper bound (``result.upper`` is None).
        patches: backward passes that start at a conv map (CROWN intermediate bounds) keep
            their coefficients as windows over the receptive field (much faster on conv nets);
            ``False`` uses dense coefficients (same bounds; for comparison).
    Returns:
        :class:`BoundResult` with ``lower``/``upper`` of shape (B, S).
    """
    m = get_method(method)
    if slope is not None:
        check_slope(slope)
    if projections is not None:
        if not m.supports_projections:
            raise CertorchError(f"projections are supported by methods zonotope and dual, not {m.name!r}")
        if int(projections) < 1:
            raise CertorchError(f"projections must be a positive integer, got {projections}")
    if not isinstance(x, Tensor):
        raise CertorchError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise CertorchError(f"x must have a batch dimension: shape (B, *input_shape), got {tuple(x.shape)}")
    param = next(model.parameters(), None)
    dtype = dtype or (param.dtype if param is not None else x.dtype)
    x = x.to(dtype)
    if box is None:
        if eps is None:
            raise CertorchError("give either eps (with lo/hi) or an explicit input box")
        box = linf_ball(x, eps, lo, hi)
    else:
        if box.lower.shape != x.shape or box.upper.shape != x.shape:
            raise CertorchError(f"box shape {tuple(box.lower.shape)} does not match x shape {tuple(x.shape)}")
        check_finite(box.lower, "box.lower")
        check_finite(box.upper, "box.upper")
        if bool((box.lower > box.upper).any()):
            raise CertorchError("box.lower must be <= box.upper")
        box = box.to(dtype)
    _check_params(model)
    graph = capture(model, tuple(x.shape[1:]))
    ctx = BoundContext(
        graph=graph,
        box=box,
        x=x,
        dtype=dtype,
        intermediate=m.intermediate,
        slope=slope or m.slope,
        projections=projections,
        generator=generator,
        max_elements=max_elements,
        patches=patches,
    )
    spec = _spec(C, y, x.shape[0], graph.output_shape, dtype, x.device)
    lower, up = run_method(m, ctx, spec, upper)
    result = BoundResult(lower, up, m.name)
    if return_intermediate:
        names = {n.index: n.name for n in graph.nodes}
        boxes = {**ctx.ibp_boxes, **ctx.boxes}
        result.intermediate = {names[i]: b for i, b in sorted(boxes.items())}
        result.regions = {names[i]: r for i, r in sorted(ctx.regions.items())}
    return result


def certified(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    method: str = "crown",
    lo: float | Tensor = 0.0,
    hi: float | Tensor = 1.0,
    **kwargs,
) -> Tensor:
    """Bool (B,): the clean prediction is ``y`` and every margin lower bound is > 0.

    Models with L_inf-dist layers are certified by their own rule (the margin certificate of
    the 1-Lipschitz net, or IBP on the MLP head over the feature box), whatever ``method``.
    """
    from certorch.nn.linf_dist_cert import certify as linf_certify
    from certorch.nn.linf_dist_cert import is_linf_dist_model

    if is_linf_dist_model(model):
        check_eps(eps)
        return linf_certify(model, x, y, eps)
    if kwargs.get("projections") is not None:
        raise CertorchError("projections give estimates, not sound bounds: they cannot certify")
    with torch.no_grad():
        res = bound(model, x, eps, method=method, y=y, lo=lo, hi=hi, upper=False, **kwargs)
        param = next(model.parameters(), None)
        xx = x.to(param.dtype) if param is not None else x
        clean = model(xx).argmax(dim=1) == y.to(x.device)
    return clean & (res.lower > 0).all(dim=1)
