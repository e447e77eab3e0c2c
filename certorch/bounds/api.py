"""Public bound API: ``ct.bound`` and ``ct.certified``."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from certorch.bounds import memory
from certorch.bounds.alpha import AlphaState, check_options, peak_bytes
from certorch.bounds.backward import row_numel
from certorch.bounds.context import BoundContext
from certorch.bounds.ibp import ibp_box, ibp_is_exact
from certorch.bounds.methods import check_slope, get_method, intermediate_for, run_method
from certorch.domains.box import Box
from certorch.errors import CertorchError, MemoryBudgetError
from certorch.graph.capture import capture
from certorch.spec import check_eps, check_finite, linf_ball, margin_matrix


@dataclass
class BoundResult:
    """Bounds on ``C @ f(x)`` over the input set: ``lower``/``upper`` of shape (B, S).

    ``sound`` is False when the numbers are not guaranteed bounds of the model's (eval-mode)
    function: Cauchy-projection estimates (``projections=r``) and bounds that use the batch's
    own BatchNorm statistics (a model in training mode). Every consumer that certifies checks it.
    ``intermediate`` maps node names to the bounds of that node (per-layer access), filled
    when ``return_intermediate`` is ``True`` or ``"boxes"``; ``regions`` holds forward abstract
    values (zonotopes / symbolic intervals) by node name for the forward methods, filled only
    when it is ``True`` (``"boxes"`` frees each region as soon as its users are computed: far
    less memory for projected zonotopes, whose regions are (B, r, *shape) each). ``extra`` holds
    method outputs: ``extra["alpha"]`` is alpha-CROWN's :class:`~certorch.bounds.alpha.AlphaState`
    (its optimised slopes, for a warm start with ``alpha_state=``).
    """

    lower: Tensor
    upper: Tensor | None  # None when bound() was called with upper=False (backward methods)
    method: str
    sound: bool = True
    intermediate: dict[str, Box] = field(default_factory=dict)
    regions: dict[str, object] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _check_params(model: nn.Module) -> None:
    """One-line error for a NaN / inf parameter. Fast path: one sum per tensor (a sum that is not
    finite may also be an overflow of finite values: then each tensor is tested element-wise)."""
    params = [p.detach().sum() for p in model.parameters()]
    if params and not bool(torch.isfinite(torch.stack([p.to(torch.float64) for p in params])).all()):
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
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
    projection_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    return_intermediate: bool | str = False,
    generator: torch.Generator | None = None,
    max_elements: int | None = None,
    memory_budget: int | None = None,
    deadline: float | None = None,
    upper: bool = True,
    patches: bool = True,
    alpha_iters: int | None = None,
    alpha_lr: float | None = None,
    alpha_state: AlphaState | None = None,
    splits: dict[str, Tensor] | None = None,
    intermediate_bounds: dict[str, Box] | None = None,
    refine_intermediate: bool | Sequence[str] = False,
    return_coefficients: bool = False,
) -> BoundResult:
    """Bounds of ``C @ model(x')`` for every ``x'`` in the L-inf ball of radius ``eps`` around
    ``x`` intersected with ``[lo, hi]`` (or an explicit input ``box``).

    Modules are used in their current train/eval mode: BatchNorm in training mode normalizes
    with the clean batch's statistics (training bounds, ``result.sound`` is False); for
    certificates use :func:`certified` (always eval semantics, float64) or call this on a model
    in eval mode.

    Args:
        x: (B, *input_shape) clean inputs (pixels in [0, 1]).
        eps: radius, a float or a tensor broadcastable to x (e.g. one per example).
        method: ``ibp``, ``zonotope``, ``symbolic``, ``crown``, ``crown-ibp``, ``dual`` or ``alpha-crown``.
        y: (B,) labels; with ``C=None`` the spec is the margins ``logit[y] - logit[j]``, j != y,
            so ``lower``/``upper`` have shape (B, K-1).
        C: spec matrix (S, K) or (B, S, K); default identity (bounds on the logits).
        slope: ReLU lower slope for backward methods (``adaptive``, ``parallel``, ``zero``).
        projections: number of Cauchy random projections (``zonotope``/``dual``) for cheap
            training estimates; NOT sound bounds (``result.sound`` is False). ``None``: exact.
        projection_dtype: with ``projections``: the dtype the projected generators are mapped
            in (default ``dtype``). ``torch.bfloat16`` halves their memory and, on hardware with
            bfloat16 units, about halves their convolutions' time; the estimates move by about
            0.3 % (relative), far less than their own Cauchy spread (see docs/bounds.md).
        dtype: compute in this dtype (e.g. torch.float64 for certification) without
            modifying the model.
        max_elements: largest coefficient tensor of a backward pass (elements); default from
            ``memory_budget``.
        memory_budget: bytes the computation may allocate (default: half of the available
            memory of x's device). Larger batches are processed in chunks of examples; a single
            example that does not fit raises :class:`~certorch.errors.MemoryBudgetError` at
            once, before allocating (see :mod:`certorch.bounds.memory`).
        deadline: a ``time.perf_counter()`` value; past it the computation stops between two
            layers with :class:`~certorch.errors.DeadlineExceeded`.
        upper: ``False`` when only lower bounds are needed (training losses, certification):
            backward methods then skip the upper bound (``result.upper`` is None).
        patches: backward passes that start at a conv map (CROWN intermediate bounds) keep
            their coefficients as windows over the receptive field (much faster on conv nets);
            ``False`` uses dense coefficients (same bounds; for comparison).
        alpha_iters, alpha_lr: ``alpha-crown`` only: bound passes (default 20) and Adam's
            learning rate (default 0.5, decayed by 0.98 per step), as auto_LiRPA's CROWN-Optimized.
        alpha_state: ``alpha-crown`` only: slopes of an earlier call
            (``result.extra["alpha"]``) to start from (warm start; same network and batch size).
        splits: branch-and-bound split constraints, ``{node name: (B, *node_shape) tensor}`` of
            +1 (the sub-domain where that neuron is >= 0), -1 (<= 0) or 0 (free): the bounds
            hold over the part of the input set that satisfies them. Every method clamps the
            split neurons' bounds; ``alpha-crown`` also optimises one Lagrange multiplier per
            (spec row, split neuron) (beta-CROWN), which carries the constraints into the bound.
            An infeasible sub-domain may get any bound (it has no points).
        intermediate_bounds: ``{node name: Box (B, *node_shape)}`` bounds known to hold over
            the input set (e.g. a parent domain's ``result.intermediate``), used as they are
            (clamped by ``splits``) instead of being computed.
        refine_intermediate: treat ``intermediate_bounds`` (``True``: all of them; a list of node
            names: those) as known bounds to tighten: the node is still computed (IBP and the
            method's intermediate strategy; ``alpha-crown``: plain CROWN in its reference pass,
            then its iterations optimise the spec rows only on those bounds) and intersected
            with the given box. Branch and bound uses it to tighten a
            child's later layers with its split constraints.
        return_coefficients: ``alpha-crown`` only: keep the spec rows' last coefficients at each
            ReLU output and at the input in ``result.extra["coefficients"]`` (node name ->
            (B, S, *shape); branching scores of branch and bound read them).
    Returns:
        :class:`BoundResult` with ``lower``/``upper`` of shape (B, S).
    """
    return bound_many(model, x, eps, (method,), y, C, lo, hi, box=box, slope=slope, projections=projections,
                      projection_dtype=projection_dtype, dtype=dtype, return_intermediate=return_intermediate, generator=generator,
                      max_elements=max_elements, memory_budget=memory_budget, deadline=deadline, upper=upper,
                      patches=patches, alpha_iters=alpha_iters, alpha_lr=alpha_lr,
                      alpha_state=alpha_state, splits=splits, intermediate_bounds=intermediate_bounds,
                      refine_intermediate=refine_intermediate,
                      return_coefficients=return_coefficients)[get_method(method).name]


def bound_many(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor | None = None,
    methods: Sequence[str] = ("crown-ibp", "ibp"),
    y: Tensor | None = None,
    C: Tensor | None = None,
    lo: float | Tensor = 0.0,
    hi: float | Tensor = 1.0,
    *,
    box: Box | None = None,
    slope: str | None = None,
    projections: int | None = None,
    projection_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    return_intermediate: bool | str = False,
    generator: torch.Generator | None = None,
    max_elements: int | None = None,
    memory_budget: int | None = None,
    deadline: float | None = None,
    upper: bool = True,
    patches: bool = True,
    alpha_iters: int | None = None,
    alpha_lr: float | None = None,
    alpha_state: AlphaState | None = None,
    splits: dict[str, Tensor] | None = None,
    intermediate_bounds: dict[str, Box] | None = None,
    refine_intermediate: bool | Sequence[str] = False,
    return_coefficients: bool = False,
) -> dict[str, BoundResult]:
    """Several final bounds from one set of intermediate bounds: ``{method name: BoundResult}``.

    Same arguments as :func:`bound`. The methods share one capture, input box, spec, the IBP
    boxes of every node, and the intermediate bounds of methods with the same intermediate
    strategy (e.g. ``("crown-ibp", "ibp")``: one IBP pass feeds CROWN-IBP's backward pass and
    the IBP bound). ``projections`` applies to the methods that support it.
    """
    ms = [get_method(name) for name in methods]
    if return_intermediate not in (False, True, "boxes"):
        raise CertorchError(f"return_intermediate must be True, False or 'boxes', got {return_intermediate!r}")
    keep_regions = return_intermediate is True
    if not ms:
        raise CertorchError("give at least one bound method")
    if slope is not None:
        check_slope(slope)
    options = check_options(alpha_iters, alpha_lr, alpha_state, return_coefficients)
    if options and not any(m.final == "alpha" for m in ms):
        raise CertorchError(f"alpha_iters/alpha_lr/alpha_state/return_coefficients apply to method alpha-crown, not {ms[0].name!r}")
    if projections is not None:
        if not any(m.supports_projections for m in ms):
            raise CertorchError(f"projections are supported by methods zonotope and dual, not {ms[0].name!r}")
        if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
            raise CertorchError(f"projections must be a positive integer, got {projections}")
    if projection_dtype is not None:
        if projections is None:
            raise CertorchError("projection_dtype applies to projected estimates only: give projections=r too")
        if not isinstance(projection_dtype, torch.dtype) or not projection_dtype.is_floating_point:
            raise CertorchError(f"projection_dtype must be a floating torch.dtype, got {projection_dtype!r}")
    if not isinstance(x, Tensor):
        raise CertorchError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise CertorchError(f"x must have a batch dimension: shape (B, *input_shape), got {tuple(x.shape)}")
    if memory_budget is not None and not (isinstance(memory_budget, int) and memory_budget > 0):
        raise CertorchError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
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
    budget = memory_budget if memory_budget is not None else memory.default_budget(x.device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    base = BoundContext(
        graph=graph, box=box, x=x, dtype=dtype, generator=generator,
        max_elements=max_elements or memory.max_elements_for(budget, itemsize), patches=patches,
        memory_budget=budget, deadline=deadline, keep_regions=keep_regions, options=options,
        splits=_check_splits(graph, splits, x.shape[0], x.device),
        given=_check_given(graph, intermediate_bounds, x.shape[0], dtype, x.device),
        refine=_check_refine(graph, refine_intermediate, intermediate_bounds),
    )
    spec = _spec(C, y, x.shape[0], graph.output_shape, dtype, x.device)
    batch_stats = _uses_batch_statistics(graph)
    shared: dict[tuple, BoundContext] = {}
    out: dict[str, BoundResult] = {}
    for m in ms:
        proj = projections if m.supports_projections else None
        s = slope or m.slope
        inter = intermediate_for(m, proj)
        if inter != m.intermediate and m.intermediate == "zonotope" and not _backward_is_cheaper(base):
            inter = m.intermediate  # exact dual: the forward zonotope form of the same bounds is cheaper here
        key = (inter, s if inter == "crown" else None, proj)
        ctx = shared.get(key)
        if ctx is None:  # IBP boxes, affine maps and clean values are shared by every method
            ctx = shared[key] = replace(base, intermediate=inter, slope=s, projections=proj,
                                        projection_dtype=projection_dtype if proj else None, boxes={},
                                        regions={}, forward_done=set(), ibp_boxes=base.ibp_boxes, _maps=base._maps)
            ctx._values = base._values
        out[m.name] = _run_chunked(m, ctx, spec, upper, budget, itemsize, bool(return_intermediate),
                                   proj is None and not batch_stats)
        base._values = ctx._values
    return out


def _run_chunked(m, ctx: BoundContext, spec: Tensor, upper: bool, budget: int, itemsize: int,
                 return_intermediate: bool, sound: bool) -> BoundResult:
    """One method on ``ctx``, in chunks of examples when the batch does not fit the budget."""
    graph, box, x = ctx.graph, ctx.box, ctx.x
    chunk = _plan_chunk(m, ctx, budget, itemsize, ctx.keep_regions, spec.shape[1])
    if chunk >= ctx.batch:
        try:
            lower, up = run_method(m, ctx, spec, upper)
        except MemoryBudgetError:  # a node check found more than planned (batch-union error terms)
            if ctx.batch == 1:
                raise
            chunk = ctx.batch // 2
            ctx.regions, ctx.forward_done = {}, set()  # free the partial whole-batch regions
        else:
            result = BoundResult(lower, up, m.name, sound, extra=dict(ctx.extra))
            if return_intermediate:
                _expose(result, graph, [ctx])
            return result
    for n in graph.nodes:  # affine maps from the whole batch (train-mode BatchNorm statistics), shared
        if n.is_affine:
            ctx.affine_map(n.index)
    lows, ups, subs = [], [], []
    s0 = 0
    while s0 < ctx.batch:  # loop over memory chunks of examples; a chunk that fails a node check is halved
        sl = slice(s0, min(ctx.batch, s0 + chunk))
        sub = replace(ctx, box=box[sl], x=x[sl], boxes={}, ibp_boxes={}, regions={}, forward_done=set(),
                      _values=None, _maps=ctx._maps, extra={},
                      splits={k: v[sl] for k, v in ctx.splits.items()}, given={k: v[sl] for k, v in ctx.given.items()},
                      options={k: v.select(sl) if isinstance(v, AlphaState) else v for k, v in ctx.options.items()})
        try:
            lo_c, up_c = run_method(m, sub, spec[sl], upper)
        except MemoryBudgetError:
            if chunk == 1:
                raise
            chunk //= 2
            continue
        lows.append(lo_c)
        ups.append(up_c)
        subs.append(sub)
        s0 = sl.stop
    result = BoundResult(torch.cat(lows), torch.cat(ups) if ups[0] is not None else None, m.name, sound)
    if all("alpha" in c.extra for c in subs):
        result.extra["alpha"] = AlphaState.cat([c.extra["alpha"] for c in subs])
    coeffs = [c.extra.get("coefficients", {}) for c in subs]
    if coeffs[0]:
        result.extra["coefficients"] = {k: torch.cat([c[k].expand(s.batch, *c[k].shape[1:]) for c, s in
                                                      zip(coeffs, subs)]) for k in coeffs[0] if all(k in c for c in coeffs)}
    if return_intermediate:
        _expose(result, graph, subs)
    return result


def _node_index(graph, name: str, what: str) -> int:
    for n in graph.nodes:
        if n.name == name and not n.is_input:
            return n.index
    valid = ", ".join(n.name for n in graph.nodes if not n.is_input)
    raise CertorchError(f"{what} names node {name!r}, which the network does not have; its nodes: {valid}")


def _check_refine(graph, refine, given: dict | None) -> frozenset[int]:
    """Node indices whose given bounds are refined (``refine_intermediate``)."""
    if refine is False or refine is None:
        return frozenset()
    if refine is True:
        names = list(given or {})
    elif isinstance(refine, str) or not all(isinstance(n, str) for n in refine):
        raise CertorchError("refine_intermediate must be True/False or a list of node names")
    else:
        names = list(refine)
    return frozenset(_node_index(graph, n, "refine_intermediate") for n in names)


def _check_splits(graph, splits: dict | None, B: int, device) -> dict[int, Tensor]:
    """``{node name: (B, *shape) in {-1, 0, 1}}`` -> ``{node index: (B, n) int8}``."""
    out: dict[int, Tensor] = {}
    for name, s in (splits or {}).items():
        i = _node_index(graph, name, "splits")
        s = torch.as_tensor(s, device=device)
        shape = (B, *graph.nodes[i].shape)
        if tuple(s.shape) != shape:
            raise CertorchError(f"splits[{name!r}] must have shape {shape}, got {tuple(s.shape)}")
        if not bool(((s == 0) | (s == 1) | (s == -1)).all()):
            raise CertorchError(f"splits[{name!r}] must hold only -1, 0 and +1")
        if bool((s != 0).any()):
            out[i] = s.to(torch.int8).reshape(B, -1)
    return out


def _check_given(graph, given: dict | None, B: int, dtype, device) -> dict[int, Box]:
    """``{node name: Box (B, *shape)}`` -> ``{node index: Box}`` in the computation's dtype."""
    out: dict[int, Box] = {}
    for name, b in (given or {}).items():
        i = _node_index(graph, name, "intermediate_bounds")
        shape = (B, *graph.nodes[i].shape)
        if not isinstance(b, Box) or tuple(b.lower.shape) != shape or tuple(b.upper.shape) != shape:
            raise CertorchError(f"intermediate_bounds[{name!r}] must be a Box of shape {shape}")
        if bool(torch.isnan(b.lower).any() | torch.isnan(b.upper).any()):
            raise CertorchError(f"intermediate_bounds[{name!r}] contains NaN")
        out[i] = b.to(device=device, dtype=dtype)
    return out


def _backward_is_cheaper(ctx: BoundContext) -> bool:
    """Cost model (:func:`certorch.bounds.memory.backward_beats_zonotope`) on a throwaway IBP pass."""
    with torch.no_grad():
        probe = replace(ctx, boxes={}, ibp_boxes={}, regions={}, forward_done=set(), _values=None, _maps=ctx._maps)
        ibp_box(probe, ctx.graph.output)
        return memory.backward_beats_zonotope(probe, probe.ibp_boxes, lambda t: ibp_is_exact(probe, t))


def _uses_batch_statistics(graph) -> bool:
    """True when some BatchNorm normalizes with the batch's statistics (training mode or no
    running statistics): bounds of a batch-dependent function, not of the eval-mode model."""
    for n in graph.nodes:
        mod = getattr(n.op, "module", None)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats):
            return True
    return False


def _plan_chunk(m, ctx: BoundContext, budget: int, itemsize: int, keep_all: bool, spec_rows: int = 1) -> int:
    """Examples per chunk that fit the memory budget (see :mod:`certorch.bounds.memory`)."""
    graph = ctx.graph
    forward_kind = m.final if m.final in ("zonotope", "symbolic") else ctx.intermediate
    per = torch.zeros(ctx.batch, dtype=torch.float64)
    what = "spec rows"
    floor = None
    if forward_kind in ("zonotope", "symbolic"):
        ibp_boxes: dict = {}
        if not ctx.projections:  # exact zonotopes: error terms per IBP-unstable neuron
            with torch.no_grad():
                ibp_ctx = replace(ctx, boxes={}, ibp_boxes={}, regions={}, forward_done=set(), _values=None,
                                  _maps=ctx._maps)
                ibp_box(ibp_ctx, graph.output)
            ibp_boxes = ibp_ctx.ibp_boxes
        gens = memory.generator_counts(graph, ibp_boxes, forward_kind, ctx.projections, ctx.batch)
        per = memory.forward_peak(graph, gens, itemsize, graph.output, keep_all)
        what = f"{forward_kind} coefficients"
        if forward_kind == "zonotope" and not ctx.projections:  # IBP counts: a likely maximum only
            least = memory.generator_counts(graph, None, forward_kind, None, ctx.batch)
            floor = memory.forward_peak(graph, least, itemsize, graph.output, keep_all, slack=1.0, margin=1.0)
    exact = torch.zeros_like(per)  # backward rows and alpha state: sizes known exactly
    if m.final == "backward" or ctx.intermediate == "crown":
        targets = [n.inputs[0] for n in graph.activation_nodes()] if ctx.intermediate == "crown" else []
        widest = max([row_numel(ctx, graph.output)] + [row_numel(ctx, t, ctx.patches) for t in targets])
        exact = torch.full_like(per, float(memory.backward_peak(widest, itemsize)))
    if m.final == "alpha":
        exact = torch.maximum(exact, torch.full_like(per, peak_bytes(ctx, spec_rows, itemsize)))
        what = "alpha-CROWN slopes and saved coefficients"
    per = torch.maximum(per, exact)
    if floor is not None:
        floor = torch.maximum(floor, exact)
    return memory.plan_batch(per, budget, m.name, what, floor)


def _expose(result: BoundResult, graph, ctxs: list[BoundContext]) -> None:
    """Fill ``result.intermediate`` / ``regions`` from the contexts of the example chunks."""
    names = {n.index: n.name for n in graph.nodes}
    boxes = [{**c.ibp_boxes, **c.boxes} for c in ctxs]
    for i in sorted(boxes[0]):
        if all(i in b for b in boxes):
            parts = [b[i] for b in boxes]
            result.intermediate[names[i]] = parts[0] if len(parts) == 1 else Box(
                torch.cat([p.lower for p in parts]), torch.cat([p.upper for p in parts]))
    if not ctxs[0].keep_regions:  # return_intermediate="boxes": whatever regions are left are not the caller's
        return
    for i in sorted(ctxs[0].regions):
        parts = [c.regions[i] for c in ctxs if i in c.regions]
        if len(parts) == len(ctxs):
            result.regions[names[i]] = parts[0] if len(parts) == 1 else type(parts[0]).cat(parts)


def certified(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    method: str = "crown",
    lo: float | Tensor = 0.0,
    hi: float | Tensor = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
    **kwargs,
) -> Tensor:
    """Bool (B,): the clean prediction is ``y`` and every margin lower bound is > 0.

    Certificates use **eval semantics** (BatchNorm running statistics, no dropout; every
    module's train/eval flag is restored afterwards and no running statistic changes) and
    compute in **float64** by default (``dtype=torch.float32`` opts out: a float32 margin of
    1e-7 is not a proof). Model families with their own certificate (L_inf-dist nets) are
    certified by the certifier they register (:mod:`certorch.bounds.certifiers`), whatever
    ``method``. Estimates (``projections=``) are refused.
    """
    from certorch.bounds.certifiers import find_certifier
    from certorch.nn.mode import eval_mode

    if kwargs.get("projections") is not None:
        raise CertorchError("projections give estimates, not sound bounds: they cannot certify")
    if not isinstance(y, Tensor) or not isinstance(x, Tensor) or y.shape != x.shape[:1]:
        raise CertorchError("certified() needs x (B, ...) and labels y (B,) as tensors with matching batch size")
    fam = find_certifier(model)
    if fam is not None:
        check_eps(eps)
        return fam.margins(model, x, y, eps) > 0
    with eval_mode(model), torch.no_grad():
        res = bound(model, x, eps, method=method, y=y, lo=lo, hi=hi, upper=False, dtype=dtype, **kwargs)
        if not res.sound:
            raise CertorchError(f"method {res.method!r} gave estimates, not sound bounds: they cannot certify")
        graph = capture(model, tuple(x.shape[1:]))
        clean = graph.forward(x.to(dtype))[graph.output].flatten(1).argmax(dim=1) == y.to(x.device)
    return clean & (res.lower > 0).all(dim=1)
