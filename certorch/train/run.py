"""Open a finished (or running) run: the resolver used by ``attack``, ``certify``, ``report``.

    run = load_run("runs/digits_demo-20250101-120000")   # or a ckpt-*.safetensors file
    run.model(x)                                          # eval mode, on the requested device
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certorch.config.schema import TrainConfig, config_from_dict
from certorch.errors import CertorchError
from certorch.train.checkpoint import CKPT_DIR, Checkpoint, load_checkpoint, load_weights_into, resolve_checkpoint

__all__ = ["LoadedRun", "load_run", "load_model", "run_dir_of"]


@dataclass
class LoadedRun:
    """A model rebuilt from a checkpoint, with its config and metadata."""

    model: nn.Module
    config: TrainConfig
    checkpoint: Checkpoint
    run_dir: Path | None

    @property
    def epoch(self) -> int:
        return self.checkpoint.epoch


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory that holds the checkpoint resolved from ``path`` (``None`` if loose)."""
    weights = resolve_checkpoint(path)
    folder = weights.parent
    if folder.name == CKPT_DIR:
        return folder.parent
    return folder if (folder / "config.yaml").is_file() else None


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Resolve ``path`` (run directory or checkpoint file), rebuild the model from the
    checkpoint's config and load its weights (hash-checked); the model is in eval mode."""
    from certorch.models import build

    c = load_checkpoint(path)
    if not c.config:
        raise CertorchError(f"checkpoint {c.path} has no config in its .json; cannot rebuild the model")
    try:
        cfg = config_from_dict(c.config)
    except CertorchError as e:
        raise CertorchError(f"corrupt config in checkpoint {c.path}: {e}") from None
    model = build(cfg.model.name, dataset=cfg.data.dataset, **cfg.model.kwargs)
    load_weights_into(model, c.weights, c.path)
    model.to(device).eval()
    return LoadedRun(model, cfg, c, run_dir_of(path))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Just the model of :func:`load_run`."""
    return load_run(path, device).model


