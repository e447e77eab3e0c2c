"""Capture a :class:`Graph` from an ``nn.Module`` through the public ``torch.fx`` API.

Modules whose type is in the op registry are leaves; others are traced through. Shapes come
from ``torch.fx.passes.shape_prop.ShapeProp`` on a batch of 2 zeros (so reshapes that mix the
batch dimension are detected). Graphs are cached per (model, input shape) in a weak map; ops
read the live parameters, so a cached graph stays valid while the module structure is unchanged.
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
from certorch.ops.base import InputOp
from certorch.ops.registry import function_factory, is_registered_module, module_factory

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return is_registered_module(m) or super().is_leaf_module(m, qualname)


def capture(model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """Graph of ``model`` for per-example input shape ``input_shape`` (no batch dim); cached."""
    key = tuple(int(s) for s in input_shape)
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _capture(model, key)
    return per_model[key]


def _capture(model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    tracer = _LeafTracer()
    try:
        fx_graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001  (fx raises many types)
        raise UnsupportedOperationError(f"cannot trace {type(model).__name__} with torch.fx: {str(e).splitlines()[0]}")
    gm = torch.fx.GraphModule(tracer.root, fx_graph)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        ShapeProp(gm).propagate(torch.zeros(2, *input_shape, dtype=dtype, device=device))
    except Exception as e:  # noqa: BLE001
        raise CertorchError(f"model does not accept inputs of shape {input_shape}: {str(e).splitlines()[0]}")
    finally:
        model.train(was_training)

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
