"""Seeding and the resumable training state as (tensors, JSON) pairs, never pickle.

``capture(...)`` returns a dict of tensors (for safetensors) and a JSON-ready dict that
together hold the optimizer state, every RNG (python, numpy, torch CPU/CUDA, the data
order generator) and the loop counters; ``restore(...)`` puts them back.
"""
from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

from certorch.errors import CertorchError

__all__ = ["seed_everything", "optimizer_state", "load_optimizer_state", "rng_state", "load_rng_state"]


MAX_SEED = 2**63 - 1


def seed_everything(seed: int) -> torch.Generator:
    """Seed python ``random``, numpy and torch (CPU and CUDA); return a CPU generator for data order.

    ``seed``: an integer in ``[0, 2^63 - 1]`` (the config validates this range)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise CertorchError(f"seed must be an integer in [0, 2^63 - 1], got {seed!r}")
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


def _param_id(text: str, n_params: int, what: str) -> int:
    if not text.isdigit() or int(text) >= n_params:
        raise CertorchError(f"optimizer state in checkpoint does not fit: {what} names no parameter of the optimizer")
    return int(text)


def _same_kind(saved: Any, current: Any) -> bool:
    """Whether a saved param-group value has the type of the optimizer's own value."""
    if isinstance(current, bool) or current is None:
        return saved is None or isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(current, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(current) and all(
            _same_kind(s, c) for s, c in zip(saved, current)
        )
    return isinstance(saved, type(current))


def _check_groups(opt: torch.optim.Optimizer, groups: Any) -> list[dict[str, Any]]:
    """Saved param groups with the optimizer's structure: same count, same parameter ids,
    values of the same types (missing keys take the optimizer's current values)."""
    own = opt.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(own) or not all(isinstance(g, dict) for g in groups):
        raise CertorchError(f"optimizer state in checkpoint does not fit: expected {len(own)} param group(s)")
    out = []
    for i, (g, o) in enumerate(zip(groups, own)):
        if g.get("params") != o["params"]:
            raise CertorchError(f"optimizer state in checkpoint does not fit: param group {i} has other parameters")
        merged = dict(o)
        for key, value in g.items():
            if key in o and key != "params" and not _same_kind(value, o[key]):
                raise CertorchError(f"optimizer state in checkpoint is corrupt: param group {i} {key!r} = {value!r}")
            merged[key] = value
        out.append(merged)
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`. The saved state must fit ``opt``: its parameter ids,
    param-group value types, and per-parameter tensors of the parameter's shape (or scalars);
    anything else raises a one-line :class:`CertorchError`."""
    if not isinstance(meta, dict):
        raise CertorchError("checkpoint state: 'optimizer' must be an object")
    groups = _check_groups(opt, meta.get("param_groups"))
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        pid, _, key = name[len("optim."):].partition(".")
        i = _param_id(pid, len(params), f"tensor {name!r}")
        if not key or (value.numel() > 1 and tuple(value.shape) != tuple(params[i].shape)):
            raise CertorchError(f"optimizer state in checkpoint does not fit: {name} has shape {tuple(value.shape)}")
        state.setdefault(i, {})[key] = value
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict):
        raise CertorchError("checkpoint state: optimizer 'scalars' must be an object")
    for name, value in scalars.items():
        pid, _, key = name.partition(".")
        i = _param_id(pid, len(params), f"scalar {name!r}")
        if not key or not (value is None or isinstance(value, (bool, int, float))):
            raise CertorchError(f"optimizer state in checkpoint is corrupt: scalar {name!r} = {value!r}")
        state.setdefault(i, {})[key] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except Exception as e:  # noqa: BLE001  (torch raises several types on a state that does not fit)
        raise CertorchError(f"optimizer state in checkpoint does not fit: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


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
    except Exception as e:  # noqa: BLE001  (outside input: any failure is a corrupt state)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CertorchError(f"checkpoint RNG state is incomplete or corrupt: {first}") from None
