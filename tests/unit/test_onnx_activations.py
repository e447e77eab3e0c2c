"""ONNX Sigmoid, Tanh and LeakyRelu (issue 10): imported networks equal onnxruntime, and the
backward bound methods are sound on them (sampled points stay inside the bounds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import certorch as ct
from certorch.verify.onnx_io import import_onnx
from tests.soundness.bound_checks import assert_within, sample_box

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ACTS = [("Sigmoid", {}), ("Tanh", {}), ("LeakyRelu", {"alpha": 0.2}), ("LeakyRelu", {})]


def _net(op: str, attrs: dict):
    """x (N, 6) -> Gemm -> act -> Gemm -> act -> Gemm -> y (N, 3)."""
    rng = np.random.default_rng(0)
    inits = {"W1": rng.normal(size=(8, 6)).astype(np.float32) * 2, "b1": rng.normal(size=8).astype(np.float32),
             "W2": rng.normal(size=(5, 8)).astype(np.float32), "b2": rng.normal(size=5).astype(np.float32),
             "W3": rng.normal(size=(3, 5)).astype(np.float32), "b3": rng.normal(size=3).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], transB=1),
             helper.make_node(op, ["h1"], ["a1"], **attrs),
             helper.make_node("Gemm", ["a1", "W2", "b2"], ["h2"], transB=1),
             helper.make_node(op, ["h2"], ["a2"], **attrs),
             helper.make_node("Gemm", ["a2", "W3", "b3"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("op,attrs", ACTS)
def test_activation_equals_onnxruntime(op, attrs):
    m = _net(op, attrs)
    x = (np.random.default_rng(1).random((5, 6)) * 4 - 2).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = import_onnx(m).module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "alpha-crown"])
@pytest.mark.parametrize("op,attrs", ACTS)
def test_bounds_through_the_activation_contain_samples(op, attrs, method):
    net = import_onnx(_net(op, attrs)).module.double().eval()
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = ct.bound(net, x, 0.2, method=method)
    pts = sample_box(ct.linf_ball(x, 0.2), 2000, torch.Generator().manual_seed(3))
    with torch.no_grad():
        vals = net(pts.reshape(-1, 6)).reshape(pts.shape[0], 3, 1, 3)
    C = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    assert_within(torch.einsum("bsk,nbk->nbs", C, vals.squeeze(2)), r.lower.detach(), r.upper.detach())


def _pool_net(strides=(2, 2), pads=(0, 0, 0, 0), ceil_mode=0):
    """x (N, 1, 6, 6) -> Conv 3x3 pad 1 -> Relu -> MaxPool 2x2 -> Flatten -> Gemm -> y (N, 3)."""
    rng = np.random.default_rng(0)
    Ho = (6 + pads[0] + pads[2] - 2) // strides[0] + 1
    Wo = (6 + pads[1] + pads[3] - 2) // strides[1] + 1
    inits = {"Wc": rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "bc": rng.normal(size=2).astype(np.float32),
             "Wg": rng.normal(size=(3, 2 * Ho * Wo)).astype(np.float32), "bg": rng.normal(size=3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=list(strides), pads=list(pads),
                              ceil_mode=ceil_mode),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "Wg", "bg"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("strides, pads", [((2, 2), (0, 0, 0, 0)), ((1, 1), (0, 0, 0, 0)), ((2, 2), (1, 1, 1, 1)),
                                           ((1, 1), (1, 0, 1, 0))])
def test_maxpool_equals_onnxruntime_and_its_bounds_contain_samples(strides, pads):
    m = _pool_net(strides, pads)
    x = np.random.default_rng(1).random((4, 1, 6, 6)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    net = import_onnx(m).module
    np.testing.assert_allclose(net(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-5, atol=1e-5)
    net = net.double().eval()
    xt = torch.from_numpy(x[:2]).double()
    r = ct.bound(net, xt, 0.05, method="crown")
    pts = sample_box(ct.linf_ball(xt, 0.05), 2000, torch.Generator().manual_seed(3))
    with torch.no_grad():
        vals = net(pts.reshape(-1, 1, 6, 6)).reshape(pts.shape[0], 2, 3)
    assert_within(vals, r.lower.detach(), r.upper.detach())


def test_maxpool_with_ceil_mode_is_a_one_line_import_error():
    from certorch.errors import CertorchError

    with pytest.raises(CertorchError, match="MaxPool"):
        import_onnx(_pool_net(ceil_mode=1))
