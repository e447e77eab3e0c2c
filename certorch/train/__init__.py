"""Training: one trainer, many objectives (registered by name), schedules, checkpoints.

    from certorch.config import load_config
    from certorch.train import Trainer
    result = Trainer(load_config("configs/digits_demo.yaml"), run_dir="runs/demo").fit()
"""
from certorch.train.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from certorch.train.objectives import (
    LossOutput,
    Objective,
    TrainState,
    build_objective,
    list_objectives,
    register_objective,
)
from certorch.train.run import load_model, load_run
from certorch.train.trainer import RunResult, Trainer, config_of_run, evaluate, resolve_device

__all__ = [
    "Checkpoint",
    "LossOutput",
    "Objective",
    "RunResult",
    "TrainState",
    "Trainer",
    "build_objective",
    "config_of_run",
    "evaluate",
    "list_objectives",
    "load_checkpoint",
    "load_model",
    "load_run",
    "register_objective",
    "resolve_checkpoint",
    "resolve_device",
]
