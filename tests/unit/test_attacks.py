"""Unit tests of certorch.attacks: invariants of the final entry point, PGD semantics, exact linear cases."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from certorch.attacks import (
    CW,
    FGSM,
    PGD,
    Attack,
    AttackResult,
    attack_class,
    build_attack,
    list_attacks,
    pgd,
    step_factor,
)
from certorch.errors import CertorchError

# One row per attack: (registry name, fast kwargs). Adding an attack = adding a row.
ATTACKS = [
    ("pgd", dict(steps=10, seed=0)),
    ("pgd", dict(steps=10, restarts=2, loss="margin", schedule="cosine", seed=0)),
    ("pgd", dict(steps=8, schedule="step", best_iterate=False, seed=0)),
    ("fgsm", dict()),
    ("cw", dict(steps=10, seed=0)),
]
IDS = ["pgd-ce", "pgd-margin-restarts", "pgd-step-last", "fgsm", "cw"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic k-class data in [0, 1]^d: Gaussian blobs around random centres, clipped."""
    centres = torch.rand(k, d, generator=torch.Generator().manual_seed(1234))  # shared by train/test
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = (centres[y] + 0.12 * torch.randn(n, d, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained():
    """A tiny MLP trained for 200 Adam steps on 10-class blobs, plus held-out data."""
    torch.manual_seed(0)
    x, y = _data(256, 16, 10, seed=1)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.zero_grad(set_to_none=True)
    net.eval()
    xt, yt = _data(256, 16, 10, seed=2)
    return net, xt, yt


def _random_net(k: int = 5, in_shape=(3, 4, 4), seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    d = math.prod(in_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, k)).to(dtype)


def _linear_worst_margin(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact min over ball ∩ [0,1] of min_{j!=y} logit_y - logit_j for logits = W x + b, shape (B,)."""
    W, b = lin.weight, lin.bias
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    d = W[y].unsqueeze(1) - W.unsqueeze(0)  # (B, K, D): w_y - w_j
    worst = torch.minimum(d * lower.unsqueeze(1), d * upper.unsqueeze(1)).sum(-1) + (b[y].unsqueeze(1) - b)
    worst[torch.arange(len(y)), y] = math.inf
    return worst.min(dim=1).values


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name,kw", ATTACKS, ids=IDS)
def test_x_adv_inside_ball_and_data_box(name, kw):
    net = _random_net()
    torch.manual_seed(1)
    x = torch.rand(32, 3, 4, 4)
    x[:4] = 0.0  # corners of the data box: the ball sticks out of [0, 1]
    x[4:8] = 1.0
    y = torch.randint(0, 5, (32,))
    eps = 0.2
    res = build_attack(name, **kw)(net, x, y, eps)
    assert res.x_adv.shape == x.shape
    assert ((res.x_adv - x).abs() <= eps + 1e-7).all()
    assert (res.x_adv >= 0).all() and (res.x_adv <= 1).all()


class _Garbage(Attack):
    def run(self, model, x, y, box, eps):
        return x + 100.0 * torch.randn_like(x)


def test_base_clips_garbage_from_run():
    net = _random_net()
    torch.manual_seed(2)
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 5, (16,))
    res = _Garbage()(net, x, y, 0.05)
    assert ((res.x_adv - x).abs() <= 0.05 + 1e-7).all()
    assert (res.x_adv >= 0).all() and (res.x_adv <= 1).all()
    # success and margin are recomputed by the base at the clipped point
    logits = net(res.x_adv)
    assert torch.equal(res.success, logits.argmax(1) != y)


@pytest.mark.parametrize("name,kw", ATTACKS, ids=IDS)
def test_eps_zero_returns_x_and_natural_errors(name, kw, trained):
    net, x, y = trained
    res = build_attack(name, **kw)(net, x, y, 0.0)
    assert torch.equal(res.x_adv, x)
    with torch.no_grad():
        natural_wrong = net(x).argmax(1) != y
    assert torch.equal(res.success, natural_wrong)


@pytest.mark.parametrize("name,kw", ATTACKS, ids=IDS)
def test_margin_and_success_are_consistent(name, kw):
    net = _random_net()
    torch.manual_seed(3)
    x, y = torch.rand(32, 3, 4, 4), torch.randint(0, 5, (32,))
    res = build_attack(name, **kw)(net, x, y, 0.1)
    assert isinstance(res, AttackResult)
    assert res.margin.shape == (32,) and res.success.dtype == torch.bool
    assert torch.equal(res.success[res.margin < 0], torch.ones_like(res.success[res.margin < 0]))
    assert torch.equal(res.success[res.margin > 0], torch.zeros_like(res.success[res.margin > 0]))


def test_no_parameter_gradients_and_mode_untouched():
    net = _random_net()
    net.train()
    torch.manual_seed(4)
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 5, (8,))
    PGD(steps=5, restarts=2)(net, x, y, 0.1)
    FGSM()(net, x, y, 0.1)
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())  # restored
    assert net.training  # the attack evaluates the model as given


def test_existing_parameter_gradients_are_not_changed():
    net = _random_net()
    torch.manual_seed(5)
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 5, (8,))
    nn.functional.cross_entropy(net(x), y).backward()
    before = [p.grad.clone() for p in net.parameters()]
    CW(steps=5)(net, x, y, 0.1)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, net.parameters()))


def test_frozen_parameters_restored_after_error():
    class Boom(Attack):
        def run(self, model, x, y, box, eps):
            raise RuntimeError("boom")

    net = _random_net()
    x, y = torch.rand(4, 3, 4, 4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="boom"):
        Boom()(net, x, y, 0.1)
    assert all(p.requires_grad for p in net.parameters())


def test_call_is_final():
    with pytest.raises(TypeError, match="must not override"):

        class Bad(Attack):  # noqa: F841
            def __call__(self, *a):
                return None


# ---------------------------------------------------------------------------- PGD semantics


def test_pgd_accuracy_not_above_natural(trained):
    net, x, y = trained
    with torch.no_grad():
        nat = (net(x).argmax(1) == y).float().mean().item()
    res = PGD(steps=10, seed=0)(net, x, y, 0.1)
    assert nat > 0.8  # the net learned the blobs
    assert res.robust_accuracy <= nat
    assert res.robust_accuracy < nat - 0.05  # and the attack actually breaks some of them
    assert res.queries == 11  # steps + 1 forward passes


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_more_restarts_never_worse(loss, trained):
    net, x, y = trained
    one = PGD(steps=5, restarts=1, loss=loss, seed=7)(net, x, y, 0.08)
    many = PGD(steps=5, restarts=4, loss=loss, seed=7)(net, x, y, 0.08)
    assert (many.margin <= one.margin).all()
    assert (many.margin < one.margin).any()  # restarts do help somewhere


def test_more_restarts_never_worse_with_global_rng(trained):
    net, x, y = trained
    torch.manual_seed(11)
    one = PGD(steps=3, restarts=1, loss="margin")(net, x, y, 0.08)
    torch.manual_seed(11)
    many = PGD(steps=3, restarts=3, loss="margin")(net, x, y, 0.08)
    assert (many.margin <= one.margin).all()


def test_seeded_pgd_is_deterministic(trained):
    net, x, y = trained
    a = PGD(steps=4, seed=3)(net, x, y, 0.1)
    b = PGD(steps=4, seed=3)(net, x, y, 0.1)
    assert torch.equal(a.x_adv, b.x_adv)


def test_margin_pgd_reaches_analytic_worst_case_on_binary_linear_model():
    torch.manual_seed(22)
    lin = nn.Linear(10, 2).double()
    x = torch.rand(64, 10, dtype=torch.float64)
    y = torch.randint(0, 2, (64,))
    eps = 0.1
    exact = _linear_worst_margin(lin, x, y, eps)
    res = PGD(steps=20, loss="margin", seed=0)(lin, x, y, eps)
    assert (res.margin >= exact - 1e-9).all()  # the exact minimum is a lower bound
    assert (res.margin - exact).abs().max() < 1e-4
    assert torch.equal(res.success, exact < 0)  # found every counterexample that exists


def test_margin_pgd_on_multiclass_linear_model_finds_every_counterexample():
    # max_j of linear functions is convex, so PGD ascent can stop at a vertex of a sub-optimal
    # class j for a few examples; it must still be sound, break every breakable example, and
    # be exact for nearly all of them.
    torch.manual_seed(24)
    lin = nn.Linear(10, 4).double()
    x = torch.rand(256, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (256,))
    eps = 0.1
    exact = _linear_worst_margin(lin, x, y, eps)
    res = PGD(steps=20, restarts=8, loss="margin", seed=0)(lin, x, y, eps)
    assert (res.margin >= exact - 1e-9).all()
    assert torch.equal(res.success, exact < 0)
    assert ((res.margin - exact).abs() < 1e-4).float().mean() >= 0.95


def test_binary_linear_attack_is_the_signed_vertex():
    torch.manual_seed(30)
    lin = nn.Linear(6, 2).double()
    x = 0.2 + 0.6 * torch.rand(16, 6, dtype=torch.float64)  # eps-ball stays inside [0, 1]
    y = torch.randint(0, 2, (16,))
    eps = 0.1
    w = lin.weight
    expected = x - eps * torch.sign(w[y] - w[1 - y])
    for atk in (FGSM(loss="margin"), PGD(steps=10, loss="margin", seed=0), FGSM()):
        assert torch.allclose(atk(lin, x, y, eps).x_adv, expected)


def test_step_schedules():
    assert step_factor("constant", 7, 10) == 1.0
    assert step_factor("cosine", 0, 10) == 1.0 and step_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert [step_factor("step", t, 8) for t in (0, 3, 4, 6)] == pytest.approx([1.0, 1.0, 0.1, 0.01])


# ---------------------------------------------------------------------------- dtypes, shapes, devices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_follows_input(dtype):
    net = _random_net(dtype=dtype)
    x, y = torch.rand(6, 3, 4, 4, dtype=dtype), torch.randint(0, 5, (6,))
    res = PGD(steps=3)(net, x, y, 0.1)
    assert res.x_adv.dtype == dtype and res.margin.dtype == dtype


def test_generic_input_shape_and_per_example_eps():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 5 * 2, 3))
    x, y = torch.rand(5, 2, 3, 5, 2), torch.randint(0, 3, (5,))
    eps = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.2])
    res = PGD(steps=4, seed=0)(net, x, y, eps)
    dist = (res.x_adv - x).abs().flatten(1).max(1).values
    assert (dist <= eps + 1e-7).all() and dist[0] == 0


def test_works_under_no_grad_and_inference_mode():
    net = _random_net()
    x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 5, (4,))
    with torch.no_grad():
        a = PGD(steps=3, seed=1)(net, x, y, 0.1)
    with torch.inference_mode():
        b = PGD(steps=3, seed=1)(net, x, y, 0.1)
    assert torch.equal(a.x_adv, b.x_adv)
    assert not (a.x_adv == x).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_device_follows_input():
    net = _random_net().cuda()
    x, y = torch.rand(8, 3, 4, 4, device="cuda"), torch.randint(0, 5, (8,), device="cuda")
    res = PGD(steps=3, restarts=2, seed=0)(net, x, y, 0.1)
    assert res.x_adv.device.type == "cuda" and res.margin.device.type == "cuda"
    assert ((res.x_adv - x).abs() <= 0.1 + 1e-6).all()


# ---------------------------------------------------------------------------- bad input, registry


@pytest.mark.parametrize(
    "case",
    ["eps<0", "eps nan", "x nan", "y out of range", "y negative", "y shape", "y float", "x int", "logits 1d"],
)
def test_bad_inputs_raise_certorch_error(case):
    net = _random_net()
    x, y, eps = torch.rand(4, 3, 4, 4), torch.randint(0, 5, (4,)), 0.1
    model = net
    if case == "eps<0":
        eps = -0.1
    elif case == "eps nan":
        eps = float("nan")
    elif case == "x nan":
        x[1, 0, 0, 0] = float("nan")
    elif case == "y out of range":
        y[2] = 5
    elif case == "y negative":
        y[0] = -1
    elif case == "y shape":
        y = torch.zeros(3, dtype=torch.long)
    elif case == "y float":
        y = y.float()
    elif case == "x int":
        x = (x * 10).long()
    elif case == "logits 1d":
        model = lambda v: net(v).sum(1)  # noqa: E731
    with pytest.raises(CertorchError):
        PGD(steps=2)(model, x, y, eps)


@pytest.mark.parametrize(
    "kw",
    [
        dict(steps=-1),
        dict(steps=2.5),
        dict(restarts=0),
        dict(step_size=0.0),
        dict(step_size=-1.0),
        dict(rel_step_size=float("nan")),
        dict(step_size=0.1, rel_step_size=0.5),
        dict(loss="hinge"),
        dict(schedule="linear"),
        dict(restarts=3, random_start=False),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kw):
    with pytest.raises(CertorchError):
        PGD(**kw)


def test_registry():
    assert {"pgd", "fgsm", "cw"} <= set(list_attacks())
    assert attack_class("PGD") is PGD
    assert isinstance(build_attack("cw", steps=3), CW)
    with pytest.raises(CertorchError, match="unknown attack"):
        build_attack("deepfool")
    with pytest.raises(CertorchError, match="bad arguments"):
        build_attack("fgsm", steps=3)
    with pytest.raises(CertorchError):
        CW(kappa=0.0)


def test_functional_shortcut_matches_class(trained):
    net, x, y = trained
    a = pgd(net, x, y, 0.1, steps=3, seed=5)
    b = PGD(steps=3, seed=5)(net, x, y, 0.1)
    assert torch.equal(a.x_adv, b.x_adv)


def test_docs_example_runs():
    doc = Path(__file__).resolve().parents[2] / "docs" / "attacks.md"
    if not doc.exists():
        pytest.skip("docs/attacks.md not present")
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks, "docs/attacks.md has no python example"
    exec(compile(blocks[0], str(doc), "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("cls", [PGD, CW])
def test_zero_steps_refused(cls):
    """0 steps is a random point, not an attack (it reported robust > natural accuracy)."""
    with pytest.raises(CertorchError, match="steps must be an integer >= 1"):
        cls(steps=0)
    with pytest.raises(CertorchError, match="steps must be an integer >= 1"):
        build_attack(cls.name, steps=0)


def test_interval_attack_without_any_step_refused():
    from certorch.attacks import IntervalAttack

    with pytest.raises(CertorchError, match="would not move"):
        IntervalAttack(steps=0, pgd_steps=0)
    IntervalAttack(steps=0, pgd_steps=3)  # PGD from x alone is still an attack


def test_latent_attack_zero_steps_refused():
    from certorch.attacks import latent_attack

    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(CertorchError, match="steps must be an integer >= 1"):
        latent_attack(net, torch.rand(2, 2), torch.tensor([0, 1]), 0.1, 1, steps=0)


@pytest.mark.parametrize("seed", [2**64, -1, 1.5])
def test_seed_out_of_range_refused(seed):
    with pytest.raises(CertorchError, match="seed must be an integer in"):
        PGD(steps=1, seed=seed)
