"""Open a finished (or running) run: the resolver used by ``attack``, ``certify``, ``report``;
and the run-directory lock that keeps two trainings out of one directory.

    run = load_run("runs/digits_demo-20250101-120000")   # or a ckpt-*.safetensors file
    run.model(x)                                          # eval mode, on the requested device

    with lock_run_dir("runs/try"):                        # what `certorch train` does
        Trainer(cfg, "runs/try").fit()
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certorch.config.schema import TrainConfig, config_from_dict
from certorch.errors import CertorchError
from certorch.train.checkpoint import CKPT_DIR, Checkpoint, load_checkpoint, load_weights_into, resolve_checkpoint

__all__ = ["LoadedRun", "load_run", "load_model", "run_dir_of", "lock_run_dir", "run_lock_path"]


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




# ---------------------------------------------------------------------------- run-directory lock
def run_lock_path(run_dir: str | Path) -> Path:
    """The lock file of ``run_dir``: ``.NAME.lock`` beside it (not inside, so a fresh run
    directory stays empty until the trainer writes into it)."""
    p = Path(run_dir).resolve()
    return p.with_name(f".{p.name or 'root'}.lock")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "unknown process"


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` for the block (``fcntl.flock`` on
    :func:`run_lock_path`, which records ``pid=... host=...``).

    A second holder gets a one-line :class:`CertorchError` naming the first. The kernel drops
    the lock when its process dies, so a lock file left by a killed run never blocks. The
    file is removed on exit; a holder that opened it just before removal notices (the path no
    longer names its file) and retries. Without ``fcntl`` (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield run_lock_path(run_dir)
        return
    path = run_lock_path(run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CertorchError(f"cannot create run directory {run_dir}: a parent path is not a directory") from None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise CertorchError(
                f"run directory {run_dir} is in use by another certorch run ({holder}); wait for it to finish or use another --out"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock
    try:
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={stamp}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding the lock (see docstring)
        os.close(fd)
