"""ONNX import and export.

Import (:func:`load_onnx` / :func:`import_onnx`) converts an ONNX graph into a plain
``nn.Module`` built from standard torch layers (``nn.Linear``, ``nn.Conv2d``, ``nn.ReLU``,
``nn.Flatten``, ``nn.AvgPool2d``) and :class:`certorch.ops.onnx_ops.ElementwiseAffine` (constant
add/sub/mul/div, folded BatchNormalization), so certorch's graph capture, bounds, attacks and the
MILP work on it unchanged. Supported ONNX ops: :data:`SUPPORTED_OPS`. A graph using any other op
fails with ONE error listing every unsupported op; a corrupt or invalid file fails with a
one-line :class:`CertorchError`.

Precision: the module computes in the file's precision, so the network verified is the one
given. A FLOAT network becomes a float32 module, a DOUBLE network a float64 module (weights
copied without rounding; ``ImportedNetwork.dtype`` says which). Other input types (FLOAT16,
BFLOAT16, integers) and mixed files (e.g. a DOUBLE input with FLOAT weights) are refused.

Export (:func:`export_onnx`) writes a certorch model with ``torch.onnx.export`` (TorchScript
exporter, ``dynamo=False``, dynamic batch dimension).

    net = load_onnx("model.onnx")        # ImportedNetwork(module, input_shape, output_shape, ...)
    logits = net.module(x)               # x: (B, *net.input_shape)
    export_onnx(model, "out.onnx", input_shape=(1, 28, 28))
"""
from __future__ import annotations

import copy
import io
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from certorch.errors import CertorchError, UnsupportedOperationError
from certorch.ops.onnx_ops import ElementwiseAffine, OnnxNetwork, Permute

__all__ = ["SUPPORTED_OPS", "ImportedNetwork", "OnnxNetwork", "load_onnx", "import_onnx", "export_onnx"]

#: ONNX op types the importer understands.
SUPPORTED_OPS = frozenset(
    {
        "Gemm", "MatMul", "Conv", "Relu", "Flatten", "Reshape", "Add", "Sub", "Div", "Mul",
        "BatchNormalization", "AveragePool", "Identity", "Constant", "Dropout", "Transpose", "Pad",
        "Sigmoid", "Tanh", "LeakyRelu", "MaxPool", "Concat",
    }
)
#: ONNX element types the importer accepts for the network (onnx.TensorProto.FLOAT, DOUBLE).
_FLOAT_TYPES = {1: torch.float32, 11: torch.float64}
#: most values one example may have at any point of the graph (VNN-COMP's largest are ~10^6);
#: shapes are checked on the meta device before anything of that size is allocated
MAX_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ImportedNetwork:
    """Result of an import: the module and the per-example shapes (no batch dimension)."""

    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_name: str
    output_name: str
    opset: int | None
    dtype: torch.dtype = torch.float32  # the file's precision: the module computes in it

    @property
    def num_inputs(self) -> int:
        return math.prod(self.input_shape)

    @property
    def num_outputs(self) -> int:
        return math.prod(self.output_shape)


# --- loading ---------------------------------------------------------------------------------


def _onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is in the 'verify' extra
        raise CertorchError("ONNX support needs the 'onnx' package: pip install certorch[verify]") from None
    return onnx


def load_onnx(source: str | Path | bytes) -> ImportedNetwork:
    """Read an ONNX file (path) or serialized model (bytes) and convert it (see module doc)."""
    onnx = _onnx()
    where = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)):
        p = Path(source)
        if not p.is_file():
            raise CertorchError(f"ONNX file not found: {where}")
        source = p.read_bytes()
    try:
        proto = onnx.load_model_from_string(bytes(source))
    except Exception as e:  # noqa: BLE001  (protobuf raises several types)
        raise CertorchError(f"malformed ONNX file {where}: {_first_line(e)}") from None
    return import_onnx(proto, where=where)


def _type_name(elem_type: int) -> str:
    """The ONNX name of an element type (e.g. 'FLOAT16'), or its number if unknown."""
    try:
        from onnx import TensorProto

        return TensorProto.DataType.Name(elem_type)
    except Exception:  # noqa: BLE001
        return str(elem_type)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def import_onnx(proto, where: str = "<model>") -> ImportedNetwork:
    """Convert an ``onnx.ModelProto`` into an :class:`ImportedNetwork` (see module doc)."""
    onnx = _onnx()
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise CertorchError(f"malformed ONNX file {where}: the model has no graph nodes")
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001
        raise CertorchError(f"malformed ONNX file {where}: {_first_line(e)}") from None
    graph = proto.graph
    unsupported = Counter(n.op_type for n in graph.node if n.op_type not in SUPPORTED_OPS)
    if unsupported:
        found = ", ".join(f"{op} (x{c})" if c > 1 else op for op, c in sorted(unsupported.items()))
        raise UnsupportedOperationError(
            f"{where} uses unsupported ONNX ops: {found}; supported: {', '.join(sorted(SUPPORTED_OPS))}"
        )
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    try:
        conv = _Converter(graph, where)
        module = conv.run()
    except CertorchError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, ArithmeticError, AttributeError) as e:
        # safety net at the input boundary: a graph the checks above let through but that does
        # not make sense is still bad input, reported in one line
        raise CertorchError(f"{where}: cannot convert the graph: {_first_line(e)}") from None
    return ImportedNetwork(
        module, conv.input_shape, conv.shapes[conv.output], conv.input_name, conv.output, opset, conv.dtype
    )


class _Converter:
    """One conversion: walks the (topologically sorted) nodes, tracking constants and shapes."""

    def __init__(self, graph, where: str):
        from onnx import numpy_helper

        self.g, self.where, self._nh = graph, where, numpy_helper
        self.consts: dict[str, np.ndarray] = {t.name: self._array(t) for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise CertorchError(f"{where}: expected exactly one network input, got {len(inputs)}")
        if len(graph.output) != 1:
            raise CertorchError(f"{where}: expected exactly one network output, got {len(graph.output)}")
        inp = inputs[0]
        self.input_name = inp.name
        self.input_shape = self._input_shape(inp)
        self.dtype: torch.dtype = _FLOAT_TYPES[inp.type.tensor_type.elem_type]
        self.np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        out_type = graph.output[0].type.tensor_type.elem_type
        if out_type and _FLOAT_TYPES.get(out_type) != self.dtype:
            raise CertorchError(
                f"{where}: the network output {graph.output[0].name!r} has element type {_type_name(out_type)} but the "
                f"input is {_type_name(inp.type.tensor_type.elem_type)}; mixed precision is not supported"
            )
        self.output = graph.output[0].name
        self.shapes: dict[str, tuple[int, ...]] = {inp.name: self.input_shape}
        self.alias: dict[str, str] = {}
        self.layers: dict[str, nn.Module] = {}
        self.plan: list[tuple[str, str, tuple[str, ...]]] = []
        self.producer: dict[str, str] = {}  # tensor name -> layer key that produced it
        # raw uses: one per (consumer node, input slot) and one for the graph output; see _uses
        self.uses = Counter(i for n in graph.node for i in n.input if i)
        self.uses[self.output] += 1

    def _array(self, t) -> np.ndarray:
        """An initializer / Constant tensor as numpy; a corrupt tensor is a one-line error.
        Tensors stored outside the file (external data) are refused: nothing else is read."""
        if t.data_location == 1:  # onnx.TensorProto.EXTERNAL
            raise CertorchError(f"{self.where}: tensor {t.name!r} uses external data, which is not supported")
        try:
            return self._nh.to_array(t)
        except Exception as e:  # noqa: BLE001  (onnx raises several types on corrupt tensors)
            raise CertorchError(f"{self.where}: malformed constant tensor {t.name!r}: {_first_line(e)}") from None

    def _input_shape(self, inp) -> tuple[int, ...]:
        t = inp.type.tensor_type
        if t.elem_type not in _FLOAT_TYPES:
            raise CertorchError(
                f"{self.where}: network input {inp.name!r} must be FLOAT or DOUBLE, got {_type_name(t.elem_type)}"
            )
        dims = list(t.shape.dim)
        if len(dims) < 2:
            raise CertorchError(f"{self.where}: network input {inp.name!r} needs a batch dimension and at least one more")
        shape = []
        for d in dims[1:]:
            if not d.HasField("dim_value") or d.dim_value <= 0:
                raise CertorchError(f"{self.where}: network input {inp.name!r} has a non-constant dimension {d.dim_param!r}")
            shape.append(int(d.dim_value))
        self._check_size(None, tuple(shape))
        return tuple(shape)

    def _check_size(self, node, shape: tuple[int, ...]) -> None:
        if math.prod(shape) > MAX_ELEMENTS:
            msg = f"{math.prod(shape)} values per example (shape {shape}) exceed the importer's limit of {MAX_ELEMENTS}"
            raise self._err(node, msg) if node is not None else CertorchError(f"{self.where}: network input: {msg}")

    # -- helpers --------------------------------------------------------------------------

    def _err(self, node, msg: str) -> CertorchError:
        return CertorchError(f"{self.where}: node {node.name or node.op_type!r} ({node.op_type}): {msg}")

    def _name(self, x: str) -> str:
        while x in self.alias:
            x = self.alias[x]
        return x

    def _const(self, name: str) -> np.ndarray | None:
        return self.consts.get(self._name(name))

    def _attrs(self, node) -> dict:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def _tensor(self, node, a: np.ndarray) -> Tensor:
        """A finite constant as a tensor in the network's dtype (float32 or float64)."""
        t = np.array(a, dtype=self.np_dtype, copy=True)
        if not np.isfinite(t).all():
            raise self._err(node, "a constant has NaN or infinite entries (after scaling)")
        return torch.from_numpy(t)

    def _uses(self, x: str) -> int:
        """How many consumers read the value ``x`` (an alias-resolved name), through any alias.

        Raw uses are counted per ONNX name; an alias (Identity, Dropout, same-shape Reshape, a
        folded bias) consumes one raw use of its source and forwards the value to its own
        consumers, so the value's uses are the raw uses of every name resolving to ``x`` minus one
        per alias. Aliases not converted yet still count as raw uses (conservative).
        """
        total = sum(c for n, c in self.uses.items() if self._name(n) == x)
        forwarded = sum(1 for a in self.alias if self._name(a) == x)
        return total - forwarded

    def _check_operand(self, node, name: str, c: np.ndarray) -> None:
        """Numeric constant operands must have the network's float dtype (no mixed precision)."""
        if np.asarray(c).dtype != self.np_dtype:
            raise self._err(
                node, f"constant {name!r} has dtype {np.asarray(c).dtype} but the network is "
                f"{np.dtype(self.np_dtype).name}; mixed precision is not supported"
            )

    def _per_example(self, node, c: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        """A constant operand broadcast against a (B, *shape) tensor, without the batch dim."""
        c = np.asarray(c, dtype=np.float64)
        if c.ndim > len(shape):
            if c.ndim > len(shape) + 1 or c.shape[0] != 1:
                raise self._err(node, f"constant of shape {c.shape} does not broadcast to one example {shape}")
            c = c[0]
        try:
            out = np.broadcast_shapes(c.shape, shape)
        except ValueError:
            out = None
        if out != tuple(shape):
            raise self._err(node, f"constant of shape {c.shape} does not broadcast to one example {shape}")
        return self._tensor(node, c)

    def _add_layer(self, node, module: nn.Module, x: str) -> None:
        base = re.sub(r"\W+", "_", node.name or "").strip("_") or node.op_type.lower()
        key, i = base, 1
        while key in self.layers or key == "+":
            key, i = f"{base}_{i}", i + 1
        with torch.no_grad():  # output shape on the meta device: nothing is allocated
            try:
                y = copy.deepcopy(module).to("meta")(torch.empty(1, *self.shapes[x], dtype=self.dtype, device="meta"))
            except (RuntimeError, ValueError, TypeError) as e:
                raise self._err(node, f"does not accept input of shape {self.shapes[x]}: {_first_line(e)}") from None
        self._check_size(node, tuple(y.shape[1:]))
        self.layers[key] = module
        self.plan.append((node.output[0], key, (x,)))
        self.shapes[node.output[0]] = tuple(y.shape[1:])
        self.producer[node.output[0]] = key

    def _split(self, node) -> tuple[str, list[np.ndarray | None]]:
        """The single tensor input and the constants (None at the tensor's position)."""
        names = [self._name(i) for i in node.input if i]
        for n in names:
            if n not in self.consts and n not in self.shapes:
                raise self._err(node, f"input {n!r} is not produced by any earlier node")
        tensors = [n for n in names if n not in self.consts]
        if len(tensors) != 1:
            raise self._err(node, f"expected one tensor input (others constant), got {len(tensors)}")
        for n in names:
            if n in self.consts:
                self._check_operand(node, n, self.consts[n])
        return tensors[0], [self.consts.get(n) for n in names]

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> OnnxNetwork:
        for node in self.g.node:
            getattr(self, f"_op_{node.op_type}")(node, self._attrs(node))
        out = self._name(self.output)
        if out not in self.shapes:
            raise CertorchError(f"{self.where}: the network output {self.output!r} does not depend on the input")
        if out == self.input_name:
            raise CertorchError(f"{self.where}: the network output is the input itself")
        net = OnnxNetwork(self.layers, self.plan, self.input_name, out)
        self.output = out
        return net.eval()

    def _fold(self, node, fn) -> bool:
        """Evaluate ``node`` now if all its inputs are constants (constant folding)."""
        names = [self._name(i) for i in node.input if i]
        if names and all(n in self.consts for n in names):
            self.consts[node.output[0]] = np.asarray(fn(*[self.consts[n] for n in names]))
            return True
        return False

    def _op_Constant(self, node, at) -> None:
        if "value" in at:
            self.consts[node.output[0]] = self._array(at["value"])
            return
        for k, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
            if k in at:
                self.consts[node.output[0]] = np.asarray(at[k], dtype=dt)
                return
        raise self._err(node, f"unsupported Constant attributes {sorted(at)}")

    def _op_Identity(self, node, at) -> None:
        self.alias[node.output[0]] = self._name(node.input[0])

    def _op_Dropout(self, node, at) -> None:
        # inference: identity; a mask output (if any) must be unused
        self.alias[node.output[0]] = self._name(node.input[0])
        if len(node.output) > 1 and node.output[1] and self.uses[node.output[1]]:
            raise self._err(node, "the dropout mask output is used; only inference-mode Dropout is supported")

    def _op_Relu(self, node, at) -> None:
        x, _ = self._split(node)
        self._add_layer(node, nn.ReLU(), x)

    def _op_Sigmoid(self, node, at) -> None:
        x, _ = self._split(node)
        self._add_layer(node, nn.Sigmoid(), x)

    def _op_Tanh(self, node, at) -> None:
        x, _ = self._split(node)
        self._add_layer(node, nn.Tanh(), x)

    def _op_LeakyRelu(self, node, at) -> None:
        x, _ = self._split(node)
        self._add_layer(node, nn.LeakyReLU(float(at.get("alpha", 0.01))), x)

    def _op_Flatten(self, node, at) -> None:
        if self._fold(node, lambda a: a.reshape(int(np.prod(a.shape[: at.get("axis", 1)])), -1)):
            return
        if at.get("axis", 1) != 1:
            raise self._err(node, f"only axis=1 is supported, got {at.get('axis')}")
        x, _ = self._split(node)
        self._add_layer(node, nn.Flatten(), x)

    def _op_Reshape(self, node, at) -> None:
        names = [self._name(i) for i in node.input]
        if len(names) != 2 or names[1] not in self.consts:
            raise self._err(node, "the target shape must be a constant")
        if self._fold(node, lambda a, s: a.reshape([int(v) for v in s])):
            return
        x = names[0]
        in_shape = self.shapes[x]
        spec = [int(v) for v in np.asarray(self.consts[names[1]]).flatten()]
        if not spec or spec[0] not in (0, -1, 1):
            raise self._err(node, f"the target shape {spec} must keep the batch dimension first (0, -1 or 1)")
        rest = [in_shape[i] if (v == 0 and i < len(in_shape)) else v for i, v in enumerate(spec[1:])]
        n = math.prod(in_shape)
        if rest.count(-1) > 1 or any(v == 0 or v < -1 for v in rest):
            raise self._err(node, f"invalid target shape {spec}")
        if -1 in rest:
            known = math.prod(v for v in rest if v != -1)
            if known == 0 or n % known:
                raise self._err(node, f"cannot reshape {in_shape} to {spec}")
            rest[rest.index(-1)] = n // known
        if spec[0] == -1 and -1 in spec[1:]:
            raise self._err(node, f"invalid target shape {spec}")
        if math.prod(rest) != n:
            raise self._err(node, f"cannot reshape one example of shape {in_shape} to {tuple(rest)}")
        target = tuple(rest)
        if target == in_shape:
            self.alias[node.output[0]] = x
            return
        if len(target) == 1:
            module: nn.Module = nn.Flatten()
        elif len(in_shape) == 1:
            module = nn.Unflatten(1, target)
        else:
            module = nn.Sequential(nn.Flatten(), nn.Unflatten(1, target))
        self._add_layer(node, module, x)

    def _op_Gemm(self, node, at) -> None:
        x, (_, B, *C) = self._split(node)
        if B is None or self._name(node.input[0]) != x:
            raise self._err(node, "only Gemm(tensor, constant B, constant C) is supported")
        if at.get("transA", 0):
            raise self._err(node, "transA=1 is not supported")
        W = np.asarray(B, dtype=np.float64) * at.get("alpha", 1.0)
        W = W if at.get("transB", 0) else W.T  # (out, in)
        bias = None
        if C and C[0] is not None:
            bias = np.broadcast_to(np.asarray(C[0], dtype=np.float64) * at.get("beta", 1.0), (1, W.shape[0]))[0]
        self._linear(node, x, W, bias)

    def _op_MatMul(self, node, at) -> None:
        x, (a, b) = self._split(node)
        if b is None or self._name(node.input[0]) != x or np.ndim(b) != 2:
            raise self._err(node, "only MatMul(tensor, constant 2-d matrix) is supported")
        self._linear(node, x, np.asarray(b, dtype=np.float64).T, None)

    def _linear(self, node, x: str, W: np.ndarray, bias: np.ndarray | None) -> None:
        if len(self.shapes[x]) != 1 or self.shapes[x][0] != W.shape[1]:
            raise self._err(node, f"input of shape {self.shapes[x]} does not match a ({W.shape[1]} -> {W.shape[0]}) matrix")
        lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self._tensor(node, W))
            if bias is not None:
                lin.bias.copy_(self._tensor(node, bias))
        self._add_layer(node, lin, x)

    def _elementwise(self, node, x: str, scale: np.ndarray | None, shift: np.ndarray | None) -> None:
        shape = self.shapes[x]
        sc = None if scale is None else self._per_example(node, scale, shape)
        sh = None if shift is None else self._per_example(node, shift, shape)
        key = self.producer.get(x)
        prev = self.layers.get(key) if key else None
        # fold a constant bias into a preceding bias-free Linear (MatMul + Add)
        if sc is None and isinstance(prev, nn.Linear) and prev.bias is None and self._uses(x) == 1 and sh is not None:
            bias = torch.broadcast_to(sh, shape).clone()
            prev.bias = nn.Parameter(bias)
            self.alias[node.output[0]] = x
            return
        self._add_layer(node, ElementwiseAffine(sc, sh), x)

    def _binary(self, node, op: str) -> None:
        fns = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
        if self._fold(node, fns[op]):
            return
        names = [self._name(i) for i in node.input]
        tensors = [n for n in names if n not in self.consts]
        if len(tensors) == 2:
            return self._two_tensors(node, op, names)
        x, (a, b) = self._split(node)
        c, x_first = (b, True) if a is None else (a, False)
        if op == "Add":
            self._elementwise(node, x, None, c)
        elif op == "Sub":
            self._elementwise(node, x, None, -np.asarray(c)) if x_first else self._elementwise(node, x, -np.ones_like(c), c)
        elif op == "Mul":
            self._elementwise(node, x, c, None)
        elif not x_first:
            raise self._err(node, "division by a tensor is not supported (only by constants)")
        elif np.any(np.asarray(c) == 0):
            raise self._err(node, "division by a constant containing zero")
        else:
            self._elementwise(node, x, 1.0 / np.asarray(c, dtype=np.float64), None)

    def _two_tensors(self, node, op: str, names: list[str]) -> None:
        a, b = names
        if op not in ("Add", "Sub"):
            raise self._err(node, f"{op} of two tensors is not supported (not affine)")
        if self.shapes[a] != self.shapes[b]:
            raise self._err(node, f"{op} of tensors of different shapes {self.shapes[a]} and {self.shapes[b]} is not supported")
        if op == "Sub":
            neg, key = f"{node.output[0]}::neg", f"neg_{len(self.layers)}"
            self.layers[key] = ElementwiseAffine(torch.tensor(-1.0, dtype=self.dtype), None)
            self.plan.append((neg, key, (b,)))
            self.shapes[neg], b = self.shapes[b], neg
        self.plan.append((node.output[0], "+", (a, b)))
        self.shapes[node.output[0]] = self.shapes[a]

    def _op_Concat(self, node, at) -> None:
        axis = int(at.get("axis", 1))
        if self._fold(node, lambda *cs: np.concatenate(cs, axis=axis)):
            return
        names = [self._name(i) for i in node.input if i]
        for n in names:
            if n not in self.consts and n not in self.shapes:
                raise self._err(node, f"input {n!r} is not produced by any earlier node")
        if any(n in self.consts for n in names):
            raise self._err(node, "Concat of a tensor with a constant is not supported (tensors only)")
        shapes = [self.shapes[n] for n in names]
        nd = len(shapes[0]) + 1
        axis = axis + nd if axis < 0 else axis
        if not 0 < axis < nd:
            raise self._err(node, f"axis={at.get('axis', 1)} must be a per-example axis (not the batch axis)")
        rest = [tuple(sh[:axis - 1]) + tuple(sh[axis:]) for sh in shapes]
        if any(len(sh) != nd - 1 for sh in shapes) or len(set(rest)) != 1:
            raise self._err(node, f"inputs of shapes {shapes} differ off the concatenation axis {axis}")
        out = list(shapes[0])
        out[axis - 1] = sum(sh[axis - 1] for sh in shapes)
        self._check_size(node, tuple(out))
        self.plan.append((node.output[0], f"concat:{axis}", tuple(names)))
        self.shapes[node.output[0]] = tuple(out)

    def _op_Add(self, node, at) -> None:
        self._binary(node, "Add")

    def _op_Sub(self, node, at) -> None:
        self._binary(node, "Sub")

    def _op_Mul(self, node, at) -> None:
        self._binary(node, "Mul")

    def _op_Div(self, node, at) -> None:
        self._binary(node, "Div")

    def _op_BatchNormalization(self, node, at) -> None:
        x, (_, s, b, mean, var) = self._split(node)
        if at.get("training_mode", 0):
            raise self._err(node, "training_mode=1 is not supported")
        if len([o for o in node.output if o]) > 1:
            raise self._err(node, "running-statistics outputs are not supported")
        shape = self.shapes[x]
        view = (-1,) + (1,) * (len(shape) - 1)
        scale = np.asarray(s, np.float64) / np.sqrt(np.asarray(var, np.float64) + at.get("epsilon", 1e-5))
        shift = np.asarray(b, np.float64) - np.asarray(mean, np.float64) * scale
        self._elementwise(node, x, scale.reshape(view), shift.reshape(view))

    def _conv_pads(self, node, at, k: int) -> tuple[int, ...]:
        auto = at.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            raise self._err(node, f"auto_pad={auto} is not supported (give explicit pads)")
        pads = list(at.get("pads", [0] * (2 * k))) if auto == "NOTSET" else [0] * (2 * k)
        if len(pads) != 2 * k or pads[:k] != pads[k:]:
            raise self._err(node, f"only symmetric 2-d padding is supported, got pads={pads}")
        return tuple(int(p) for p in pads[:k])

    def _op_Conv(self, node, at) -> None:
        x, (_, W, *B) = self._split(node)
        if W is None or np.ndim(W) != 4 or self._name(node.input[0]) != x:
            raise self._err(node, "only 2-d Conv(tensor, constant weight, constant bias) is supported")
        if at.get("group", 1) != 1:
            raise self._err(node, f"group={at['group']} is not supported (group=1 only)")
        cout, cin, kh, kw = W.shape
        conv = nn.Conv2d(
            cin, cout, (kh, kw), stride=tuple(at.get("strides", (1, 1))), padding=self._conv_pads(node, at, 2),
            dilation=tuple(at.get("dilations", (1, 1))), bias=bool(B) and B[0] is not None, dtype=self.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self._tensor(node, W))
            if conv.bias is not None:
                conv.bias.copy_(self._tensor(node, B[0]))
        self._add_layer(node, conv, x)

    def _op_Transpose(self, node, at) -> None:
        if self._fold(node, lambda a: np.transpose(a, at.get("perm"))):
            return
        x, _ = self._split(node)
        nd = len(self.shapes[x]) + 1
        perm = [int(p) for p in at.get("perm", list(range(nd))[::-1])]
        if sorted(perm) != list(range(nd)) or perm[0] != 0:
            raise self._err(node, f"perm={perm} must keep the batch dimension first (only per-example permutations)")
        dims = tuple(p - 1 for p in perm[1:])
        if dims == tuple(range(nd - 1)):
            self.alias[node.output[0]] = x
            return
        self._add_layer(node, Permute(dims), x)

    def _op_Pad(self, node, at) -> None:
        names = [self._name(i) for i in node.input]
        mode = at.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            raise self._err(node, f"mode={mode} is not supported (constant zero padding only)")
        if len(names) > 1 and names[1]:
            if names[1] not in self.consts:
                raise self._err(node, "the pads must be a constant")
            pads = [int(v) for v in np.asarray(self.consts[names[1]]).flatten()]
        else:
            pads = [int(v) for v in at.get("pads", [])]
        value = 0.0
        if len(names) > 2 and names[2]:
            if names[2] not in self.consts:
                raise self._err(node, "the constant value must be a constant")
            value = float(np.asarray(self.consts[names[2]]).flatten()[0])
        value = float(at.get("value", value))
        if len(names) > 3 and names[3]:
            raise self._err(node, "Pad with axes is not supported")
        x = names[0]
        if x in self.consts:
            raise self._err(node, "padding a constant is not supported")
        nd = len(self.shapes[x]) + 1
        if nd != 4 or len(pads) != 8:
            raise self._err(node, f"only 2-d padding of (N, C, H, W) tensors is supported, got pads={pads}")
        if value != 0.0:
            raise self._err(node, f"constant value {value} is not supported (zero padding only)")
        if any(p < 0 for p in pads) or pads[0] or pads[1] or pads[4] or pads[5]:
            raise self._err(node, f"only non-negative padding of H and W is supported, got pads={pads}")
        self._add_layer(node, nn.ZeroPad2d((pads[3], pads[7], pads[2], pads[6])), x)

    def _op_AveragePool(self, node, at) -> None:
        x, _ = self._split(node)
        k = tuple(at.get("kernel_shape", ()))
        if len(k) != 2:
            raise self._err(node, f"only 2-d AveragePool is supported, got kernel_shape={list(k)}")
        if tuple(at.get("dilations", (1, 1))) != (1, 1):
            raise self._err(node, "dilated AveragePool is not supported")
        pool = nn.AvgPool2d(
            k, stride=tuple(at.get("strides", (1, 1))), padding=self._conv_pads(node, at, 2),
            ceil_mode=bool(at.get("ceil_mode", 0)), count_include_pad=bool(at.get("count_include_pad", 0)),
        )
        self._add_layer(node, pool, x)

    def _op_MaxPool(self, node, at) -> None:
        x, _ = self._split(node)
        k = tuple(at.get("kernel_shape", ()))
        if len(k) != 2:
            raise self._err(node, f"only 2-d MaxPool is supported, got kernel_shape={list(k)}")
        if len(node.output) > 1 and node.output[1] and self.uses[node.output[1]]:
            raise self._err(node, "the MaxPool indices output is used; only the values are supported")
        if tuple(at.get("dilations", (1, 1))) != (1, 1) or at.get("ceil_mode", 0):
            raise self._err(node, "MaxPool bounds support dilations 1 and ceil_mode 0 only")
        pads = self._conv_pads(node, at, 2)
        if pads[0] > k[0] // 2 or pads[1] > k[1] // 2:
            raise self._err(node, f"MaxPool pads {list(pads)} must be at most half the kernel {list(k)}")
        self._add_layer(node, nn.MaxPool2d(k, stride=tuple(at.get("strides", (1, 1))), padding=pads), x)


# --- export ----------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | Path | None,
    input_shape: tuple[int, ...],
    *,
    opset: int = 13,
    input_name: str = "input",
    output_name: str = "output",
) -> bytes:
    """Export ``model`` (input (B, *input_shape)) to ONNX with a dynamic batch dimension.

    Uses the TorchScript exporter (``dynamo=False``, no extra packages), constant folding on,
    the model in eval mode (restored afterwards), float32. Writes ``path`` if given and returns
    the serialized bytes.
    """
    if not isinstance(model, nn.Module):
        raise CertorchError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise CertorchError(f"input_shape must be a non-empty tuple of positive sizes, got {input_shape!r}")
    if not 9 <= opset <= 20:
        raise CertorchError(f"opset must be between 9 and 20, got {opset}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dummy = torch.zeros(1, *shape, device=device)
    buf = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (dummy,), buf, dynamo=False, opset_version=opset,
                input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            )
    except Exception as e:  # noqa: BLE001
        raise CertorchError(f"ONNX export of {type(model).__name__} failed: {_first_line(e)}") from None
    finally:
        model.train(was_training)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data
