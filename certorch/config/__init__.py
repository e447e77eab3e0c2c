"""Typed, validated configuration: dataclasses from YAML plus dotted ``key=value`` overrides."""
from certorch.config.schema import (
    CheckpointConfig,
    DataConfig,
    EpsConfig,
    EvalConfig,
    LRScheduleConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
    config_to_yaml,
    load_config,
    read_yaml,
)
from certorch.config.typed import apply_overrides, from_dict, parse_override, to_dict

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EpsConfig",
    "EvalConfig",
    "LRScheduleConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_yaml",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "to_dict",
]
