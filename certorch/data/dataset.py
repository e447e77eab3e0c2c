"""In-memory image dataset: one float32 tensor of images, one int64 tensor of labels."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from certorch.errors import CertorchError


class ImageDataset(Dataset):
    """``(image, label)`` pairs backed by two tensors.

    Attributes:
        images: ``(N, C, H, W)`` float32, pixels in ``[0, 1]`` (never augmented).
        labels: ``(N,)`` int64 class indices.
        name: canonical dataset name (``"mnist"``, ``"cifar10"``, ...).
        split: ``"train"`` or ``"test"``.
        augment: when true, ``__getitem__`` applies :func:`certorch.data.augment_batch` to the single item.

    Training loops should slice ``images``/``labels`` directly (fast) and call
    :func:`certorch.data.augment_batch` per batch; ``augment`` only affects per-item access (its
    generator is seeded once per dataset object, so DataLoader worker processes would each repeat
    the same stream: prefer batch augmentation in the main process).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        name: str = "",
        split: str = "",
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise CertorchError(
                f"dataset tensors must be images (N,C,H,W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels
        self.name = name
        self.split = split
        self.augment = augment
        self.seed = seed
        self._generator: torch.Generator | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        if self.augment:
            from certorch.data.augment import augment_batch

            if self._generator is None:
                self._generator = torch.Generator().manual_seed(self.seed)
            x = augment_batch(x.unsqueeze(0), self.name, self._generator)[0]
        return x, int(self.labels[index])

    @property
    def num_classes(self) -> int:
        """From the registry when ``name`` is registered, else ``max(label) + 1``."""
        from certorch.data.registry import DATASETS

        if self.name in DATASETS:
            return DATASETS[self.name].num_classes
        return int(self.labels.max().item()) + 1 if len(self) else 0

    def to(self, device: torch.device | str) -> "ImageDataset":
        """A copy whose tensors live on ``device`` (e.g. to batch on the GPU without a DataLoader)."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.name, self.split, self.augment, self.seed)

    def __repr__(self) -> str:
        return f"ImageDataset(name={self.name!r}, split={self.split!r}, images={tuple(self.images.shape)})"
