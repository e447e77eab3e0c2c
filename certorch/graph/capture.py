"""Capture a :class:`Graph` from an ``nn.Module`` through the public ``torch.fx`` API.

Modules whose type is in the op registry are leaves; others are traced through. Shapes come
from ``torch.fx.passes.shape_prop.ShapeProp`` on a batch of 2 (so reshapes that mix the batch
dimension are detected).

Caching: graphs are cached per model object (weakly) and per input shape, **keyed on the
module structure** (:func:`structure_key`: the identity and type of every submodule at every
path, the callables and plain settings stored on them). Ops hold module references and read the
live parameters, so a cached graph stays valid exactly while that key is unchanged; replacing a
layer (``model[3] = nn.Linear(8, 3)``, ``model.fc = ...``, a new head, a cascade or COLT stage)
changes the key and the model is captured again.

Every capture is checked once against the model (:func:`check_capture`): ``graph.forward(x)``
must equal ``model(x)`` in float64 on a seeded probe batch, which also catches fx tracing only
one branch of data-dependent code and in-place aliasing. Capture never changes the model:
each module's own train/eval flag is restored (``certorch.nn.mode.eval_mode``) and the check runs
on float64 copies of the parameters and buffers (``torch.func.functional_call``).
"""
from __future__ import annotations

import weakref

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import certorch.ops  # noqa: F401  (registers ops)
from certorch.errors import CertorchError, UnsupportedOperationError
from certorch.graph.ir import Graph, Node
from certorch.nn.mode import eval_mode
from certorch.ops.base import InputOp
from certorch.ops.registry import function_factory, is_registered_module, module_factory

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_PLAIN = (bool, int, float, str, type(None))


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return is_registered_module(m) or super().is_leaf_module(m, qualname)


def _setting(v) -> object | None:
    """Hashable summary of a module attribute that can change what ``forward`` computes."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, tuple) and all(isinstance(e, _PLAIN) for e in v):
        return v
    if callable(v) and not isinstance(v, (nn.Module, torch.Tensor)):
        return ("callable", id(v))
    return None


def structure_key(model: nn.Module) -> tuple:
    """What a captured graph depends on besides parameter values: for every submodule path,
    the module's identity and class, and the callables and plain settings (ints, floats,
    strings, tuples) in its ``__dict__`` (the ``training`` flag excluded: ops read it live)."""
    items: list = []
    for name, m in model.named_modules(remove_duplicate=False):
        items.append((name, id(m), type(m)))
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training":
                continue
            s = _setting(v)
            if s is not None:
                items.append((name, k, s))
    return tuple(items)


def capture(model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """Graph of ``model`` for per-example input shape ``input_shape`` (no batch dim); cached
    per (model, shape) while the module structure is unchanged (see module doc)."""
    shape = tuple(int(s) for s in input_shape)
    key = structure_key(model)
    per_model = _CACHE.setdefault(model, {})
    hit = per_model.get(shape)
    if hit is not None and hit[0] == key:
        return hit[1]
    graph = _capture(model, shape)
    check_capture(model, graph)
    per_model[shape] = (key, graph)  # replaces a stale entry (frees the old modules)
    return graph


def _probe(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(2, *shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _float64_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        state[name] = t.detach().to(torch.float64) if t.is_floating_point() else t.detach().clone()
    return state


def check_capture(model: nn.Module, graph: Graph) -> None:
    """Raise :class:`UnsupportedOperationError` unless ``graph.forward(x) == model(x)`` on a
    seeded probe batch in [0, 1] (float64, eval semantics; the model is not changed).

    Falls back to the model's own dtype (relative tolerance 1e-4) for models that cannot run
    on float64 copies of their parameters.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x64 = _probe(graph.input_shape, torch.float64, device)
    with eval_mode(model), torch.no_grad():
        try:
            ref = torch.func.functional_call(model, _float64_state(model), (x64,), strict=False)
            got = graph.forward(x64)[graph.output]
            rtol = 1e-6
        except Exception:  # noqa: BLE001 - models that cannot run in float64: compare in their dtype
            dtype = param.dtype if param is not None else torch.float32
            x = x64.to(dtype)
            ref = model(x)
            got = graph.forward(x)[graph.output]
            rtol = 1e-4
    if not isinstance(ref, torch.Tensor) or ref.shape != got.shape:
        raise UnsupportedOperationError(
            f"captured graph of {type(model).__name__} does not reproduce the model's output shape")
    ref, got = ref.to(torch.float64), got.to(torch.float64)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((ref - got).abs().max()) if ref.numel() else 0.0
    if not err <= rtol * (1.0 + scale):  # also catches NaN
        raise UnsupportedOperationError(
            f"captured graph of {type(model).__name__} differs from model(x) (max abs difference {err:.3g}): "
            "data-dependent control flow or in-place operations are not supported")


def _capture(model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    tracer = _LeafTracer()
    root = nn.Sequential(model) if is_registered_module(model) else model  # a bare layer is one leaf
    try:
        fx_graph = tracer.trace(root)
    except Exception as e:  # noqa: BLE001  (fx raises many types)
        raise UnsupportedOperationError(f"cannot trace {type(model).__name__} with torch.fx: {str(e).splitlines()[0]}")
    gm = torch.fx.GraphModule(tracer.root, fx_graph)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    with eval_mode(model), torch.no_grad():  # no running-statistics updates; every flag restored
        try:
            ShapeProp(gm).propagate(_probe(input_shape, dtype, device))
        except Exception as e:  # noqa: BLE001
            raise CertorchError(f"model does not accept inputs of shape {input_shape}: {str(e).splitlines()[0]}")

    modules = dict(gm.named_modules())
    nodes: list[Node] = []
    index: dict[torch.fx.Node, int] = {}
    output = None

    def shape_of(n: torch.fx.Node) -> tuple[int, ...]:
        meta = n.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise UnsupportedOperationError(f"operation {n.format_node()} does not produce a single tensor")
        shp = tuple(meta.shape)
        if not shp or shp[0] != 2:
            raise UnsupportedOperationError(f"operation {n.name!r} mixes the batch dimension (output shape {shp})")
        return shp[1:]

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if nodes:
                raise UnsupportedOperationError("models with more than one input are not supported")
            index[n] = 0
            nodes.append(Node(0, "input", InputOp(), (), tuple(input_shape)))
            continue
        if n.op == "output":
            arg = n.args[0]
            if not isinstance(arg, torch.fx.Node):
                raise UnsupportedOperationError("models must return a single tensor")
            output = index[arg]
            continue
        if n.op == "get_attr":
            raise UnsupportedOperationError(f"parameters used outside supported layers are not supported ({n.target})")
        tensor_args = [a for a in n.args if isinstance(a, torch.fx.Node)]
        tensor_args += [b for a in n.args if isinstance(a, (list, tuple)) for b in a if isinstance(b, torch.fx.Node)]
        tensor_args += [a for a in n.kwargs.values() if isinstance(a, torch.fx.Node)]
        in_shapes = [shape_of(a) for a in tensor_args]
        out_shape = shape_of(n)
        if n.op == "call_module":
            mod = modules[n.target]
            op = module_factory(mod, n.target)(mod, in_shapes, out_shape)
            name = n.target
        else:  # call_function / call_method
            target = n.target
            op = function_factory(target, n.name)(in_shapes, out_shape, n.args, n.kwargs)
            name = n.name
        idx = len(nodes)
        index[n] = idx
        nodes.append(Node(idx, name, op, tuple(index[a] for a in tensor_args), out_shape))
    if output is None:
        raise UnsupportedOperationError("model has no output")
    return Graph(nodes, output)
