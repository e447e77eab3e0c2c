"""ONNX import/export: round trips of zoo models, each supported op on hand-built graphs, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import certorch as ct
from certorch.errors import CertorchError, UnsupportedOperationError
from certorch.graph import capture
from certorch.models.registry import build
from certorch.ops.onnx_ops import ElementwiseAffine
from certorch.verify.onnx_io import SUPPORTED_OPS, export_onnx, import_onnx, load_onnx

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(nodes, inits, in_shape, out_shape, opset=13):
    """A ModelProto with one float input 'x' (batch 1) and output 'y'."""
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *in_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, *out_shape])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else np.int64), k)
         for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _run_ort_free(model_proto, x: np.ndarray) -> np.ndarray:
    """Reference evaluation with onnx's own reference evaluator (no onnxruntime needed)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model_proto).run(None, {"x": x.astype(np.float32)})[0]


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_zoo_round_trip_outputs_equal(name):
    torch.manual_seed(0)
    model = build(name, "digits").eval()
    net = load_onnx(export_onnx(model, None, (1, 8, 8)))
    x = torch.rand(6, 1, 8, 8)
    assert net.input_shape == (1, 8, 8) and net.output_shape == (10,)
    assert torch.allclose(net.module(x), model(x), atol=1e-5)


def test_round_trip_file_and_bounds_equal(tmp_path):
    torch.manual_seed(1)
    model = build("digits_cnn", "digits").eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (1, 8, 8))
    net = load_onnx(path)
    x = torch.rand(3, 1, 8, 8)
    a = ct.bound(net.module, x, eps=0.02, method="crown", dtype=torch.float64)
    b = ct.bound(model, x, eps=0.02, method="crown", dtype=torch.float64)
    assert torch.allclose(a.lower, b.lower, atol=1e-5) and torch.allclose(a.upper, b.upper, atol=1e-5)


def test_export_rejects_bad_shape():
    with pytest.raises(CertorchError, match="input_shape"):
        export_onnx(nn.Linear(2, 2), None, (0,))


def test_matmul_add_folds_into_linear_bias():
    W = np.random.default_rng(0).normal(size=(4, 3))
    b = np.arange(3.0)
    m = _model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
               {"W": W, "b": b}, (4,), (3,))
    net = import_onnx(m)
    lins = [l for l in net.module.modules() if isinstance(l, nn.Linear)]
    assert len(lins) == 1 and lins[0].bias is not None
    x = np.random.default_rng(1).random((2, 4))
    assert np.allclose(net.module(torch.tensor(x, dtype=torch.float32)).detach().numpy(), _run_ort_free(m, x), atol=1e-5)


def test_gemm_attributes_and_normalization_ops():
    rng = np.random.default_rng(2)
    B = rng.normal(size=(3, 4))  # transB=1: (out, in)
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"]),
        helper.make_node("Div", ["a", "std"], ["n"]),
        helper.make_node("Mul", ["n", "two"], ["m"]),
        helper.make_node("Gemm", ["m", "B", "C"], ["y"], alpha=0.5, beta=2.0, transB=1),
    ]
    m = _model(nodes, {"mean": [0.1, 0.2, 0.3, 0.4], "std": [0.5], "two": [2.0], "B": B, "C": [1.0, -1.0, 0.5]}, (4,), (3,))
    net = import_onnx(m)
    x = rng.random((5, 4))
    got = net.module(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    assert np.allclose(got, _run_ort_free(m, x), atol=1e-5)


def test_conv_batchnorm_avgpool_reshape_relu():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "W", "Wb"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([-1, 8], np.int64))),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Dropout", ["f"], ["d"]),
        helper.make_node("Identity", ["d"], ["y"]),
    ]
    inits = {"W": rng.normal(size=(2, 1, 3, 3)), "Wb": [0.1, -0.2], "s": [1.5, 0.5], "bb": [0.0, 0.3],
             "mu": [0.2, -0.1], "var": [2.0, 0.5]}
    m = _model(nodes, inits, (1, 4, 4), (8,), opset=15)
    net = import_onnx(m)
    x = rng.random((3, 1, 4, 4))
    got = net.module(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    assert np.allclose(got, _run_ort_free(m, x), atol=1e-5)
    g = capture(net.module, (1, 4, 4))  # the bound engine supports the imported module
    assert {n.op.kind for n in g.nodes} >= {"conv2d", "elementwise_affine", "relu", "avgpool2d", "reshape"}


def test_residual_add_of_two_tensors_bounds_sound():
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Gemm", ["x", "A", "a"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "B", "b"], ["h2"], transB=1),
        helper.make_node("Add", ["h2", "h"], ["s"]),
        helper.make_node("Sub", ["s", "r"], ["y"]),
    ]
    inits = {"A": rng.normal(size=(3, 3)), "a": rng.normal(size=3), "B": rng.normal(size=(3, 3)), "b": rng.normal(size=3)}
    m = _model(nodes, inits, (3,), (3,))
    net = import_onnx(m)
    x = rng.random((4, 3))
    xt = torch.tensor(x, dtype=torch.float32)
    assert np.allclose(net.module(xt).detach().numpy(), _run_ort_free(m, x), atol=1e-5)
    res = ct.bound(net.module, xt, eps=0.1, method="crown", dtype=torch.float64)
    pts = (xt.unsqueeze(1) + 0.1 * (2 * torch.rand(4, 200, 3) - 1)).clamp(0, 1).reshape(-1, 3)
    out = net.module(pts).reshape(4, 200, 3).double()
    assert bool((out >= res.lower.unsqueeze(1) - 1e-5).all() and (out <= res.upper.unsqueeze(1) + 1e-5).all())


def test_elementwise_affine_module_bounds_exact():
    mod = nn.Sequential(ElementwiseAffine(torch.tensor([[2.0, -1.0]]).reshape(2), torch.tensor([0.5, 0.0])))
    x = torch.tensor([[0.5, 0.5]])
    r = ct.bound(mod, x, eps=0.1, method="ibp")
    assert torch.allclose(r.lower, torch.tensor([[1.3, -0.6]])) and torch.allclose(r.upper, torch.tensor([[1.7, -0.4]]))


def test_unsupported_ops_listed_in_one_error():
    nodes = [
        helper.make_node("Softplus", ["x"], ["a"]),
        helper.make_node("LpPool", ["a"], ["b"], kernel_shape=[1, 1]),
        helper.make_node("Softplus", ["b"], ["y"]),
    ]
    m = _model(nodes, {}, (1, 2, 2), (1, 2, 2))
    with pytest.raises(UnsupportedOperationError) as e:
        import_onnx(m)
    msg = str(e.value)
    assert "LpPool" in msg and "Softplus (x2)" in msg and "\n" not in msg


def test_mul_of_two_tensors_is_rejected():
    m = _model([helper.make_node("Mul", ["x", "x"], ["y"])], {}, (2,), (2,))
    with pytest.raises(CertorchError, match="Mul of two tensors"):
        import_onnx(m)


def test_asymmetric_padding_is_rejected():
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], pads=[0, 0, 1, 1])]
    m = _model(nodes, {"W": np.ones((1, 1, 2, 2))}, (1, 3, 3), (1, 3, 3))
    with pytest.raises(CertorchError, match="symmetric"):
        import_onnx(m)


def test_malformed_bytes_and_missing_file(tmp_path):
    with pytest.raises(CertorchError, match="malformed ONNX"):
        load_onnx(b"this is not a protobuf \x00\x01\x02")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(CertorchError, match="malformed ONNX"):
        load_onnx(bad)
    with pytest.raises(CertorchError, match="not found"):
        load_onnx(tmp_path / "nope.onnx")


def test_dangling_input_is_a_clear_error():
    m = _model([helper.make_node("Relu", ["missing"], ["y"])], {}, (2,), (2,))
    with pytest.raises(CertorchError, match="malformed ONNX"):
        import_onnx(m)


def test_supported_op_set_matches_spec():
    assert {"Gemm", "MatMul", "Conv", "Relu", "Flatten", "Reshape", "Add", "Sub", "Div", "Mul",
            "BatchNormalization", "AveragePool", "Identity", "Constant", "Dropout", "Transpose", "Pad",
            "Sigmoid", "Tanh", "LeakyRelu", "MaxPool", "Concat"} == set(SUPPORTED_OPS)


def test_docs_examples_run():
    """The python blocks of docs/onnx_vnnlib.md run as written (docs must not drift)."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "onnx_vnnlib.md"
    if not doc.is_file():
        pytest.skip("docs not present")
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})
