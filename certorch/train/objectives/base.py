"""Training objectives: the interface, its result types and the registry.

An objective turns a batch into a loss::

    out = objective(model, x, y, eps, state)      # -> LossOutput(loss, metrics)

``x``: (B, C, H, W) pixels in [0, 1]; ``y``: (B,) int64 labels; ``eps``: the scheduled
training radius (float) for this step; ``state``: a :class:`TrainState` (epoch, step,
progress in [0, 1], current values of the eps and of every named schedule the objective
declared). The trainer owns the loop, the optimizer and every schedule; an objective is
one small class in one file:

    @register_objective("my_method")
    class MyMethod(Objective):
        @dataclass(kw_only=True)
        class Params:                     # validated at build time, before training starts
            kappa: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(start=1.0, end=0.0))
            def __post_init__(self): ...  # raise CertorchError for bad values

        def schedules(self):              # named scalar schedules the trainer steps
            return {"kappa": self.params.kappa}

        def loss(self, model, x, y, eps, state):
            k = state.values["kappa"]
            ...
            return LossOutput(loss, {"robust_loss": r})

Optional hooks: :meth:`Objective.param_groups` (per-parameter-group weight decay),
:meth:`Objective.regularizer` (a term added to every loss, logged as ``reg``),
:meth:`Objective.eval_metrics` (extra per-epoch evaluation numbers such as verified
accuracy) and, for objectives **with state** (MixTrain's alpha), :meth:`Objective.state_dict` /
:meth:`Objective.load_state_dict` (saved in every checkpoint, restored by ``--resume``; numeric
entries are logged and plotted per epoch) and :meth:`Objective.after_epoch` (called after each
epoch with its record, including the held-out evaluation metrics, to update that state).
Register the file by adding one import line in ``objectives/__init__.py``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, final

from torch import Tensor, nn

from certorch.config.schema import ScheduleConfig
from certorch.config.typed import from_dict
from certorch.errors import CertorchError

__all__ = [
    "TrainState",
    "LossOutput",
    "Objective",
    "NoParams",
    "register_objective",
    "objective_class",
    "build_objective",
    "list_objectives",
    "objective_help",
]


@dataclass
class TrainState:
    """What an objective may know about training time when computing a loss.

    ``epoch`` (0-based), ``step`` (global optimizer step, 0-based), ``epoch_step`` (step in
    the epoch), ``t`` (epochs elapsed, fractional), ``progress`` = ``t / total_epochs`` in
    [0, 1], ``eps`` (scheduled training eps), ``eps_target`` (its final value), ``lr``, and
    ``values``: the current value of each named schedule the objective declared.

    In a staged run (``stages:``) ``stage`` is the current stage's index and ``epoch``, ``t``,
    ``progress``, ``total_epochs``, ``eps_target`` are the stage's own (its schedules restart
    at its epoch 0); ``step`` stays global. Unstaged runs have ``stage == 0``.
    """

    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    steps_per_epoch: int = 1
    total_epochs: int = 1
    t: float = 0.0
    progress: float = 0.0
    eps: float = 0.0
    eps_target: float = 0.0
    lr: float = 0.0
    values: dict[str, float] = field(default_factory=dict)
    stage: int = 0

    def value(self, name: str) -> float:
        """Current value of the named schedule ``name`` (one-line error if not declared)."""
        if name not in self.values:
            raise CertorchError(f"schedule {name!r} is not declared; declared: {', '.join(sorted(self.values)) or 'none'}")
        return self.values[name]


@dataclass
class LossOutput:
    """Result of an objective on one batch.

    ``loss``: scalar tensor to minimize. ``metrics``: named numbers to log (floats or
    scalar tensors, averaged over the epoch by the trainer). ``logits``: optional (B, K)
    clean logits, from which the trainer computes training accuracy for free.
    """

    loss: Tensor
    metrics: dict[str, float | Tensor] = field(default_factory=dict)
    logits: Tensor | None = None


@dataclass(kw_only=True)
class NoParams:
    """Parameters of an objective that takes none."""


class Objective:
    """Base class of training objectives; subclasses implement :meth:`loss`.

    Construct with a validated parameter object (``cls.Params``) or its keyword
    arguments; :func:`build_objective` builds from a config mapping. ``__call__`` is final:
    it calls :meth:`loss`, adds :meth:`regularizer` and checks the result.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            raise TypeError(f"{cls.__name__} must not override Objective.__call__; implement loss() instead")

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise CertorchError("give either a Params object or keyword arguments, not both")
        if params is None:
            try:
                params = self.Params(**kwargs)
            except TypeError as e:
                raise CertorchError(f"bad parameters for objective {self.name!r}: {e}") from None
        elif not isinstance(params, self.Params):
            raise CertorchError(f"objective {self.name!r} expects {self.Params.__name__}, got {type(params).__name__}")
        self.params = params

    # ------------------------------------------------------------------ hooks
    def schedules(self) -> dict[str, ScheduleConfig]:
        """Named scalar schedules this objective reads from ``state.values`` (default: none)."""
        return {}

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override for per-group weight decay.

        Default: one group of all trainable parameters with ``weight_decay``.
        """
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def regularizer(self, model: nn.Module, state: TrainState) -> Tensor | None:
        """A scalar added to every training loss (logged as ``reg``); default none."""
        return None

    def eval_metrics(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> dict[str, float]:
        """Extra per-epoch evaluation numbers on a held-out batch (e.g. verified accuracy)."""
        return {}

    def check(self, cfg: Any) -> None:
        """Validate the parameters against the whole run's config (e.g. a sample size against
        ``cfg.batch_size``); called when the trainer is built, before anything is written."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state that changes during training (default: none). Saved in
        every checkpoint; numeric entries not starting with ``_`` are logged in each epoch's record."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (from a checkpoint, on ``--resume``)."""
        if state:
            raise CertorchError(f"objective {self.name!r} keeps no state, but the checkpoint has {sorted(state)}")

    def after_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Called after epoch ``epoch`` (1-based) with its record (training metrics and, when
        the epoch was evaluated, the held-out metrics such as ``nat_acc``); updates state."""

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        """The training loss on batch ``x`` (B, C, H, W), ``y`` (B,) at radius ``eps``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ entry point
    @final
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        out = self.loss(model, x, y, eps, state)
        if not isinstance(out, LossOutput):
            raise TypeError(f"objective {self.name!r} must return LossOutput, got {type(out).__name__}")
        if out.loss.dim() != 0:
            raise TypeError(f"objective {self.name!r} must return a scalar loss, got shape {tuple(out.loss.shape)}")
        reg = self.regularizer(model, state)
        if reg is not None:
            out = LossOutput(out.loss + reg, {**out.metrics, "reg": reg.detach()}, out.logits)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


# ---------------------------------------------------------------------- registry
_OBJECTIVES: dict[str, type[Objective]] = {}
O = TypeVar("O", bound=type[Objective])


def register_objective(name: str) -> Callable[[O], O]:
    """Class decorator registering an :class:`Objective` subclass under ``name``."""

    def deco(cls: O) -> O:
        old = _OBJECTIVES.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise CertorchError(f"objective {name!r} is already registered by {old.__module__}")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"{cls.__name__}.Params must be a dataclass")
        cls.name = name
        _OBJECTIVES[name] = cls
        return cls

    return deco


def list_objectives() -> list[str]:
    """Sorted names of the registered objectives (training methods)."""
    return sorted(_OBJECTIVES)


def objective_class(name: str) -> type[Objective]:
    """The class registered as ``name``; one-line error listing valid names otherwise."""
    if name not in _OBJECTIVES:
        raise CertorchError(f"unknown method {name!r}; valid: {', '.join(list_objectives())}")
    return _OBJECTIVES[name]


def build_objective(name: str, params: dict[str, Any] | None = None, where: str = "method.params") -> Objective:
    """Instantiate objective ``name`` from a config mapping, validated by its ``Params``.

    Unknown keys, wrong types and bad values raise :class:`CertorchError` naming the key
    (prefixed with ``where``).
    """
    cls = objective_class(name)
    return cls(from_dict(cls.Params, params or {}, where))


def objective_help(name: str) -> str:
    """First docstring line of objective ``name``."""
    doc = (objective_class(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
