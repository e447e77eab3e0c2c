"""Attack base class: a final entry point that enforces the invariants, subclasses implement ``run``.

Contract of :meth:`Attack.__call__` (the only public way to run an attack):

1. validate the inputs: ``x`` is a floating tensor (B, *input_shape) without NaN/inf, ``y`` is
   an integer tensor (B,) with labels in ``[0, K)`` (K and the (B, K) logit shape are checked
   on the first model output, by a hook, before any loss uses ``y``),
   ``eps`` passes :func:`certorch.spec.check_eps`; the threat set is
   ``box = linf_ball(x, eps, lo, hi)`` (ball ∩ data box);
2. freeze the model parameters (``requires_grad`` off for the duration of the call, restored
   afterwards), so attacking never writes ``.grad`` into the model; the train/eval mode is
   **not** touched: the attack evaluates the model exactly as given (put it in ``eval()``
   yourself if you do not want dropout noise or BatchNorm running-stat updates);
3. call the subclass's :meth:`Attack.run` ``(model, x, y, box, eps) -> x_adv``;
4. clip ``x_adv`` back into ``box`` (a buggy ``run`` can never leave the threat set);
5. recompute logits, ``success`` and ``margin`` with a plain forward pass at ``x_adv``.

To add an attack: subclass :class:`Attack`, take hyperparameters as keyword-only constructor
arguments validated in ``__init__``, implement ``run``, and decorate the class with
:func:`certorch.attacks.registry.register_attack`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, final

import torch
from torch import Tensor, nn

from certorch.domains.box import Box
from certorch.errors import CertorchError
from certorch.spec import linf_ball, margins

Model = Callable[[Tensor], Tensor]

__all__ = ["Attack", "AttackResult", "Model", "frozen_parameters", "worst_margin", "project"]


@dataclass(frozen=True)
class AttackResult:
    """Outcome of one attack call on a batch.

    Attributes:
        x_adv: (B, *input_shape) adversarial inputs, always inside ``linf_ball(x, eps, lo, hi)``.
        success: (B,) bool, True where the model misclassifies ``x_adv`` (argmax != y).
        margin: (B,) ``min_{j != y} logit[y] - logit[j]`` at ``x_adv``; negative means success.
        logits: (B, K) model outputs at ``x_adv``.
        queries: forward calls of the model made by :meth:`Attack.run` (the final evaluation
            pass is not counted).
        seconds: wall-clock time of the whole call.
    """

    x_adv: Tensor
    success: Tensor
    margin: Tensor
    logits: Tensor
    queries: int
    seconds: float
    clean_correct: Tensor | None = None  # (B,) bool: the clean prediction is y

    @property
    def robust_accuracy(self) -> float:
        """Fraction of the batch classified correctly both clean and at ``x_adv`` (an upper bound
        on the true robust accuracy; never above the natural accuracy)."""
        if not self.success.numel():
            return float("nan")
        ok = ~self.success if self.clean_correct is None else self.clean_correct & ~self.success
        return float(ok.float().mean())


def worst_margin(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) smallest margin ``min_{j != y} logit[y] - logit[j]`` of (B, K) ``logits``."""
    return margins(logits, y).min(dim=1).values


def project(x_adv: Tensor, box: Box) -> Tensor:
    """Clip (B, *in) ``x_adv`` element-wise into ``box`` (same shape)."""
    return torch.minimum(torch.maximum(x_adv, box.lower), box.upper)


@contextlib.contextmanager
def frozen_parameters(model: Model) -> Iterator[None]:
    """Turn ``requires_grad`` off on every parameter of ``model`` for the block, then restore it.

    Gradients flow only to the attack's input tensors, the model's ``.grad`` fields are never
    written, and no graph is built for the weights. Mode (train/eval) is left unchanged.
    """
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _CountingModel:
    """Wraps a model (nn.Module or callable) for one ``run``: counts forward calls and validates
    the first output (logit shape, label range) right after it is produced, before any loss
    can index it with ``y``. Saves a separate validation forward pass."""

    def __init__(self, model: Model, y: Tensor):
        self._model = model
        self._y = y
        self.calls = 0
        self.validated = False
        self._handles = []
        if isinstance(model, nn.Module):
            self._handles = [
                model.register_forward_pre_hook(self._count),
                model.register_forward_hook(self._check),
            ]

    def _count(self, *_args) -> None:
        self.calls += 1

    def _check(self, _module, _inputs, output) -> None:
        if not self.validated:
            _check_logits(output, self._y)
            self.validated = True

    def target(self) -> Model:
        """The object handed to ``run``: the module itself (hooked), or a counting closure."""
        if self._handles:
            return self._model

        def counted(x: Tensor) -> Tensor:
            self.calls += 1
            out = self._model(x)
            self._check(None, (x,), out)
            return out

        return counted

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _eps_tensor(eps: float | Tensor, x: Tensor) -> float | Tensor:
    """Make a per-example eps of shape (B,) broadcastable to x (B, *in); leave others alone."""
    if isinstance(eps, Tensor):
        eps = eps.detach().to(device=x.device, dtype=x.dtype)
        if eps.dim() == 1 and x.dim() > 1 and eps.shape[0] == x.shape[0] and eps.shape[0] != 1:
            eps = eps.view(-1, *([1] * (x.dim() - 1)))
        try:
            torch.broadcast_shapes(eps.shape, x.shape)
        except RuntimeError:
            raise CertorchError(
                f"eps of shape {tuple(eps.shape)} does not broadcast to x of shape {tuple(x.shape)}"
            ) from None
        return eps
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise CertorchError(f"eps must be a number or a tensor, got {type(eps).__name__}")
    return float(eps)


def _check_x_y(x: Tensor, y: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise CertorchError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise CertorchError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise CertorchError("x must have a batch dimension: shape (B, *input_shape)")
    if not isinstance(y, Tensor):
        raise CertorchError(f"y must be a torch.Tensor of labels, got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise CertorchError(f"labels y must be an integer tensor, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise CertorchError(f"labels y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    return y.to(device=x.device, dtype=torch.long)


def _check_logits(logits: Tensor, y: Tensor) -> None:
    B = y.shape[0]
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != B:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise CertorchError(f"model must return logits of shape (B, K) = ({B}, K), got {shape}")
    K = logits.shape[1]
    if K < 2:
        raise CertorchError(f"model must return at least 2 logits per example, got K={K}")
    if B and (int(y.min()) < 0 or int(y.max()) >= K):
        raise CertorchError(f"labels y must lie in [0, {K - 1}], got range [{int(y.min())}, {int(y.max())}]")


class Attack:
    """Base class of all L-inf attacks. Subclasses implement :meth:`run` only.

    ``__call__`` is final (enforced at class creation): it validates, freezes parameters, runs,
    clips and re-evaluates, see the module docstring.
    """

    #: registry name, set by :func:`certorch.attacks.registry.register_attack`
    name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            raise TypeError(f"{cls.__name__} must not override Attack.__call__; implement run() instead")

    @final
    def __call__(
        self,
        model: Model,
        x: Tensor,
        y: Tensor,
        eps: float | Tensor,
        lo: float | Tensor = 0.0,
        hi: float | Tensor = 1.0,
    ) -> AttackResult:
        """Attack ``model`` at (B, *in) ``x`` with (B,) labels ``y`` within ``linf_ball(x, eps, lo, hi)``.

        ``eps`` is a number, a (B,) tensor (one radius per example) or a tensor broadcastable
        to ``x``. Works under ``torch.no_grad()``/``inference_mode()`` callers too (gradients
        w.r.t. the input are re-enabled locally). Returns an :class:`AttackResult`.
        """
        t0 = time.perf_counter()
        y = _check_x_y(x, y)
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone()
            eps_t = _eps_tensor(eps, x)
            box = linf_ball(x, eps_t, lo, hi)  # checks finiteness of x, eps range, lo <= hi
            with frozen_parameters(model):
                counter = _CountingModel(model, y)
                try:
                    x_adv = self.run(counter.target(), x, y, box, eps_t)
                finally:
                    counter.close()
                if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape:
                    got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
                    raise RuntimeError(f"{type(self).__name__}.run returned {got}, expected shape {tuple(x.shape)}")
                x_adv = x_adv.detach().to(dtype=x.dtype, device=x.device)
                if torch.isnan(x_adv).any():
                    raise RuntimeError(f"{type(self).__name__}.run returned NaN inputs")
                x_adv = project(x_adv, box)
                with torch.no_grad():
                    logits = model(x_adv)
                    clean_correct = model(x).argmax(dim=1) == y
        _check_logits(logits, y)  # also covers a run() that never called the model
        logits = logits.detach()
        margin = worst_margin(logits, y)
        success = logits.argmax(dim=1) != y
        return AttackResult(
            x_adv=x_adv,
            success=success,
            margin=margin,
            logits=logits,
            queries=counter.calls,
            seconds=time.perf_counter() - t0,
            clean_correct=clean_correct.detach(),
        )

    def run(self, model: Model, x: Tensor, y: Tensor, box: Box, eps: float | Tensor) -> Tensor:
        """Return (B, *in) candidate adversarial inputs for (B, *in) ``x`` and (B,) ``y``.

        ``box`` is the validated threat set (ball ∩ data box, shapes of ``x``); ``eps`` the
        radius (float, or tensor broadcastable to ``x``), e.g. for step sizes. Model
        parameters are frozen and gradients are enabled; the result is clipped into ``box``
        by the caller, so ``run`` need not be exact about it.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
