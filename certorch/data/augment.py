"""Standard training augmentation, batched in tensor code and seeded by a ``torch.Generator``.

Policies (pixel space, zero padding, as in the usual certified-training recipes):

* ``cifar10``: pad 4, random 32x32 crop, random horizontal flip (p = 0.5).
* ``mnist`` / ``fashion-mnist``: pad 1, random 28x28 crop (shift by at most one pixel), no flip.
* ``digits``: none (8x8 images are too small to shift).

Randomness is drawn on the CPU from ``generator`` and then moved to the images' device, so
the result depends only on the seed, not on the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from certorch.data.registry import dataset_info
from certorch.errors import CertorchError

# canonical name -> (crop padding, horizontal flip)
POLICIES: dict[str, tuple[int, bool]] = {
    "cifar10": (4, True),
    "mnist": (1, False),
    "fashion-mnist": (1, False),
    "digits": (0, False),
}


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to ``(H, W)`` at a random offset per image.

    ``images``: ``(B, C, H, W)``; returns the same shape, dtype and device.
    """
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    hp, wp = h + 2 * padding, w + 2 * padding
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(images.device)
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (B, W)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, index).reshape(b, c, h, w)


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image of ``(B, C, H, W)`` left-right with probability ``p``."""
    flip = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def augment_batch(
    images: torch.Tensor,
    dataset_name: str,
    generator: torch.Generator | None = None,
    *,
    padding: int | None = None,
    flip: bool | None = None,
) -> torch.Tensor:
    """Apply the standard augmentation of ``dataset_name`` to a batch ``(B, C, H, W)`` in ``[0, 1]``.

    Returns a new tensor of the same shape/dtype/device, still in ``[0, 1]``. ``padding`` and
    ``flip`` override the dataset's policy. Deterministic given the generator's state.
    """
    if images.dim() != 4:
        raise CertorchError(f"augment_batch expects images (B, C, H, W), got shape {tuple(images.shape)}")
    default_pad, default_flip = POLICIES.get(dataset_info(dataset_name).name, (0, False))
    pad = default_pad if padding is None else int(padding)
    do_flip = default_flip if flip is None else bool(flip)
    if pad < 0:
        raise CertorchError(f"augmentation padding must be >= 0, got {pad}")
    out = random_crop(images, pad, generator)
    if do_flip:
        out = random_hflip(out, generator)
    return out
