"""certorch.data.augment_batch: shape/range preserved, seeded, changes images, correct geometry."""
from __future__ import annotations

import pytest
import torch

from certorch.data import ImageDataset, augment_batch, load, random_crop, random_hflip
from certorch.errors import CertorchError


def batch(c: int = 3, hw: int = 32, n: int = 16) -> torch.Tensor:
    return torch.rand(n, c, hw, hw, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,c,hw", [("cifar10", 3, 32), ("mnist", 1, 28), ("fashion-mnist", 1, 28)])
def test_shape_dtype_range_preserved(name, c, hw):
    x = batch(c, hw)
    y = augment_batch(x, name, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min().item() >= 0.0 and y.max().item() <= 1.0


def test_deterministic_given_seed():
    x = batch()
    a = augment_batch(x, "cifar10", torch.Generator().manual_seed(7))
    b = augment_batch(x, "cifar10", torch.Generator().manual_seed(7))
    c = augment_batch(x, "cifar10", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_changes_images_but_not_input():
    x = batch()
    x0 = x.clone()
    y = augment_batch(x, "cifar10", torch.Generator().manual_seed(0))
    assert torch.equal(x, x0)
    changed = (y != x).flatten(1).any(1)
    assert changed.float().mean().item() > 0.5


def test_crop_is_a_shift_with_zero_fill():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5) + 1
    y = random_crop(x, 2, torch.Generator().manual_seed(3))
    for i in range(2):  # each output equals the zero-padded input at some offset
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, r : r + 5, c : c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(y[i], w) for w in windows)


def test_flip_flips_some_and_only_horizontally():
    x = batch(n=64)
    y = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54


def test_mnist_policy_no_flip_shift_at_most_one():
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    y = augment_batch(x, "mnist", torch.Generator().manual_seed(0))
    assert torch.equal(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # blob fully inside: mass preserved
    rows = y[:, 0].sum(2).nonzero()[:, 1].view(8, -1)[:, 0]
    assert ((rows - 10).abs() <= 1).all()


def test_digits_policy_is_identity_and_overrides_work():
    x = batch(1, 8)
    assert torch.equal(augment_batch(x, "digits", torch.Generator().manual_seed(0)), x)
    assert not torch.equal(augment_batch(x, "digits", torch.Generator().manual_seed(0), padding=1), x)


def test_bad_shape_rejected():
    with pytest.raises(CertorchError, match="expects images"):
        augment_batch(torch.zeros(3, 32, 32), "cifar10")


def test_per_item_augment_is_seeded_and_keeps_stored_images():
    x, y = batch(n=4), torch.arange(4)
    a = ImageDataset(x.clone(), y, name="cifar10", augment=True, seed=3)
    b = ImageDataset(x.clone(), y, name="cifar10", augment=True, seed=3)
    items = [a[i][0] for i in range(4)]
    assert all(torch.equal(u, b[i][0]) for i, u in enumerate(items))
    assert any(not torch.equal(u, x[i]) for i, u in enumerate(items))
    assert torch.equal(a.images, x)  # stored images stay clean


def test_load_accepts_augment_flag():
    ds = load("digits", "test", augment=True, seed=3)
    assert ds.augment and ds[0][0].shape == (1, 8, 8)
