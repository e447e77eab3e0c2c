"""Training configuration: typed dataclasses, loaded from YAML plus ``key=value`` overrides.

Every value is type-checked by :func:`certorch.config.typed.from_dict` and range-checked in
``__post_init__``; unknown keys are rejected naming the dotted key. The method's own
parameters (``method.params``) are a free mapping here and are validated by the
objective's parameter dataclass when the objective is built (before any run directory
is created).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from certorch.config.typed import apply_overrides, check_size, from_dict, to_dict
from certorch.errors import CertorchError, require
from certorch.spec import check_eps

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "LRScheduleConfig",
    "EpsConfig",
    "ScheduleConfig",
    "MethodConfig",
    "EvalConfig",
    "CheckpointConfig",
    "CascadeConfig",
    "StageConfig",
    "ResolvedStage",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "config_to_yaml",
]

MAX_SEED = 2**63 - 1  # torch, numpy (seed mod 2^32) and python's random all accept it
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; refuse megabytes of YAML before parsing


@dataclass
class DataConfig:
    """Dataset and loading options. ``subset``: use only that many training examples."""

    dataset: str = "digits"
    data_dir: str | None = None
    subset: int | None = None
    augment: bool = False
    eval_split: Literal["test", "train"] = "test"

    def __post_init__(self) -> None:
        require(self.subset is None or self.subset >= 1, f"data.subset must be >= 1, got {self.subset}")


@dataclass
class ModelConfig:
    """Registered model name (see ``certorch info``) and extra builder keyword arguments."""

    name: str = "digits_mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimizer. ``momentum``/``nesterov`` apply to sgd, ``betas`` to adam/adamw."""

    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8  # Adam's denominator epsilon (the L_inf-dist paper uses 1e-10)
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        require(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        require(all(0 <= b < 1 for b in self.betas), f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        require(self.adam_eps > 0, f"optim.adam_eps must be > 0, got {self.adam_eps}")
        require(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be > 0, got {self.grad_clip}")


@dataclass
class LRScheduleConfig:
    """Learning-rate schedule, a multiplier on ``optim.lr`` evaluated every step.

    ``constant``; ``step``: multiply by ``gamma`` at each epoch in ``milestones``;
    ``cosine``: cosine decay from ``lr`` to ``min_lr`` over the run (after ``hold_epochs``
    at the full ``lr``, if given); ``warmup``: linear warmup then constant.
    ``warmup_epochs`` (a linear ramp from 0) applies to every kind.
    """

    kind: Literal["constant", "step", "cosine", "warmup"] = "constant"
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    min_lr: float = 0.0
    hold_epochs: float = 0.0

    def __post_init__(self) -> None:
        require(self.hold_epochs >= 0, f"lr_schedule.hold_epochs must be >= 0, got {self.hold_epochs}")
        require(self.warmup_epochs >= 0, f"lr_schedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        require(self.gamma > 0, f"lr_schedule.gamma must be > 0, got {self.gamma}")
        require(self.min_lr >= 0, f"lr_schedule.min_lr must be >= 0, got {self.min_lr}")
        require(
            list(self.milestones) == sorted(self.milestones), f"lr_schedule.milestones must be sorted: {self.milestones}"
        )


_RAMPS = Literal["constant", "linear", "smooth", "exp", "cosine"]


def _check_ramp(where: str, warmup: float | None, ramp: float | None, beta: float, mid: float) -> None:
    require(warmup is None or warmup >= 0, f"{where}.warmup_epochs must be >= 0, got {warmup}")
    require(ramp is None or ramp >= 0, f"{where}.ramp_epochs must be >= 0, got {ramp}")
    require(beta >= 2, f"{where}.beta must be >= 2, got {beta}")
    require(0 <= mid <= 1, f"{where}.mid must be in [0, 1], got {mid}")


@dataclass
class EpsConfig:
    """Training eps and its schedule: ``start`` during ``warmup_epochs``, then a ramp of
    ``ramp_epochs`` to ``value`` (shape ``linear``, or ``smooth``: polynomial of degree
    ``beta`` up to fraction ``mid`` of the ramp, then linear, as in Shi et al. 2021), then
    constant. ``schedule: constant`` uses ``value`` from the first step."""

    value: float = 0.0
    start: float = 0.0
    schedule: Literal["constant", "linear", "smooth"] = "linear"
    warmup_epochs: float = 0.0
    ramp_epochs: float = 0.0
    beta: float = 4.0
    mid: float = 0.25

    def __post_init__(self) -> None:
        try:
            check_eps(self.value)
            check_eps(self.start)
        except CertorchError as e:
            raise CertorchError(f"eps: {e}") from None
        require(self.start <= self.value, f"eps.start ({self.start}) must be <= eps.value ({self.value})")
        _check_ramp("eps", self.warmup_epochs, self.ramp_epochs, self.beta, self.mid)


@dataclass
class ScheduleConfig:
    """A named scalar schedule an objective declares (e.g. a mixing weight kappa 1 -> 0).

    Same ramp as eps, from ``start`` to ``end``; ``kind: exp`` interpolates geometrically
    (both ends > 0; e.g. an L_p exponent 8 -> 1000), ``cosine`` follows a half cosine.
    ``warmup_epochs``/``ramp_epochs`` left null follow the eps schedule's.
    """

    start: float = 1.0
    end: float = 1.0
    kind: _RAMPS = "linear"
    warmup_epochs: float | None = None
    ramp_epochs: float | None = None
    beta: float = 4.0
    mid: float = 0.25

    def __post_init__(self) -> None:
        _check_ramp("schedule", self.warmup_epochs, self.ramp_epochs, self.beta, self.mid)
        if self.kind == "exp":
            require(self.start > 0 and self.end > 0, f"exp schedule needs start, end > 0, got {self.start}, {self.end}")


@dataclass
class MethodConfig:
    """Training objective: a registered name and its parameters (validated by the objective)."""

    name: str = "natural"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Per-epoch evaluation on ``size`` held-out examples: loss, natural and PGD accuracy.

    ``eps`` defaults to ``eps.value`` (the training target); ``size: 0`` skips evaluation.
    """

    size: int = 1000
    eps: float | None = None
    attack: str = "pgd"
    steps: int = 20
    restarts: int = 1
    step_size: float | None = None
    every: int = 1
    batch_size: int = 500

    def __post_init__(self) -> None:
        require(self.size >= 0, f"eval.size must be >= 0, got {self.size}")
        require(self.steps >= 1, f"eval.steps must be >= 1, got {self.steps}")
        require(self.restarts >= 1, f"eval.restarts must be >= 1, got {self.restarts}")
        require(self.every >= 1, f"eval.every must be >= 1, got {self.every}")
        require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.eps is not None:
            try:
                check_eps(self.eps)
            except CertorchError as e:
                raise CertorchError(f"eval.eps: {e}") from None


@dataclass
class CheckpointConfig:
    """Write a checkpoint every ``every`` epochs (and after the last); keep the newest ``keep``
    (and, in a staged run, each stage's last)."""

    every: int = 1
    keep: int = 2

    def __post_init__(self) -> None:
        require(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class CascadeConfig:
    """A cascade of ``stages`` models (Wong et al. 2018, Algorithm 2). Stage k+1 trains (and is
    evaluated) only on the examples stages 1..k cannot certify with bound ``certify`` (exact,
    float64, eval semantics), certified ``batch_size`` examples at a time. ``stages: 1``: no cascade."""

    stages: int = 1
    certify: str = "dual"
    batch_size: int = 256

    def __post_init__(self) -> None:
        require(1 <= self.stages <= 100, f"cascade.stages must be in [1, 100], got {self.stages}")
        require(self.batch_size >= 1, f"cascade.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class StageConfig:
    """One stage of a staged run (COLT-style layerwise training).

    ``epochs`` (>= 1) of training; ``freeze``: the frozen prefix, a module name (every layer
    up to and including it gets no gradient and stays in eval mode, keeping its BatchNorm
    statistics) or an index into the model's layers (leaf modules in order); null: nothing
    frozen. ``optim``, ``lr_schedule`` and ``eps`` are partial mappings over the run's sections
    of the same name; ``params`` overrides keys of ``method.params`` (shallow). Every stage
    starts a fresh optimizer and its own schedules (lr, eps, the objective's) at its epoch 0.
    """

    epochs: int
    name: str | None = None
    freeze: str | int | None = None
    optim: dict[str, Any] = field(default_factory=dict)
    lr_schedule: dict[str, Any] = field(default_factory=dict)
    eps: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.freeze is None or self.freeze != "", "freeze must be a layer name, an index or null")


@dataclass(frozen=True)
class ResolvedStage:
    """A stage with the run's settings filled in: ``start`` is its first (0-based) global epoch."""

    index: int
    name: str
    start: int
    epochs: int
    freeze: str | int | None
    optim: OptimConfig
    lr_schedule: LRScheduleConfig
    eps: EpsConfig
    params: dict[str, Any]

    @property
    def end(self) -> int:
        """One past the stage's last global epoch."""
        return self.start + self.epochs


@dataclass
class TrainConfig:
    """The whole training run. ``name`` defaults to the config file's stem.

    ``threads``: torch intra-op CPU threads (null: torch's default). Tiny models train much
    faster with 1 thread on a busy machine.
    """

    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    epochs: int = 1
    batch_size: int = 128
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    eps: EpsConfig = field(default_factory=EpsConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    stages: list[StageConfig] | None = None

    def __post_init__(self) -> None:
        if self.stages is not None:
            require(len(self.stages) > 0, "stages must not be empty (leave the key out for an unstaged run)")
            require(len(self.stages) <= 1000, f"at most 1000 stages, got {len(self.stages)}")
            self.epochs = sum(st.epochs for st in self.stages)
            require(self.epochs < 2**63, f"the stages' epochs add up to {self.epochs}, beyond 64 bits")
            self.resolved_stages()  # validates every stage's merged sections
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(0 <= self.seed <= MAX_SEED, f"seed must be in [0, 2^63 - 1], got {self.seed}")
        require(self.threads is None or 1 <= self.threads <= 4096, f"threads must be in [1, 4096], got {self.threads}")
        require(bool(self.name) and "/" not in self.name, f"name must be a non-empty file name, got {self.name!r}")

    def resolved_stages(self) -> list[ResolvedStage]:
        """The stages with the run's ``optim`` / ``lr_schedule`` / ``eps`` / ``method.params``
        merged in; a run without ``stages`` is one stage of ``epochs`` with nothing frozen."""
        if not self.stages:
            return [ResolvedStage(0, "0", 0, self.epochs, None, self.optim, self.lr_schedule, self.eps,
                                  dict(self.method.params))]
        out, start = [], 0
        for i, st in enumerate(self.stages):
            where = f"stages[{i}]"
            out.append(ResolvedStage(
                i, st.name if st.name is not None else str(i), start, st.epochs, st.freeze,
                from_dict(OptimConfig, {**to_dict(self.optim), **st.optim}, f"{where}.optim"),
                from_dict(LRScheduleConfig, {**to_dict(self.lr_schedule), **st.lr_schedule}, f"{where}.lr_schedule"),
                from_dict(EpsConfig, {**to_dict(self.eps), **st.eps}, f"{where}.eps"),
                {**self.method.params, **st.params},
            ))
            start += st.epochs
        return out

    @property
    def eval_eps(self) -> float:
        """The eps used by per-epoch evaluation."""
        return self.eval.eps if self.eval.eps is not None else self.eps.value


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested dict plus ``key=value`` overrides."""
    if data is not None and not isinstance(data, dict):
        raise CertorchError("config must be a YAML mapping")
    raw = dict(data or {})
    apply_overrides(raw, overrides)
    check_size(raw)
    cfg = from_dict(TrainConfig, raw)
    if cfg.stages and "epochs" in raw and raw["epochs"] != cfg.epochs:
        raise CertorchError(f"epochs ({raw['epochs']!r}) must equal the sum of the stages' epochs ({cfg.epochs}) "
                            "or be left out")
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file raises a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise CertorchError(f"config file not found: {p}")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise CertorchError(f"config {p} is too large ({p.stat().st_size} bytes; at most {MAX_CONFIG_BYTES})")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, RecursionError):
            first = "nested too deeply"
        raise CertorchError(f"cannot parse config {p}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CertorchError(f"config {p} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load YAML ``path``, apply dotted overrides (``optim.lr=0.01``), validate.

    ``name`` defaults to the file's stem when the file does not set it.
    """
    data = read_yaml(path)
    data.setdefault("name", Path(path).stem)
    return config_from_dict(data, overrides)


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (what each run directory stores)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
