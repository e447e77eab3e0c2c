"""L_inf-dist neurons, nets and certificates (Zhang et al., ICML 2021)."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from certorch.errors import CertorchError
from certorch.models import build
from certorch.models.linf_dist import LInfDistConvNetMLP, LInfDistNet, LInfDistNetMLP
from certorch.nn.linf_dist import (
    LInfDistConv2d,
    LInfDistLinear,
    MeanShift,
    check_lipschitz_backbone,
    linf_hinge_loss,
    lp_decay_direction,
    lp_weight_decay,
    set_p,
)
from certorch.nn.linf_dist_cert import (
    certified_radius,
    certify,
    head_ibp_certificate,
    lipschitz_factor,
    margin_certificate,
)
from certorch.nn.linf_dist_kernels import lp_dist

INF = math.inf


def _brute(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    d = (x[:, None, :] - w[None, :, :]).abs()
    return d.amax(-1) if math.isinf(p) else d.pow(p).sum(-1).pow(1 / p)


def _warm(model: nn.Module, shape, n: int = 3) -> nn.Module:
    """A few training-mode forwards so running means are non-trivial, then eval."""
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(n):
            model(torch.rand((16, *shape), generator=g))
    return model.eval()


def _pgd_margin(model, x, y, eps, steps=40):
    """Minimum over a PGD run of the top-1 margin z_y - max_{j != y} z_j (pixels kept in [0, 1])."""
    best = torch.full((x.shape[0],), math.inf)
    delta = (torch.rand_like(x) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        z = model((x + delta).clamp(0, 1))
        other = z.masked_fill(nn.functional.one_hot(y, z.shape[1]).bool(), -math.inf).amax(1)
        m = z.gather(1, y[:, None]).squeeze(1) - other
        best = torch.minimum(best, m.detach())
        (g,) = torch.autograd.grad(m.sum(), delta)
        delta = (delta.detach() - eps / 4 * g.sign()).clamp(-eps, eps)
    return best


# ------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("p", [1.0, 2.0, 8.0, INF])
@pytest.mark.parametrize("impl", ["auto", "chunked"])
def test_lp_dist_matches_brute_force(p, impl):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    out = lp_dist(x, w, p, impl=impl, chunk_elems=20)  # tiny blocks: exercises the tiling
    assert torch.allclose(out, _brute(x, w, p), atol=1e-12)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 8.0, 64.0])
def test_finite_p_gradcheck(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lp_dist(a, b, p, chunk_elems=10), (x, w))


@pytest.mark.parametrize("impl", ["cdist", "chunked"])
def test_inf_gradient_is_argmax_subgradient(impl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 5, generator=g, dtype=torch.float64)
    lp_dist(x, w, INF, impl=impl, chunk_elems=16).backward(up)
    d = x.detach()[:, None, :] - w.detach()[None]
    j = d.abs().argmax(-1, keepdim=True)
    sub = torch.zeros_like(d).scatter_(2, j, 1.0) * d.sign() * up[..., None]  # (B, O, N)
    assert torch.allclose(x.grad, sub.sum(1)) and torch.allclose(w.grad, -sub.sum(0))


def test_large_p_is_stable_and_close_to_inf():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 30, generator=g) * 40).requires_grad_(True)  # |d|^1000 overflows without normalizing
    w = torch.randn(4, 30, generator=g)
    out = lp_dist(x, w, 1000.0)
    out.sum().backward()
    ref = lp_dist(x.detach(), w, INF)
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert (out >= ref - 1e-4).all() and (out <= ref * 30 ** (1 / 1000) + 1e-4).all()


def test_bad_p_raises():
    with pytest.raises(CertorchError, match="p must be >= 1"):
        LInfDistLinear(3, 4, p=0.5)
    layer = LInfDistLinear(3, 4)
    with pytest.raises(CertorchError):
        layer.p = float("nan")
    with pytest.raises(CertorchError):
        set_p(layer, 0.9)


# ---------------------------------------------------------------------- mean shift
def test_mean_shift_train_uses_batch_mean_and_updates_running_mean():
    ms = MeanShift(3, momentum=0.25)
    x = torch.randn(8, 3) + torch.tensor([1.0, -2.0, 5.0])
    y = ms(x)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(ms.running_mean, 0.25 * x.mean(0))


def test_mean_shift_eval_subtracts_running_mean_only():
    ms = MeanShift(2, momentum=1.0)
    ms(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))  # running mean <- (2, 4)
    ms.eval()
    x = torch.randn(5, 2)
    assert torch.equal(ms(x), x - torch.tensor([2.0, 4.0]))  # a pure shift: Lipschitz constant 1


def test_mean_shift_conv_mean_over_batch_and_space():
    ms = MeanShift(2)
    y = ms(torch.randn(4, 2, 3, 3) + 7.0)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)


# --------------------------------------------------------------------- identity init
def test_identity_init_square_layer_is_identity_plus_constant():
    torch.manual_seed(0)
    layer = LInfDistLinear(64, 64, mean_shift=False, bias=False, identity_init=True)
    x = torch.rand(10, 64) * 2 - 1
    assert torch.allclose(layer(x), x + 10.0, atol=1e-6)


def test_identity_init_with_mean_shift_removes_the_constant():
    torch.manual_seed(0)
    layer = LInfDistLinear(32, 32, identity_init=True)
    x = torch.rand(10, 32) * 2 - 1
    assert torch.allclose(layer(x), x - x.mean(0), atol=1e-5)


def test_identity_init_conv_is_identity_plus_constant():
    torch.manual_seed(0)
    conv = LInfDistConv2d(4, 4, 3, padding=1, mean_shift=False, identity_init=True)
    x = torch.rand(2, 4, 5, 5) * 2 - 1
    assert torch.allclose(conv(x), x + 10.0, atol=1e-6)


def test_identity_init_non_square_raises():
    with pytest.raises(CertorchError, match="square"):
        LInfDistLinear(5, 6, identity_init=True)
    with pytest.raises(CertorchError, match="square"):
        LInfDistConv2d(3, 4, 3, identity_init=True)


# ------------------------------------------------------------------------ conv layer
def test_conv_matches_patchwise_reference_and_batch_chunking():
    torch.manual_seed(0)
    conv = LInfDistConv2d(2, 3, 3, stride=2, padding=1, mean_shift=False).double()
    x = torch.randn(5, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    cols = nn.functional.unfold(x.detach(), 3, padding=1, stride=2).transpose(1, 2)  # (B, L, 18)
    ref = _brute(cols.reshape(-1, 18), conv.weight.detach().reshape(3, -1), INF).view(5, -1, 3).transpose(1, 2)
    assert y.shape == (5, 3, 4, 3) and torch.allclose(y, ref.reshape(5, 3, 4, 3))
    gx, gw = torch.autograd.grad(y.square().sum(), (x, conv.weight))
    conv.chunk_elems = 10  # forces one checkpointed batch slice per example
    y2 = conv(x)
    gx2, gw2 = torch.autograd.grad(y2.square().sum(), (x, conv.weight))
    assert torch.allclose(y, y2) and torch.allclose(gx, gx2) and torch.allclose(gw, gw2)


# --------------------------------------------------------------- Lipschitz property
def _pairs(shape, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g)
    scale = torch.rand((n, *([1] * len(shape))), generator=g)  # varied pair distances
    x2 = (x + (torch.rand((n, *shape), generator=g) * 2 - 1) * scale).clamp(0, 1)
    return x, x2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linf_dist_net_is_1_lipschitz(seed):
    torch.manual_seed(seed)
    net = _warm(LInfDistNet((1, 8, 8), 10, depth=4, width=48), (1, 8, 8))
    x, x2 = _pairs((1, 8, 8), seed=seed)
    with torch.no_grad():
        lhs = (net(x) - net(x2)).abs().amax(1)
    assert (lhs <= (x - x2).flatten(1).abs().amax(1) + 1e-4).all()


def test_conv_net_features_are_1_lipschitz():
    torch.manual_seed(0)
    net = _warm(LInfDistConvNetMLP((3, 8, 8), 10, channels=(4, 4, 6), strides=(1, 2, 1), features=16), (3, 8, 8))
    x, x2 = _pairs((3, 8, 8), n=16)
    with torch.no_grad():
        lhs = (net.features(x) - net.features(x2)).abs().amax(1)
    assert (lhs <= (x - x2).flatten(1).abs().amax(1) + 1e-4).all()


def test_normalize_scales_lipschitz_constant_by_inverse_std():
    torch.manual_seed(0)
    net = _warm(LInfDistNet((1, 8, 8), 10, depth=3, width=32, mean=0.3, std=0.25), (1, 8, 8))
    assert lipschitz_factor(net) == pytest.approx(4.0)
    x, x2 = _pairs((1, 8, 8))
    with torch.no_grad():
        ratio = (net(x) - net(x2)).abs().amax(1) / (x - x2).flatten(1).abs().amax(1)
    assert (ratio <= 4.0 + 1e-3).all() and (ratio > 1.0).any()  # the 1/s factor is needed


# ------------------------------------------------------------------ certificates
def test_margin_certificate_never_beaten_by_pgd():
    torch.manual_seed(0)
    net = _warm(LInfDistNet((1, 8, 8), 10, depth=3, width=32, mean=0.3, std=0.5), (1, 8, 8))
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    r = certified_radius(net, x, y)
    assert (r > 0).all()
    eps = 0.95 * float(r.median())
    ok = margin_certificate(net, x, y, eps)
    assert ok.any() and (~ok).any()
    assert torch.equal(ok, r > eps)
    worst = _pgd_margin(net, x[ok], y[ok], eps)
    assert (worst > 0).all()


def test_head_ibp_certificate_never_beaten_by_pgd():
    torch.manual_seed(0)
    net = _warm(LInfDistNetMLP((1, 8, 8), 10, depth=3, width=32, hidden=16), (1, 8, 8))
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    eps = 0.02
    ok = certify(net, x, y, eps)
    assert ok.any()
    assert (_pgd_margin(net, x[ok], y[ok], eps) > 0).all()
    with pytest.raises(CertorchError, match="conventional head"):
        margin_certificate(net, x, y, eps)


def test_head_ibp_on_negation_head_equals_margin_rule():
    torch.manual_seed(0)
    net = _warm(LInfDistNet((1, 8, 8), 10, depth=3, width=32), (1, 8, 8))
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    eps = float(certified_radius(net, x, y).median())
    assert torch.equal(head_ibp_certificate(net, x, y, eps * 0.99), margin_certificate(net, x, y, eps * 0.99))


def test_certificate_refuses_finite_p_and_restores_training_flag():
    net = LInfDistNet((1, 4, 4), 3, depth=2, width=8, p=8.0)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    with pytest.raises(CertorchError, match="p=inf"):
        margin_certificate(net, x, y, 0.1)
    set_p(net, INF)
    net.train()
    margin_certificate(net, x, y, 0.1)
    assert net.training and all(m.training for m in net.modules())


def test_batchnorm_in_backbone_raises():
    bad = nn.Sequential(nn.Flatten(), LInfDistLinear(16, 8), nn.BatchNorm1d(8), LInfDistLinear(8, 3, mean_shift=False))
    with pytest.raises(CertorchError, match="BatchNorm1d"):
        check_lipschitz_backbone(bad)
    net = LInfDistNetMLP((1, 4, 4), 3, depth=2, width=8)
    check_lipschitz_backbone(net)  # the conventional head is not part of the backbone
    net.backbone.insert(2, nn.BatchNorm1d(8))
    with pytest.raises(CertorchError, match="BatchNorm"):
        lipschitz_factor(net)
    with pytest.raises(CertorchError, match="Linear"):
        check_lipschitz_backbone(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))


# ----------------------------------------------------------- weight decay and loss
@pytest.mark.parametrize("p", [2.0, 8.0, INF])
def test_lp_weight_decay_gradient_is_eq6(p):
    torch.manual_seed(0)
    net = nn.Sequential(LInfDistLinear(6, 5), nn.Linear(5, 2), LInfDistConv2d(2, 3, 3))
    (lp_weight_decay(net, p)).backward()
    for layer in (net[0], net[2]):
        assert torch.allclose(layer.weight.grad, lp_decay_direction(layer.weight.detach(), p), atol=1e-5)
        if p == 2.0:
            assert torch.allclose(layer.weight.grad, layer.weight.detach())
    assert net[1].weight.grad is None  # conventional layers: ordinary weight decay


def test_lp_weight_decay_value_and_layer_p():
    layer = LInfDistLinear(3, 2, p=8.0)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, -4.0, 0.0], [1.0, 1.0, -2.0]]))
    assert float(lp_weight_decay(layer, 2.0).detach()) == pytest.approx(0.5 * (25 + 6))
    assert float(lp_weight_decay(layer, INF).detach()) == pytest.approx(0.5 * (16 + 4))
    expect = 0.5 * ((3**8 + 4**8) ** 0.25 + (2 + 2**8) ** 0.25)
    assert float(lp_weight_decay(layer).detach()) == pytest.approx(expect, rel=1e-5)  # p=None: the layer's p


def test_linf_hinge_loss():
    z = torch.tensor([[3.0, 1.0, 2.5], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 1])
    # margins: 0.5 and 4.0; theta = 1 -> (0.5 + 0) / 2
    assert float(linf_hinge_loss(z, y, 1.0)) == pytest.approx(0.25)
    assert float(linf_hinge_loss(z, y, 0.4)) == 0.0
    with pytest.raises(CertorchError):
        linf_hinge_loss(z, y, -1.0)


# ---------------------------------------------------------------------- registry
def test_registry_builds_and_certifies():
    model = build("linf_dist_net", dataset="mnist", width=32)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert lipschitz_factor(model) == pytest.approx(1 / 0.3081, rel=1e-5)
    mlp = build("linf_dist_net_mlp", dataset="mnist", width=32)
    net = mlp[-1]
    assert len([m for m in net.backbone if isinstance(m, LInfDistLinear)]) == 4
    assert all(m.mean_shift is not None for m in net.backbone if isinstance(m, LInfDistLinear))
    x, y = torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    assert certify(mlp.eval(), x, y, 0.01).shape == (4,)
    cifar = build("linf_dist_net", dataset="cifar10", width=16)
    assert len([m for m in cifar.modules() if isinstance(m, LInfDistLinear)]) == 6


def test_docs_example_runs():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "linf_dist.md").read_text()
    code = doc.split("## Example", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/linf_dist.md", "exec"), scope)
    assert scope["ok"].shape == (8,) and (scope["radius"] >= 0).all()


# ------------------------------------------------------------------------ memory
_MEM_SCRIPT = textwrap.dedent(
    """
    import math, resource, torch
    from certorch.nn.linf_dist_kernels import lp_dist
    torch.set_num_threads(1)
    B, O, N = 256, 1024, 784
    x = torch.randn(B, N, requires_grad=True); w = torch.randn(O, N, requires_grad=True)
    cases = [(math.inf, "auto"), (math.inf, "chunked"), (8.0, "auto")]
    for p, impl in cases:
        lp_dist(x[:2], w[:3], p, impl=impl).sum().backward()   # warm up allocator / kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for p, impl in cases:
        lp_dist(x, w, p, impl=impl).sum().backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """
)


def test_forward_backward_never_materializes_batch_out_in():
    """cdist at p=inf, the chunked p=inf kernel and the chunked p=8 kernel, one process."""
    big_mb = 256 * 1024 * 784 * 4 / 2**20  # 784 MB for the (B, O, N) difference tensor
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew_mb = float(out.stdout.strip().splitlines()[-1])
    assert grew_mb < big_mb / 4, f"peak RSS grew {grew_mb:.0f} MB"
