"""Seeding and the resumable training state as (tensors, JSON) pairs, never pickle.

``capture(...)`` returns a dict of tensors (for safetensors) and a JSON-ready dict that
together hold the optimizer state, every RNG (python, numpy, torch CPU/CUDA, the data
order generator) and the loop counters; ``restore(...)`` puts them back.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

from certorch.errors import CertorchError

__all__ = ["seed_everything", "optimizer_state", "load_optimizer_state", "rng_state", "load_rng_state"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python ``random``, numpy and torch (CPU and CUDA); return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors ``optim.{param_id}.{key}`` and JSON (the rest)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in (meta.get("scalars") or {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = meta.get("param_groups")
    if not isinstance(groups, list):
        raise CertorchError("checkpoint state has no optimizer param_groups")
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CertorchError(f"optimizer state in checkpoint does not fit: {str(e).splitlines()[0]}") from None


def rng_state(data_generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """All RNG states as tensors ``rng.*`` plus JSON."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.data": data_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def load_rng_state(data_generator: torch.Generator, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states restored when present and CUDA is available)."""
    try:
        torch.set_rng_state(tensors["rng.torch"])
        data_generator.set_state(tensors["rng.data"])
        cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
        n = meta["numpy"]
        keys = tensors["rng.numpy"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        p = meta["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CertorchError(f"checkpoint RNG state is incomplete or corrupt: {e}") from None
