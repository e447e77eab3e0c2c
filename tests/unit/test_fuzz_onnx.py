"""Fuzzing the ONNX importer with mutations of valid models: only one-line CertorchErrors, and a
model that imports runs on a zero input with the shapes it reports.

Mutations: bytes of the serialized model (flips, set bytes, truncations, insertions, deletions),
and edits of the protobuf (initializer dims / element types / values, attribute values, node op
types and input names, graph input dims and element type), re-serialized.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certorch.errors import CertorchError
from certorch.verify.onnx_io import SUPPORTED_OPS, load_onnx

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = settings(
    max_examples=int(os.environ.get("CERTORCH_FUZZ_EXAMPLES", "100")), deadline=None,
    derandomize=not os.environ.get("CERTORCH_FUZZ_RANDOM"), database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _base_model(elem=TensorProto.FLOAT) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> AvgPool -> Reshape -> MatMul + Add -> Identity -> Sub/Div -> Gemm."""
    rng = np.random.default_rng(0)
    f = np.float32 if elem == TensorProto.FLOAT else np.float64
    inits = {
        "W": rng.normal(size=(2, 1, 3, 3)), "Wb": [0.1, -0.2], "s": [1.5, 0.5], "bb": [0.0, 0.3],
        "mu": [0.2, -0.1], "var": [2.0, 0.5], "M": rng.normal(size=(8, 5)), "mb": rng.normal(size=5),
        "c": [0.5], "d": [2.0], "G": rng.normal(size=(3, 5)), "g": rng.normal(size=3),
    }
    tensors = [numpy_helper.from_array(np.asarray(v, dtype=f), k) for k, v in inits.items()]
    tensors.append(numpy_helper.from_array(np.array([-1, 8], np.int64), "shape"))
    nodes = [
        helper.make_node("Conv", ["x", "W", "Wb"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "mu", "var"], ["b1"], epsilon=1e-3),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("AveragePool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p1", "shape"], ["f1"]),
        helper.make_node("MatMul", ["f1", "M"], ["m1"]),
        helper.make_node("Add", ["m1", "mb"], ["a1"]),
        helper.make_node("Identity", ["a1"], ["i1"]),
        helper.make_node("Sub", ["i1", "c"], ["s1"]),
        helper.make_node("Div", ["s1", "d"], ["d1"]),
        helper.make_node("Gemm", ["d1", "G", "g"], ["y"], transB=1, alpha=0.5),
    ]
    g = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", elem, ["N", 1, 4, 4])],
                          [helper.make_tensor_value_info("y", elem, ["N", 3])], tensors)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@st.composite
def mutated_bytes(draw, base: bytes, header: int = 64) -> bytes:
    """Byte flips, set bytes, truncations, insertions, deletions (as in test_fuzz_parsers)."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.one_of(st.integers(0, min(header, len(data)) - 1), st.integers(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        else:
            del data[pos : pos + draw(st.integers(1, 9))]
    return bytes(data)


BASE = _base_model()
BASE_BYTES = BASE.SerializeToString()


def import_and_run(data: bytes) -> None:
    """Import; where that works the module must run on zeros with the reported shapes."""
    try:
        net = load_onnx(data)
    except CertorchError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        return
    assert math.prod(net.input_shape) <= 1 << 24
    with torch.no_grad():
        y = net.module(torch.zeros(2, *net.input_shape, dtype=net.dtype))
    assert tuple(y.shape) == (2, *net.output_shape) and y.dtype == net.dtype


def test_base_model_imports():
    import_and_run(BASE_BYTES)
    assert load_onnx(BASE_BYTES).output_shape == (3,)


@FUZZ
@given(data=st.data())
def test_fuzz_onnx_bytes(data):
    import_and_run(data.draw(mutated_bytes(BASE_BYTES, header=len(BASE_BYTES) // 2)))


ODD_INTS = [0, 1, 2, 3, -1, 7, 2**31 - 1, 2**40, -(2**40)]
ODD_FLOATS = [0.0, -1.0, 1e-45, 1e38, 3e38, float("inf"), float("nan")]


@st.composite
def mutated_model(draw) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(draw(st.sampled_from([BASE, _DOUBLE])))
    g = m.graph
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["init_dims", "init_type", "init_value", "attr", "op", "input", "in_dims", "in_type"]))
        if kind.startswith("init"):
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            if kind == "init_dims":
                dims = draw(st.lists(st.sampled_from(ODD_INTS[:6] + [2**31 - 1]), max_size=4))
                del t.dims[:]
                t.dims.extend(dims)
            elif kind == "init_type":
                t.data_type = draw(st.sampled_from([1, 2, 6, 7, 10, 11, 16, 0, 99]))
            else:
                try:
                    arr = numpy_helper.to_array(t).copy()
                except Exception:  # noqa: BLE001  (dims mutated earlier: nothing to edit)
                    continue
                if arr.size and arr.dtype.kind == "f":
                    arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from(ODD_FLOATS))
                elif arr.size:
                    arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from(ODD_INTS[:7]))
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
        elif kind in ("attr", "op", "input"):
            node = g.node[draw(st.integers(0, len(g.node) - 1))]
            if kind == "op":
                node.op_type = draw(st.sampled_from(sorted(SUPPORTED_OPS)))
            elif kind == "input" and len(node.input):
                names = [i for n in g.node for i in n.output] + [t.name for t in g.initializer] + ["x", "", "nope"]
                node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
            elif len(node.attribute):
                a = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
                if a.type == onnx.AttributeProto.INTS:
                    a.ints[draw(st.integers(0, len(a.ints) - 1))] = draw(st.sampled_from(ODD_INTS))
                elif a.type == onnx.AttributeProto.INT:
                    a.i = draw(st.sampled_from(ODD_INTS))
                elif a.type == onnx.AttributeProto.FLOAT:
                    a.f = draw(st.sampled_from(ODD_FLOATS))
        elif kind == "in_dims":
            d = g.input[0].type.tensor_type.shape.dim[draw(st.integers(1, 3))]
            d.dim_value = draw(st.sampled_from([1, 2, 3, 5, 64, 2**20, 2**40]))
        else:
            g.input[0].type.tensor_type.elem_type = draw(st.sampled_from([1, 10, 11, 6]))
    return m.SerializeToString()


_DOUBLE = _base_model(TensorProto.DOUBLE)


@FUZZ
@given(data=mutated_model())
def test_fuzz_onnx_structure(data):
    import_and_run(data)
