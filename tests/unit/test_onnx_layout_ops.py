"""ONNX Transpose (NHWC inputs) and zero Pad (issue 10): imported networks equal onnxruntime, and
every bound method is sound on them (sampled points stay inside the bounds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import certorch as ct
from certorch.errors import CertorchError
from certorch.verify.onnx_io import import_onnx
from tests.soundness.bound_checks import assert_within, sample_box

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _nhwc_net(pads=(0, 0, 1, 2, 0, 0, 2, 1), pad_value=None, pad_mode=None, perm=(0, 3, 1, 2), opset=13):
    """x (N, 6, 5, 2) NHWC -> Transpose -> Pad -> Conv 3x3 -> Relu -> Transpose back -> Flatten -> Gemm -> y (N, 3)."""
    rng = np.random.default_rng(0)
    H, W = 6 + pads[2] + pads[6] - 2, 5 + pads[3] + pads[7] - 2
    inits = {"Wc": rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "bc": rng.normal(size=4).astype(np.float32),
             "pads": np.array(pads, np.int64), "Wg": rng.normal(size=(3, 4 * H * W)).astype(np.float32),
             "bg": rng.normal(size=3).astype(np.float32)}
    pad_inputs = ["t", "pads"]
    if pad_value is not None:
        inits["pv"] = np.array(pad_value, np.float32)
        pad_inputs.append("pv")
    pad_attrs = {} if pad_mode is None else {"mode": pad_mode}
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=list(perm)),
        helper.make_node("Pad", pad_inputs, ["p"], **pad_attrs),
        helper.make_node("Conv", ["p", "Wc", "bc"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["rt"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg", "bg"], ["y"], transB=1),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 5, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _assert_equals_onnxruntime(m, in_shape) -> None:
    x = np.random.default_rng(1).random((4, *in_shape)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = import_onnx(m).module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _assert_bounds_contain_samples(m, in_shape, method: str) -> None:
    net = import_onnx(m).module.double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, *in_shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        b = ct.bound(net, x, 0.05, method=method)
    pts = sample_box(ct.linf_ball(x, 0.05), 2000, g)
    with torch.no_grad():
        vals = net(pts.flatten(0, 1)).view(pts.shape[0], 2, -1)
    assert_within(vals, b.lower, b.upper)


METHODS = ["ibp", "crown", "crown-ibp", "zonotope", "symbolic", "dual", "alpha-crown"]


def test_nhwc_transpose_and_zero_pad_equal_onnxruntime():
    _assert_equals_onnxruntime(_nhwc_net(), (6, 5, 2))


@pytest.mark.parametrize("method", METHODS)
def test_bounds_through_transpose_and_pad_contain_samples(method):
    _assert_bounds_contain_samples(_nhwc_net(), (6, 5, 2), method)


@pytest.mark.parametrize("eps", [0.005, 0.2])
def test_milp_verdict_through_transpose_and_pad_agrees_with_samples(eps):
    from certorch.domains.box import Box
    from certorch.verify import verify_box
    from certorch.verify.results import Verdict

    net = import_onnx(_nhwc_net()).module.double().eval()
    x = torch.rand(6, 5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    box = Box((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    with torch.no_grad():
        logits = net(x[None])[0]
    i, j = int(logits.argmax()), int(logits.argmin())
    c = torch.zeros(1, 3, dtype=torch.float64)
    c[0, i], c[0, j] = 1.0, -1.0  # property: logit i - logit j > 0 on the box
    r = verify_box(net, box, [(c, torch.tensor([0.0], dtype=torch.float64))], stages="milp", timeout=60)
    pts = sample_box(Box(box.lower[None], box.upper[None]), 4000, torch.Generator().manual_seed(4))[:, 0]
    with torch.no_grad():
        sampled_min = float((net(pts) @ c.T).min())
    assert r.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED)
    if r.verdict == Verdict.VERIFIED:
        assert sampled_min > 0
    else:
        assert bool(box.contains(r.counterexample).all())
        with torch.no_grad():
            assert float(net(r.counterexample[None]) @ c.T) <= 0


@pytest.mark.parametrize("kwargs,match", [
    ({"perm": (3, 0, 1, 2)}, "batch dimension first"),
    ({"pad_value": 1.5}, "zero padding only"),
    ({"pad_mode": "reflect"}, "reflect"),
    ({"pads": (0, 1, 0, 0, 0, 0, 0, 0)}, "H and W"),
])
def test_unsupported_transpose_and_pad_variants_are_one_line_errors(kwargs, match):
    with pytest.raises(CertorchError, match=match):
        import_onnx(_nhwc_net(**kwargs))


# --- Concat: two branches joined along channels ------------------------------------------------

def _concat_net(axis=1):
    """x (N, 1, 6, 6) -> Conv a (2 ch) | Conv b (3 ch) -> Concat(axis) -> Relu -> Flatten -> Gemm -> y (N, 3)."""
    rng = np.random.default_rng(5)
    inits = {"Wa": rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "ba": rng.normal(size=2).astype(np.float32),
             "Wb": rng.normal(size=(3, 1, 3, 3)).astype(np.float32), "bb": rng.normal(size=3).astype(np.float32),
             "Wg": rng.normal(size=(3, 5 * 4 * 4)).astype(np.float32), "bg": rng.normal(size=3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "Wa", "ba"], ["a"], kernel_shape=[3, 3]),
             helper.make_node("Conv", ["x", "Wb", "bb"], ["b"], kernel_shape=[3, 3]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=axis),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "Wg", "bg"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("axis", [1, -3])
def test_concat_equals_onnxruntime(axis):
    _assert_equals_onnxruntime(_concat_net(axis), (1, 6, 6))


@pytest.mark.parametrize("method", METHODS)
def test_bounds_through_concat_contain_samples(method):
    _assert_bounds_contain_samples(_concat_net(), (1, 6, 6), method)


def test_milp_and_bab_through_concat_agree():
    from certorch.verify import certify_batch

    net = import_onnx(_concat_net()).module.double().eval()
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    milp = certify_batch(net, x, y, 0.03, stages="milp", timeout=60)
    bab = certify_batch(net, x, y, 0.03, stages="bab", timeout=60)
    assert [r.verdict for r in milp] == [r.verdict for r in bab]


def test_concat_along_the_batch_axis_is_a_one_line_error():
    with pytest.raises(CertorchError, match="per-example axis"):
        import_onnx(_concat_net(axis=0))
