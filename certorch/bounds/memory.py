"""Memory budget of a bound computation: estimate the largest allocations before making them.

Exact zonotope / symbolic / dual bounds keep one coefficient per (input or ReLU error term) x
neuron x example: on ``cifar_resnet`` at batch 4 in float64 that is a 14.5 GB tensor, which
got the whole machine OOM-killed. Every bound call therefore has a **memory budget** in bytes
(``ct.bound(..., memory_budget=)``; default: half of the memory available on the computing
device, :func:`default_budget`). Before any coefficient tensor is allocated:

* the forward methods' peak is estimated per example by simulating the interpreter's live
  set (:func:`forward_peak`), with the number of error terms per ReLU layer taken from the
  IBP bounds (an estimate: DeepZ may keep a few neurons unstable that IBP proves stable, so the
  interpreter checks every node again before computing it, :func:`check_node`);
* backward methods chunk their spec rows to ``max_elements`` (derived from the budget) and
  need, per example, at least one row of the widest node (:func:`backward_peak`).

:func:`plan_batch` then splits the batch into chunks of examples that fit, or raises
:class:`~certorch.errors.MemoryBudgetError` at once naming the method, the size needed and
the ways out (a smaller batch, ``projections=``, a cheaper method). Hand-written (no library
estimates tensor-program peaks ahead of time); the estimates are deliberately generous.
"""
from __future__ import annotations

import os

import torch

from certorch.errors import MemoryBudgetError

#: factor on the simulated live set: temporaries of the map (sign splits, scatter, einsum)
FORWARD_SLACK = 2.0
#: factor on the whole forward estimate for allocator fragmentation and the temporaries the
#: simulation does not see: measured peak RSS / estimate was 1.55 for symbolic bounds of
#: cifar_resnet (batch 1, float64; 0.6-0.9 on cifar_small), so 1.75 keeps the estimate above it
ESTIMATE_MARGIN = 1.75
#: coefficient tensors alive at once in a backward pass (A, its transpose, the relaxation's
#: products, the negated rows): max_elements = budget / (itemsize * BACKWARD_TENSORS)
BACKWARD_TENSORS = 8


def available_bytes(device: torch.device | str | None = None) -> int:
    """Memory available for new allocations on ``device`` (CUDA: free device memory; CPU:
    ``MemAvailable`` of /proc/meminfo, else physical pages)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def _address_space_left() -> int | None:
    """Bytes of address space left under ``RLIMIT_AS`` (None: unlimited or unknown)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return max(0, soft - used)
    except (ImportError, OSError, ValueError):
        return None


def default_budget(device: torch.device | str | None = None) -> int:
    """Half of :func:`available_bytes` (and, on CPU, of the address space left under a
    ``ulimit -v``): leaves room for autograd, the model and the caller."""
    avail = available_bytes(device)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cpu":
        left = _address_space_left()
        if left is not None:
            avail = min(avail, left)
    return max(1 << 26, avail // 2)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


#: the largest coefficient tensor of one backward chunk regardless of the budget (bigger chunks
#: gain no speed and only raise the peak: measured on cnn7 CROWN-IBP fwd+bwd at batch 128)
MAX_ELEMENTS_CAP = 2**27


def max_elements_for(budget: int, itemsize: int) -> int:
    """Largest coefficient tensor (elements) a backward pass may build under ``budget``."""
    return max(1 << 16, min(MAX_ELEMENTS_CAP, budget // (itemsize * BACKWARD_TENSORS)))


def generator_counts(graph, ibp_boxes: dict | None, kind: str, projections: int | None, batch: int) -> torch.Tensor:
    """Per example (B,) and per node: how many coefficients per neuron the forward domain
    holds at each node, as a (B, N) float tensor (node order of ``graph``).

    ``zonotope``: input terms + one term per IBP-unstable neuron of every ReLU before the node
    (``projections``: r at the input, 2r from the first ReLU on, and ``ibp_boxes`` is not read;
    ``ibp_boxes=None``: no ReLU term at all, the certain minimum); ``symbolic``: 2 x input terms (the forms share one
    coefficient tensor since commit dad3fe6, so this now also covers the maps' outputs that autograd
    keeps for a training step: cifar_small, batch 1, float32 with backward peaked at 0.39 GiB
    against this 0.49 GiB estimate; cifar_resnet in float64 without gradients at 1.7 against 5.3).
    """
    n_in = graph.nodes[0].numel
    B = batch
    gens = torch.zeros(B, len(graph.nodes), dtype=torch.float64)
    per_node: dict[int, torch.Tensor] = {}
    for node in graph.nodes:
        if node.is_input:
            g = torch.full((B,), float(projections or n_in), dtype=torch.float64)
            if kind == "symbolic":
                g = 2 * g
        elif node.is_activation and kind == "zonotope" and projections:
            # one merged projected block of r columns (domains/zonotope.py); 2r covers the new
            # projections drawn beside the scaled block while they are added into it
            g = torch.full((B,), 2.0 * projections, dtype=torch.float64)
        elif node.is_activation and kind == "zonotope" and ibp_boxes is None:
            g = per_node[node.inputs[0]]
        elif node.is_activation and kind == "zonotope":
            pre = ibp_boxes[node.inputs[0]]
            lo, up = pre.lower.flatten(1), pre.upper.flatten(1)
            rule = getattr(node.op.relaxation, "needs_bounds", None)  # neurons that get an error term
            unstable = (rule(lo, up) if rule is not None else (lo < 0) & (up > 0)).sum(1).to(torch.float64).cpu()
            new = torch.full_like(unstable, float(projections)) if projections else unstable
            g = per_node[node.inputs[0]] + new
        else:
            g = torch.stack([per_node[j] for j in node.inputs]).amax(0) if node.inputs else torch.zeros(B)
        per_node[node.index] = g
        gens[:, node.index] = g
    return gens


def forward_peak(graph, gens: torch.Tensor, itemsize: int, target: int, keep_all: bool = False,
                 slack: float = FORWARD_SLACK, margin: float = ESTIMATE_MARGIN) -> torch.Tensor:
    """Estimated peak bytes (B,) per example of a forward interpreter run up to ``target``.

    Simulates the live set: a node's value stays alive until its last user is computed
    (``keep_all``: every value stays, as with ``return_intermediate``). ``slack=1, margin=1``:
    the values alone, a certain minimum when ``gens`` is one.
    """
    nodes = graph.ancestors(target)
    size = {i: gens[:, i] * graph.nodes[i].numel * itemsize for i in nodes}
    pending = {i: sum(1 for u in graph.users[i] if u in size) for i in nodes}
    live: dict[int, torch.Tensor] = {}
    peak = torch.zeros(gens.shape[0], dtype=torch.float64)
    for i in nodes:
        current = sum(live.values(), torch.zeros_like(peak))
        peak = torch.maximum(peak, current + slack * size[i])
        live[i] = size[i]
        for j in graph.nodes[i].inputs:
            pending[j] -= 1
            if pending[j] == 0 and not keep_all:
                live.pop(j, None)
    return margin * peak


def backward_peak(row_numel: int, itemsize: int, batch: int = 1) -> int:
    """Bytes one spec row of one backward pass needs for ``batch`` examples (rows and negated rows)."""
    return 2 * batch * row_numel * itemsize * BACKWARD_TENSORS


def plan_batch(per_example: torch.Tensor, budget: int, method: str, what: str,
               floor: torch.Tensor | None = None) -> int:
    """Largest chunk of consecutive examples whose summed estimate fits ``budget`` (at least 1).

    Raises :class:`MemoryBudgetError` when even one example needs more than ``budget``.
    ``floor`` (B,): a certain minimum where ``per_example`` is only a likely maximum (exact
    zonotopes count IBP-unstable neurons, 2-8x more than DeepZ keeps on the CIFAR nets): the
    refusal then needs ``floor`` over the budget, and an example between the two runs alone,
    every node checked with its true size (:func:`check_node`).
    """
    need = float(per_example.max()) if per_example.numel() else 0.0
    if floor is not None and need > budget:
        surely = float(floor.max()) if floor.numel() else 0.0
        if surely <= budget:
            return 1
        need = surely
    if need > budget:
        raise MemoryBudgetError(
            f"method {method!r} needs about {gib(need)} per example ({what}) but the memory budget is {gib(budget)}; "
            "use a smaller network or input, projections=r (training estimates), a cheaper method "
            "(ibp, crown-ibp, crown), or raise memory_budget=")
    total = float(per_example.sum())
    if total <= budget:
        return per_example.numel()
    # examples are similar in size: chunk by the largest one (conservative)
    return max(1, int(budget // need))


def check_node(ctx, idx: int, new_bytes: float, live_bytes: float) -> None:
    """Raise :class:`MemoryBudgetError` before a node's value of ``new_bytes`` is allocated
    when it and the ``live_bytes`` already held exceed ``ctx.memory_budget``."""
    budget = getattr(ctx, "memory_budget", None)
    if budget is None:
        return
    need = ESTIMATE_MARGIN * (live_bytes + FORWARD_SLACK * new_bytes)
    if need > budget:
        node = ctx.graph.nodes[idx]
        raise MemoryBudgetError(
            f"bound computation at node {node.name!r} needs about {gib(need)} for a batch of {ctx.batch} "
            f"but the memory budget is {gib(budget)}; use a smaller batch, projections=r (training estimates), "
            "a cheaper method (ibp, crown-ibp, crown), or raise memory_budget=")


#: measured: per multiply-add, the exact forward zonotope costs about this much more than a
#: backward pass (generator blocks, batch unions); mnist_fc1 / mnist_fc2 / mnist_small / cifar_small
ZONOTOPE_OVERHEAD = 1.5


def _vector_cost(ctx, i: int) -> float:
    """Multiply-adds to push one vector through affine node ``i`` (a cost model)."""
    m = ctx.affine_map(i)
    w = getattr(m, "weight", None)
    node = ctx.graph.nodes[i]
    if not isinstance(w, torch.Tensor):
        return float(node.numel)
    return float(node.numel * w[0].numel()) if w.dim() == 4 else float(w.numel())


def backward_beats_zonotope(ctx, ibp_boxes: dict, is_exact) -> bool:
    """Whether CROWN-style backward passes (rows for the IBP-unstable neurons, lower and upper)
    should cost less than the exact forward zonotope (one generator per input and unstable
    neuron) for the intermediate bounds of the same network: both give the dual network's
    bounds with u/(u-l) slopes. ``is_exact(t)``: IBP bounds of node t need no rows."""
    graph = ctx.graph
    if any(getattr(n.op.relaxation, "parallel_lines", None) is None for n in graph.activation_nodes()):
        return True  # the zonotope cannot pass this network (e.g. max pooling)
    gens: dict[int, float] = {}
    cost_to: dict[int, float] = {}
    zono = back = 0.0
    for node in graph.nodes:
        i = node.index
        if node.is_input:
            gens[i], cost_to[i] = float(node.numel), 0.0
            continue
        g = max(gens[j] for j in node.inputs)
        c = sum(cost_to[j] for j in node.inputs)
        if node.is_affine:
            v = _vector_cost(ctx, i)
            zono += g * v
            c += v
        elif node.is_activation:
            t = node.inputs[0]
            box = ibp_boxes[t]
            lo, up = box.lower.flatten(1), box.upper.flatten(1)
            rule = getattr(node.op.relaxation, "needs_bounds", None)
            rows = float((rule(lo, up) if rule is not None else (lo < 0) & (up > 0)).any(0).sum())
            g += rows
            if not is_exact(t):
                back += 2.0 * rows * cost_to[t]
        gens[i], cost_to[i] = g, c
    return back <= ZONOTOPE_OVERHEAD * zono
