"""Model zoo: registry behaviour, parameter counts against the papers, forward, fx tracing."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from certorch.data.registry import dataset_info
from certorch.errors import CertorchError
from certorch.models import build, count_params, list_models, model_info, register_model
from certorch.nn import Normalize

# (name, dataset) -> expected number of trainable parameters (weights + biases), unless
# the name is in WEIGHTS_ONLY (papers that count weights only).
EXPECTED = {
    # Wong, Schmidt, Metzen, Kolter 2018 (figures from the paper / convex_adversarial)
    ("mnist_small", "mnist"): 166_406,
    ("mnist_large", "mnist"): 1_974_762,
    ("cifar_small", "cifar10"): 214_918,
    ("cifar_large", "cifar10"): 2_466_858,
    ("cifar_resnet", "cifar10"): 4_214_850,
    # COLT: conv 1*32*25+32, 32*64*16+64, FC 64*7*7*100+100, 100*10+10
    ("colt_mnist", "mnist"): 348_374,
    # COLT: 896 + 16,416 + 65,664 + (128*8*8*250+250) + 2,510
    ("colt_cifar", "cifar10"): 2_133_736,
    # Gowal et al. DM nets (hand-computed from the layer list, VALID / SAME paddings)
    ("dm_small", "mnist"): 329_606,  # 272 + 8,224 + 32*10*10*100+100 + 1,010
    ("dm_small", "cifar10"): 470_918,  # 784 + 8,224 + 32*12*12*100+100 + 1,010
    ("dm_medium", "mnist"): 893_418,  # spatial 28-26-12-10-4
    ("dm_medium", "cifar10"): 1_188_906,  # spatial 32-30-14-12-5
    ("dm_large", "cifar10"): 17_190_602,  # ~17M as reported
    ("dm_large", "mnist"): 13_257_290,
    # Shi et al. 2021 CNN-7: dm_large + 5 BatchNorm2d (2*(64+64+128+128+128)) + BatchNorm1d(512)
    ("cnn7", "cifar10"): 17_192_650,
    # MixTrain: with biases (weights-only figures from the paper are in WEIGHTS_ONLY)
    ("mnist_fc1", "mnist"): 669_706,
    ("mnist_fc2", "mnist"): 18_413_578,
    # Zhang et al. 2021 L_inf-dist nets at the CPU default width 1024 (no biases before mean shift):
    # 784*1024 + 3*1024*1024 + 1024*10+10
    ("linf_dist_net", "mnist"): 3_958_794,
    # backbone 784*1024 + 3*1024*1024; head 1024*512+512 + 512*10+10
    ("linf_dist_mlp", "mnist"): 4_478_474,
    ("linf_dist_net_mlp", "mnist"): 4_478_474,
    # conv 3*32*9 + 32*32*9 + 32*64*9 + 2*64*64*9; L_inf-dist 16384*256; head 256*512+512 + 5,130
    ("linf_dist_conv_mlp", "cifar10"): 4_433_258,
    # demo models
    ("digits_mlp", "digits"): 6_570,
    ("digits_cnn", "digits"): 9_802,
}
# MixTrain reports weights only (no biases).
WEIGHTS_ONLY = {
    ("mnist_fc1", "mnist"): 668_672,
    ("mnist_fc2", "mnist"): 18_403_328,
}


class NormalizeLeafTracer(fx.Tracer):
    """Normalize (and the L_inf-dist layers, whose p switch is Python control flow) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from certorch.nn.linf_dist import MeanShift, _LInfDistBase

        return isinstance(m, (Normalize, _LInfDistBase, MeanShift)) or super().is_leaf_module(m, qualname)


def all_pairs() -> list[tuple[str, str]]:
    return [(n, d) for n in list_models() for d in model_info(n).datasets]


@pytest.mark.parametrize("name,dataset", all_pairs())
def test_build_forward_trace(name: str, dataset: str) -> None:
    torch.manual_seed(0)
    model = build(name, dataset=dataset).eval()
    assert isinstance(model, nn.Sequential)
    assert isinstance(model[0], Normalize)
    info = dataset_info(dataset)
    x = torch.rand(2, *info.input_shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, info.num_classes)
    assert torch.isfinite(y).all()
    # Normalize's mean/std are buffers, never parameters
    assert not any(isinstance(m, Normalize) and list(m.parameters()) for m in model.modules())
    graph = NormalizeLeafTracer().trace(model)
    gm = fx.GraphModule(model, graph)
    assert sum(1 for n in graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Normalize)) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)


@pytest.mark.parametrize("key,expected", sorted(EXPECTED.items()))
def test_param_counts(key: tuple[str, str], expected: int) -> None:
    model = build(key[0], dataset=key[1])
    assert count_params(model) == expected
    assert count_params(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key,expected", sorted(WEIGHTS_ONLY.items()))
def test_weight_counts(key: tuple[str, str], expected: int) -> None:
    assert count_params(build(key[0], dataset=key[1]), weights_only=True) == expected


def test_every_model_has_expected_count() -> None:
    covered = {n for n, _ in EXPECTED} | {n for n, _ in WEIGHTS_ONLY}
    assert set(list_models()) <= covered


def test_unknown_model_one_line_error() -> None:
    with pytest.raises(CertorchError) as e:
        build("no_such_model")
    msg = str(e.value)
    assert "\n" not in msg and "no_such_model" in msg and "mnist_small" in msg
    with pytest.raises(CertorchError):
        model_info("no_such_model")


def test_unsupported_dataset_one_line_error() -> None:
    with pytest.raises(CertorchError) as e:
        build("cifar_small", dataset="mnist")
    msg = str(e.value)
    assert "\n" not in msg and "cifar10" in msg
    with pytest.raises(CertorchError):
        build("mnist_small", dataset="no_such_dataset")


def test_bad_kwargs_error() -> None:
    with pytest.raises(CertorchError):
        build("mnist_small", bogus=3)


def test_normalize_false_and_aliases() -> None:
    m = build("digits_mlp", dataset="digits", normalize=False)
    assert not any(isinstance(x, Normalize) for x in m.modules())
    assert isinstance(build("cifar_small", dataset="CIFAR-10")[0], Normalize)


def test_model_info_and_list() -> None:
    info = model_info("mnist_small")
    assert info.name == "mnist_small" and "mnist" in info.datasets and "Wong" in info.paper
    assert "digits_mlp" in list_models("digits") and "cifar_small" not in list_models("digits")
    assert list_models() == sorted(list_models())


def test_normalize_module() -> None:
    info = dataset_info("cifar10")
    norm = Normalize(info.mean, info.std)
    assert [n for n, _ in norm.named_buffers()] == ["mean", "std"] and not list(norm.parameters())
    x = torch.rand(4, 3, 5, 5)
    ref = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), ref)
    torch.testing.assert_close(norm.channel_std, torch.tensor(info.std))
    assert norm.lipschitz_factor() == pytest.approx(1 / min(info.std), rel=1e-6)
    assert set(norm.state_dict()) == {"mean", "std"}
    flat = Normalize([0.5, 0.5], [0.25, 0.5], ndim=1)
    torch.testing.assert_close(flat(torch.ones(1, 2)), torch.tensor([[2.0, 1.0]]))
    with pytest.raises(CertorchError):
        Normalize([0.5], [0.0])
    with pytest.raises(CertorchError):
        Normalize([0.5, 0.5], [0.3])


def test_register_duplicate_name_rejected() -> None:
    def other(input_shape, num_classes):  # pragma: no cover - never built
        return [nn.Flatten()]

    with pytest.raises(CertorchError):
        register_model("mnist_small", datasets=("mnist",))(other)


def test_builds_are_independent() -> None:
    a, b = build("digits_mlp", dataset="digits"), build("digits_mlp", dataset="digits")
    assert a[2].weight.data_ptr() != b[2].weight.data_ptr()


def test_resnet_skip_connections_traced() -> None:
    torch.manual_seed(0)
    model = build("cifar_resnet", dataset="cifar10").eval()
    graph = NormalizeLeafTracer().trace(model)
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target.__name__ in ("add", "iadd")]
    assert len(adds) == 4  # one skip per residual block
    block = model[3]
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        ref = torch.relu(block.conv_skip(x) + block.conv_b(torch.relu(block.conv_a(x))))
        torch.testing.assert_close(block(x), ref)


def test_batchnorm_model_train_and_eval() -> None:
    torch.manual_seed(0)
    model = build("cnn7", dataset="cifar10")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 1
    x = torch.rand(2, 3, 32, 32)
    assert model.train()(x).shape == (2, 10)
    assert model.eval()(x).shape == (2, 10)


def test_dtype_follows_model() -> None:
    model = build("digits_cnn", dataset="digits").double()
    y = model(torch.rand(2, 1, 8, 8, dtype=torch.float64))
    assert y.dtype == torch.float64 and model[0].std.dtype == torch.float64


def test_docs_list_every_model() -> None:
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "models.md"
    if not doc.exists():
        pytest.skip("docs/models.md not present")
    text = doc.read_text()
    missing = [n for n in list_models() if f"`{n}`" not in text]
    assert not missing, f"models missing from docs/models.md: {missing}"
