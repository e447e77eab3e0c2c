"""``load(name, split)``: datasets as in-memory float tensors with pixels in ``[0, 1]``."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from certorch.data.dataset import ImageDataset
from certorch.data.formats import read_cifar_batch, read_idx_pair
from certorch.data.locate import find_files
from certorch.data.registry import dataset_info
from certorch.errors import CertorchError

DIGITS_TRAIN_SIZE = 1437  # of 1797; the remaining 360 are the test split
DIGITS_SPLIT_SEED = 0


@lru_cache(maxsize=2)
def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(N, 1, 8, 8)`` float32 in ``[0, 1]`` (pixels / 16) and int64 labels.

    The split is a fixed permutation (``RandomState(0)``): 1437 train, 360 test.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(d.target))
    idx = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
    images = (d.images[idx] / 16.0).astype(np.float32)[:, None]
    labels = d.target[idx].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@lru_cache(maxsize=4)
def _cached_raw(name: str, files: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    del stamps  # part of the cache key only: a changed file is read again
    if name == "cifar10":
        parts = [read_cifar_batch(f) for f in files]
        images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    else:
        images, labels = read_idx_pair(files[0], files[1])
    if labels.size and (labels.min() < 0 or labels.max() >= dataset_info(name).num_classes):
        raise CertorchError(f"corrupt {name} labels in {files[-1]}: values outside 0..{dataset_info(name).num_classes - 1}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def clear_cache() -> None:
    """Drop the decoded arrays kept between :func:`load` calls (keyed by path, mtime and size)."""
    _cached_raw.cache_clear()


def raw_arrays(name: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Undecoded pixels: images ``(N, C, H, W)`` and int64 labels ``(N,)``, read-only and cached.

    Images are uint8 (0..255) for the file-based sets and float32 in ``[0, 1]`` for ``digits``.
    Cheaper than :func:`load` when only labels or statistics are needed (no float copy).
    """
    key = dataset_info(name).name
    if key == "digits":
        images, labels = digits_arrays(split if split in ("train", "test") else _bad_split(split))
        return images, labels
    files = find_files(key, split, data_dir)
    stamps = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _cached_raw(key, tuple(str(f) for f in files), stamps)


def _bad_split(split: str) -> str:
    raise CertorchError(f"unknown split {split!r}; valid: train, test")


def load(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    subset: int | None = None,
    augment: bool = False,
    seed: int = 0,
    download: bool = False,
) -> ImageDataset:
    """Load dataset ``name`` (``mnist``, ``fashion-mnist``, ``cifar10``, ``digits``; aliases accepted).

    Returns an :class:`ImageDataset` whose ``images`` are ``(N, C, H, W)`` float32 in ``[0, 1]`` and
    ``labels`` ``(N,)`` int64. ``subset=n`` keeps the first ``n`` examples. ``augment=True`` makes
    per-item access (``ds[i]``) augmented with a generator seeded by ``seed``; batch loops should
    call :func:`certorch.data.augment_batch` instead. ``download=True`` fetches missing files
    (see :func:`certorch.data.download`) into ``data_dir`` or the default download folder.
    Files are looked for as described in :mod:`certorch.data.locate`.
    """
    info = dataset_info(name)
    if split not in ("train", "test"):
        _bad_split(split)
    if subset is not None and (not isinstance(subset, (int, np.integer)) or isinstance(subset, bool) or subset < 1):
        raise CertorchError(f"subset must be a positive integer, got {subset!r}")
    try:
        images, labels = raw_arrays(info.name, split, data_dir)
    except CertorchError:
        if not download or info.name == "digits":
            raise
        from certorch.data.fetch import download as fetch

        folder = fetch(info.name, data_dir)
        images, labels = raw_arrays(info.name, split, Path(folder))
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    x = torch.from_numpy(images.astype(np.float32))  # a fresh, writable copy
    if images.dtype == np.uint8:
        x.div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    if tuple(x.shape[1:]) != tuple(info.input_shape):
        raise CertorchError(f"{info.name} images have shape {tuple(x.shape[1:])}, expected {tuple(info.input_shape)}")
    return ImageDataset(x, y, name=info.name, split=split, augment=augment, seed=seed)
