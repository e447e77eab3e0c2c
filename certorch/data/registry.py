"""Dataset metadata registry (names, shapes, normalization constants).

Loading lives in the loaders of this package; models read shapes and mean/std from here.
"""
from __future__ import annotations

from dataclasses import dataclass

from certorch.errors import CertorchError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, pixel space [0, 1]
    std: tuple[float, ...]
    description: str = ""


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    DATASETS[info.name] = info
    return info


register_dataset(DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), "MNIST handwritten digits, IDX files"))
register_dataset(DatasetInfo("fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), "Fashion-MNIST, IDX files"))
register_dataset(
    DatasetInfo(
        "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR-10, python pickle batches"
    )
)
register_dataset(
    DatasetInfo("digits", (1, 8, 8), 10, (0.3054,), (0.3759,), "scikit-learn's bundled 8x8 digits (no download needed)")
)

ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar": "cifar10", "cifar-10": "cifar10"}


def dataset_info(name: str) -> DatasetInfo:
    """Metadata for ``name`` (aliases accepted); one-line error listing valid names otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise CertorchError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]
