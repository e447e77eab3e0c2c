"""Training objectives (methods), registered by name.

To add one: write ``certorch/train/objectives/<name>.py`` with a registered
:class:`~certorch.train.objectives.base.Objective` subclass and add one import line below.
"""
from certorch.train.objectives.base import (
    LossOutput,
    NoParams,
    Objective,
    TrainState,
    build_objective,
    list_objectives,
    objective_class,
    objective_help,
    register_objective,
)

# Objective modules (imported for their registration side effect). One line per method.
from certorch.train.objectives import natural  # noqa: E402,F401
from certorch.train.objectives import pgd  # noqa: E402,F401
from certorch.train.objectives import linf_dist  # noqa: E402,F401
from certorch.train.objectives import certified  # noqa: E402,F401
from certorch.train.objectives import mixtrain  # noqa: E402,F401
from certorch.train.objectives import colt  # noqa: E402,F401

__all__ = [
    "LossOutput",
    "NoParams",
    "Objective",
    "TrainState",
    "build_objective",
    "list_objectives",
    "objective_class",
    "objective_help",
    "register_objective",
]
