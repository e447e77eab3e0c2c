"""Checkpoints: safetensors + JSON, written atomically, never pickled.

One checkpoint of epoch ``e`` in ``RUN/checkpoints/`` is four files sharing the stem
``ckpt-{e:04d}``:

* ``.safetensors``: model weights and buffers (``model.state_dict()``);
* ``.state.safetensors``: tensors of the training state (optimizer moments, RNG states);
* ``.state.json``: the rest of the training state (param groups, python RNG, counters);
* ``.json``: config, epoch, metrics and the sha256 of the three files above. Written
  last, so its presence marks a complete checkpoint; a crash mid-way leaves an
  incomplete checkpoint that is ignored, and the previous one stays usable.

Every file is written to a temporary file in the same directory (``.NAME.XXXXXXXX.tmp``)
and moved into place with ``os.replace``; a process killed mid-write leaves such a file,
which :func:`clean_stale_temporaries` removes (the train command calls it on start and
resume, under the run-directory lock, and :func:`prune_checkpoints` after each save).
Loading verifies the hashes and the types of every metadata field; a corrupt or
inconsistent checkpoint raises a one-line :class:`CertorchError`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from certorch.errors import CertorchError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "save_tensors",
    "load_tensors",
    "Checkpoint",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "resolve_checkpoint",
    "load_checkpoint",
    "load_train_state",
    "clean_stale_temporaries",
]

FORMAT = "certorch-checkpoint"
VERSION = 1
CKPT_DIR = "checkpoints"
_STEM = re.compile(r"^ckpt-(\d+)$")
#: temporaries of :func:`atomic_write_bytes`: ``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")``
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_FILE_KEYS = ("weights", "state", "state_json")
_UMASK = os.umask(0)
os.umask(_UMASK)


# ---------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    If anything fails, the previous content of ``path`` is untouched and the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def clean_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove temporaries left in ``folder`` by :func:`atomic_write_bytes` calls that never
    finished (process killed mid-write); returns the removed paths.

    Only names of the form ``.NAME.XXXXXXXX.tmp`` (this module's own pattern) are touched, and
    only directly in ``folder``. Call it only while no other process writes into ``folder``
    (the train command holds the run-directory lock when it does).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        if _TEMP.match(f.name) and f.is_file() and not f.is_symlink():
            try:
                f.unlink()
                removed.append(f)
            except FileNotFoundError:
                pass
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, Tensor]) -> str:
    """Write ``tensors`` (moved to CPU, made contiguous) as safetensors atomically; return sha256."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = st_save(flat)
    atomic_write_bytes(path, data)
    return _sha256(data)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertorchError(f"{what} not found: {path}") from None
    except OSError as e:
        raise CertorchError(f"cannot read {what} {path}: {e.strerror}") from None


def load_tensors(path: str | Path, expected_sha256: str | None = None) -> dict[str, Tensor]:
    """Read a safetensors file (CPU tensors); a corrupt file or hash mismatch raises one line."""
    path = Path(path)
    data = _read(path, "checkpoint file")
    if expected_sha256 is not None and _sha256(data) != expected_sha256:
        raise CertorchError(f"corrupt checkpoint: {path} does not match the hash recorded in its .json")
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises several types on bad headers
        raise CertorchError(f"corrupt checkpoint file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _parse_json(data: bytes, what: str, path: Path) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        msg = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CertorchError(f"corrupt {what} {path}: {msg}") from None


def _load_json(path: Path, what: str) -> dict[str, Any]:
    obj = _parse_json(_read(path, what), what, path)
    if not isinstance(obj, dict):
        raise CertorchError(f"corrupt {what} {path}: expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _plain_name(v: Any) -> bool:
    """A file name inside the checkpoint folder (no path separators, not a dot entry)."""
    return isinstance(v, str) and bool(v) and v not in (".", "..") and "/" not in v and "\\" not in v and "\0" not in v


def check_meta(meta: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """Validate the types of a checkpoint's ``.json`` (written by :func:`save_checkpoint`).

    ``format``/``version`` must name this format; ``epoch`` an integer >= 0; ``config`` and
    ``metrics`` objects; ``files`` plain file names in the same folder; ``sha256`` an object
    of 64-digit hex strings with at least the weights' hash. Returns ``meta``; raises one line.
    """
    def bad(msg: str) -> CertorchError:
        return CertorchError(f"corrupt checkpoint metadata {where}: {msg}")

    if meta.get("format") != FORMAT:
        raise CertorchError(f"{where} is not a certorch checkpoint (format={meta.get('format')!r})")
    version = meta.get("version")
    if not _is_int(version) or not 1 <= version <= VERSION:
        raise bad(f"'version' must be an integer in 1..{VERSION}, got {version!r}")
    epoch = meta.get("epoch")
    if not _is_int(epoch) or epoch < 0:
        raise bad(f"'epoch' must be an integer >= 0, got {_json_type(epoch) if not _is_int(epoch) else epoch}")
    for key in ("config", "metrics"):
        if not isinstance(meta.get(key), dict):
            raise bad(f"{key!r} must be an object, got {_json_type(meta.get(key))}")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and _plain_name(v) for k, v in files.items()):
        raise bad("'files' must be an object of file names in the checkpoint folder")
    sha = meta.get("sha256")
    if not isinstance(sha, dict) or not all(isinstance(v, str) and _SHA.match(v) for v in sha.values()):
        raise bad("'sha256' must be an object of sha256 hex digests")
    if "weights" not in sha:
        raise bad("no sha256 of the weights")
    return meta


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """A loaded checkpoint: ``weights`` (CPU state dict) and ``meta`` (its JSON)."""

    path: Path  # the weights file (.safetensors)
    weights: dict[str, Tensor]
    meta: dict[str, Any]

    @property
    def epoch(self) -> int:
        e = self.meta.get("epoch", 0)
        return e if _is_int(e) else 0

    @property
    def config(self) -> dict[str, Any]:
        c = self.meta.get("config")
        return dict(c) if isinstance(c, dict) else {}

    @property
    def metrics(self) -> dict[str, Any]:
        m = self.meta.get("metrics")
        return dict(m) if isinstance(m, dict) else {}


def _paths(folder: Path, stem: str) -> dict[str, Path]:
    return {
        "weights": folder / f"{stem}.safetensors",
        "state": folder / f"{stem}.state.safetensors",
        "state_json": folder / f"{stem}.state.json",
        "meta": folder / f"{stem}.json",
    }


def save_checkpoint(
    folder: str | Path,
    epoch: int,
    model: nn.Module,
    config: dict[str, Any],
    metrics: dict[str, Any],
    state_tensors: dict[str, Tensor] | None = None,
    state_json: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``ckpt-{epoch:04d}`` into ``folder``; return the weights path.

    The ``.json`` holding config/epoch/metrics and the file hashes is written last.
    """
    folder = Path(folder)
    p = _paths(folder, f"ckpt-{epoch:04d}")
    hashes = {"weights": save_tensors(p["weights"], dict(model.state_dict()))}
    hashes["state"] = save_tensors(p["state"], state_tensors or {})
    sj = _json_bytes(state_json or {})
    atomic_write_bytes(p["state_json"], sj)
    hashes["state_json"] = _sha256(sj)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": int(epoch),
        "config": config,
        "metrics": metrics,
        "files": {k: v.name for k, v in p.items() if k != "meta"},
        "sha256": hashes,
    }
    atomic_write_bytes(p["meta"], _json_bytes(meta))
    return p["weights"]


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Weights paths of the complete checkpoints (those with their ``.json``), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for meta in folder.glob("ckpt-*.json"):
        stem = meta.name[: -len(".json")]
        m = _STEM.match(stem)
        if m and (folder / f"{stem}.safetensors").is_file():
            found.append((int(m.group(1)), folder / f"{stem}.safetensors"))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` or ``None``."""
    ckpts = list_checkpoints(folder)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(folder: str | Path, keep: int, milestones: frozenset[int] = frozenset()) -> None:
    """Delete all but the newest ``keep`` complete checkpoints and those of the epochs in
    ``milestones`` (a staged run's stage ends), leftovers of older incomplete ones and stale
    temporaries of killed writes (called by the single writer after each save)."""
    folder = Path(folder)
    clean_stale_temporaries(folder)
    ckpts = list_checkpoints(folder)
    if not ckpts:
        return
    complete = [p.name[: -len(".safetensors")] for p in ckpts]
    newest = int(_STEM.match(complete[-1]).group(1))
    doomed = {c for c in complete[: max(len(complete) - keep, 0)] if int(_STEM.match(c).group(1)) not in milestones}
    for f in folder.glob("ckpt-*"):
        stem = f.name.split(".", 1)[0]
        m = _STEM.match(stem)
        if m and stem not in complete and int(m.group(1)) < newest:
            doomed.add(stem)
    for stem in sorted(doomed):
        p = _paths(folder, stem)
        p["meta"].unlink(missing_ok=True)  # first: a half-deleted checkpoint is never "complete"
        for key in ("weights", "state", "state_json"):
            p[key].unlink(missing_ok=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """Weights file of a checkpoint given a run directory, a checkpoints folder, a
    ``.safetensors`` weights file or its ``.json``. A run directory resolves to its newest
    complete checkpoint. Raises a one-line error when nothing usable is found."""
    p = Path(path)
    if p.is_dir():
        for folder in (p / CKPT_DIR, p):
            found = latest_checkpoint(folder)
            if found is not None:
                return found
        raise CertorchError(f"no checkpoint found in {p} (expected {p / CKPT_DIR}/ckpt-*.safetensors)")
    if not p.exists():
        raise CertorchError(f"run directory or checkpoint not found: {p}")
    name = p.name
    if name.endswith(".state.safetensors") or name.endswith(".state.json"):
        stem = name.split(".", 1)[0]
        return p.with_name(f"{stem}.safetensors")
    if name.endswith(".json"):
        return p.with_name(name[: -len(".json")] + ".safetensors")
    if name.endswith(".safetensors"):
        return p
    raise CertorchError(f"not a run directory or checkpoint file: {p} (expected a folder or a .safetensors file)")


def _meta_path(weights: Path) -> Path:
    return weights.with_name(weights.name[: -len(".safetensors")] + ".json")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load the checkpoint at ``path`` (anything :func:`resolve_checkpoint` accepts).

    The weights are checked against the hash in the ``.json`` when that file exists (a bare
    ``.safetensors`` without ``.json`` loads unchecked, with empty metadata).
    """
    weights_path = resolve_checkpoint(path)
    meta_path = _meta_path(weights_path)
    if meta_path.is_file():
        meta = check_meta(_load_json(meta_path, "checkpoint metadata"), meta_path)
        sha = meta["sha256"]["weights"]
    else:
        meta, sha = {}, None
    weights = load_tensors(weights_path, sha)
    return Checkpoint(weights_path, weights, meta)


def load_train_state(ckpt: Checkpoint) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The training state (tensors, JSON) saved with ``ckpt``, hash-checked and type-checked.

    The JSON must be an object; where present, ``epoch`` is an integer >= 0 equal to the
    checkpoint's, ``seconds`` a finite number >= 0, ``base_lrs`` a list of finite numbers,
    ``optimizer``/``rng`` objects (their contents are checked when restored, see
    :mod:`certorch.train.state`).
    """
    sha = ckpt.meta.get("sha256")
    files = ckpt.meta.get("files")
    if not isinstance(files, dict) or "state" not in files or "state_json" not in files:
        raise CertorchError(f"checkpoint {ckpt.path} has no training state to resume from")
    if not isinstance(sha, dict) or "state" not in sha or "state_json" not in sha:
        raise CertorchError(f"corrupt checkpoint metadata {ckpt.path}: no sha256 of the training state")
    folder = ckpt.path.parent
    tensors = load_tensors(folder / files["state"], sha["state"])
    sj_path = folder / files["state_json"]
    raw = _read(sj_path, "checkpoint state")
    if _sha256(raw) != sha["state_json"]:
        raise CertorchError(f"corrupt checkpoint: {sj_path} does not match its recorded hash")
    state = _parse_json(raw, "checkpoint state", sj_path)
    return tensors, _check_state(state, sj_path, ckpt.epoch)


def _check_state(state: Any, where: Path, epoch: int) -> dict[str, Any]:
    def bad(msg: str) -> CertorchError:
        return CertorchError(f"corrupt checkpoint state {where}: {msg}")

    if not isinstance(state, dict):
        raise bad(f"expected a JSON object, got {_json_type(state)}")
    if "epoch" in state and (not _is_int(state["epoch"]) or state["epoch"] != epoch):
        raise bad(f"'epoch' must be the checkpoint's epoch {epoch}, got {state['epoch']!r}")
    if "seconds" in state and (not _is_number(state["seconds"]) or state["seconds"] < 0):
        raise bad(f"'seconds' must be a finite number >= 0, got {state['seconds']!r}")
    lrs = state.get("base_lrs", [])
    if not isinstance(lrs, list) or not all(_is_number(v) for v in lrs):
        raise bad("'base_lrs' must be a list of finite numbers")
    for key in ("optimizer", "rng"):
        if key in state and not isinstance(state[key], dict):
            raise bad(f"{key!r} must be an object, got {_json_type(state[key])}")
    return state


def load_weights_into(model: nn.Module, weights: dict[str, Tensor], source: str | Path = "checkpoint") -> None:
    """``model.load_state_dict(weights, strict=True)`` with a one-line error on mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CertorchError(f"weights in {source} do not fit the model: {what}")
    for k, v in weights.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CertorchError(f"weights in {source} do not fit the model: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
