"""ONNX import checked against onnxruntime: aliases around bias folding, DOUBLE precision, mixed dtypes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from certorch.errors import CertorchError
from certorch.verify.onnx_io import import_onnx, load_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(nodes, inits, n_in, n_out, elem=TensorProto.FLOAT, out_elem=None, opset=13):
    """A ModelProto with input 'x' (N, n_in) and output 'y' (N, n_out); inits keep their numpy dtype."""
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", elem, ["N", n_in])],
        [helper.make_tensor_value_info("y", out_elem or elem, ["N", n_out])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _alias_graph(alias: str):
    """MatMul -> alias -> {Add(const) , Relu}, both branches summed: the bias must not leak into Relu's input."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(size=(3, 3)).astype(np.float32), "b": (rng.normal(size=3) + 2).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"])]
    if alias == "Reshape":
        inits["shape"] = np.array([-1, 3], np.int64)
        nodes.append(helper.make_node("Reshape", ["h", "shape"], ["h2"]))
    else:
        nodes.append(helper.make_node(alias, ["h"], ["h2"]))
    nodes += [
        helper.make_node("Add", ["h2", "b"], ["a"]),
        helper.make_node("Relu", ["h2"], ["r"]),
        helper.make_node("Add", ["a", "r"], ["y"]),
    ]
    return _model(nodes, inits, 3, 3)


@pytest.mark.parametrize("alias", ["Identity", "Dropout", "Reshape"])
def test_bias_not_folded_into_layer_read_through_alias(alias):
    m = _alias_graph(alias)
    x = np.random.default_rng(1).random((4, 3)).astype(np.float32)
    got = import_onnx(m).module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, _ort(m, x), atol=1e-5)


def test_bias_not_folded_when_other_consumer_reads_raw_name_before_alias():
    """Relu reads 'h' directly, Add reads it through Identity: two consumers of one value."""
    rng = np.random.default_rng(2)
    inits = {"W": rng.normal(size=(3, 3)).astype(np.float32), "b": np.full(3, 5.0, np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Identity", ["h"], ["h2"]),
        helper.make_node("Add", ["h2", "b"], ["a"]),
        helper.make_node("Sub", ["a", "r"], ["y"]),
    ]
    m = _model(nodes, inits, 3, 3)
    x = rng.random((4, 3)).astype(np.float32)
    np.testing.assert_allclose(import_onnx(m).module(torch.from_numpy(x)).detach().numpy(), _ort(m, x), atol=1e-5)


def test_bias_still_folded_through_single_use_alias():
    """MatMul -> Identity -> Add(const) with no other reader folds into one biased Linear."""
    rng = np.random.default_rng(3)
    inits = {"W": rng.normal(size=(3, 2)).astype(np.float32), "b": np.array([1.0, -2.0], np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Identity", ["h"], ["h2"]),
             helper.make_node("Add", ["h2", "b"], ["y"])]
    m = _model(nodes, inits, 3, 2)
    net = import_onnx(m)
    lins = [mod for mod in net.module.modules() if isinstance(mod, nn.Linear)]
    assert len(lins) == 1 and lins[0].bias is not None
    x = rng.random((4, 3)).astype(np.float32)
    np.testing.assert_allclose(net.module(torch.from_numpy(x)).detach().numpy(), _ort(m, x), atol=1e-5)


def _double_net(rng):
    inits = {
        "A": rng.normal(size=(4, 5)), "a": rng.normal(size=5) * 1e-9 + 1.0 / 3.0,
        "B": rng.normal(size=(5, 2)), "mean": np.array([0.1 + 1e-12, 0.2, 0.3, 0.4]), "std": np.array([0.3]),
    }
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["s"]),
        helper.make_node("Div", ["s", "std"], ["n"]),
        helper.make_node("MatMul", ["n", "A"], ["h"]),
        helper.make_node("Add", ["h", "a"], ["ha"]),
        helper.make_node("Relu", ["ha"], ["r"]),
        helper.make_node("Gemm", ["r", "B"], ["y"]),
    ]
    return _model(nodes, inits, 4, 2, elem=TensorProto.DOUBLE)


def test_double_network_is_imported_in_float64():
    rng = np.random.default_rng(4)
    m = _double_net(rng)
    net = import_onnx(m)
    assert net.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in net.module.parameters())
    assert all(b.dtype == torch.float64 for b in net.module.buffers())
    x = rng.random((6, 4))
    got = net.module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, _ort(m, x), rtol=0, atol=1e-12)


def test_double_network_sign_not_changed_by_rounding(tmp_path):
    """y = x - (0.5 + 1e-12) at x = 0.5 is -1e-12 < 0 in DOUBLE; rounding the constant to float32 gives 0."""
    m = _model([helper.make_node("Sub", ["x", "c"], ["y"])], {"c": np.array([0.5 + 1e-12])}, 1, 1, elem=TensorProto.DOUBLE)
    path = tmp_path / "d.onnx"
    path.write_bytes(m.SerializeToString())
    x = np.array([[0.5]])
    y = load_onnx(path).module(torch.from_numpy(x)).detach().numpy()
    assert y.dtype == np.float64 and y[0, 0] < 0 and y[0, 0] == _ort(m, x)[0, 0]


def test_float_network_stays_float32():
    net = import_onnx(_alias_graph("Identity"))
    assert net.dtype == torch.float32 and all(p.dtype == torch.float32 for p in net.module.parameters())


def test_mixed_precision_weights_refused():
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": np.ones((2, 2), np.float32)}, 2, 2,
               elem=TensorProto.DOUBLE)
    with pytest.raises(CertorchError, match="mixed precision") as e:
        import_onnx(m)
    assert "\n" not in str(e.value)


def test_mixed_precision_output_refused():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], {}, 2, 2, elem=TensorProto.FLOAT, out_elem=TensorProto.DOUBLE)
    with pytest.raises(CertorchError, match="mixed precision"):
        import_onnx(m)


def test_float16_network_refused():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], {}, 2, 2, elem=TensorProto.FLOAT16)
    with pytest.raises(CertorchError, match="FLOAT16"):
        import_onnx(m)


def test_integer_operand_of_add_refused():
    m = _model([helper.make_node("Add", ["x", "k"], ["y"])], {"k": np.array([1, 2], np.int64)}, 2, 2)
    with pytest.raises(CertorchError, match="int64"):
        import_onnx(m)
