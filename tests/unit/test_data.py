"""certorch.data: loaders on the shared real files (skipped if absent), digits, dir resolution, errors."""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import certorch.data.locate as locate
from certorch.data import dataset_info, load, raw_arrays
from certorch.data.formats import read_cifar_batch, read_idx, write_cifar_batch, write_idx
from certorch.errors import CertorchError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
HAS_MNIST = (SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
HAS_CIFAR = (SHARED / "cifar-10-batches-py" / "test_batch").is_file()
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")

MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def need(flag: bool, what: str) -> None:
    if not flag:
        pytest.skip(f"{what} not available under {SHARED}")


def fake_mnist(folder: Path, n: int = 6, label: int = 0, split: str = "test") -> Path:
    """Write a tiny valid MNIST-format pair with all labels ``label``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "t10k" if split == "test" else "train"
    rng = np.random.default_rng(label)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.full(n, label, dtype=np.uint8))
    return folder


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No CERTORCH_DATA and a single empty well-known dir, so the real machine's files don't leak in."""
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    empty = tmp_path / "well-known-empty"
    monkeypatch.setattr(locate, "well_known_dirs", lambda: [empty])
    return empty


# ---------------------------------------------------------------- real files (shared/datasets)


@pytest.fixture(scope="module")
def mnist():
    need(HAS_MNIST, "MNIST")
    return {s: load("mnist", s, data_dir=SHARED) for s in ("train", "test")}


@pytest.fixture(scope="module")
def cifar_test():
    need(HAS_CIFAR, "CIFAR-10")
    return load("cifar10", "test", data_dir=SHARED)


def test_mnist_counts_and_histograms(mnist):
    assert len(mnist["train"]) == 60000 and len(mnist["test"]) == 10000
    assert torch.bincount(mnist["train"].labels, minlength=10).tolist() == MNIST_TRAIN_HIST
    assert torch.bincount(mnist["test"].labels, minlength=10).tolist() == MNIST_TEST_HIST


def test_mnist_first_labels(mnist):
    assert mnist["train"].labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist["test"].labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_mnist_pixels(mnist):
    x = mnist["train"].images
    assert x.dtype == torch.float32 and x.shape == (60000, 1, 28, 28)
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert x.mean().item() == pytest.approx(0.1307, abs=5e-4)
    assert x.std().item() == pytest.approx(dataset_info("mnist").std[0], abs=5e-4)
    image, label = mnist["test"][0]
    assert image.shape == (1, 28, 28) and label == 7 and isinstance(label, int)


def test_mnist_subset_is_prefix(mnist):
    sub = load("mnist", "test", data_dir=SHARED, subset=100)
    assert len(sub) == 100
    assert torch.equal(sub.images, mnist["test"].images[:100])
    assert torch.equal(sub.labels, mnist["test"].labels[:100])


def test_cifar_test_split(cifar_test):
    assert cifar_test.images.shape == (10000, 3, 32, 32)
    assert cifar_test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(cifar_test.labels).tolist() == [1000] * 10
    assert 0.0 <= cifar_test.images.min().item() and cifar_test.images.max().item() <= 1.0


def test_cifar_train_counts_and_channel_means():
    need(HAS_CIFAR, "CIFAR-10")
    images, labels = raw_arrays("cifar10", "train", data_dir=SHARED)  # uint8, no float copy
    assert images.shape == (50000, 3, 32, 32) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [5000] * 10
    assert labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    means = images.mean(axis=(0, 2, 3)) / 255.0
    np.testing.assert_allclose(means, dataset_info("cifar10").mean, atol=2e-4)


@pytest.mark.slow
def test_cifar_full_train_load():
    need(HAS_CIFAR, "CIFAR-10")
    ds = load("cifar", "train", data_dir=SHARED)
    assert ds.images.shape == (50000, 3, 32, 32) and ds.images.dtype == torch.float32
    np.testing.assert_allclose(ds.images.mean(dim=(0, 2, 3)).numpy(), (0.4914, 0.4822, 0.4465), atol=2e-4)


def test_debian_fashion_mnist():
    if not (DEBIAN_FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    ds = load("fashion-mnist", "test", data_dir="/usr/share/datasets")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.labels[:5].tolist() == [9, 2, 1, 1, 6]


# ---------------------------------------------------------------- digits (offline)


def test_digits_offline_split():
    train, test = load("digits", "train"), load("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.min().item() == 0.0 and train.images.max().item() == 1.0
    assert set(train.labels.tolist()) == set(range(10))
    info = dataset_info("digits")
    assert train.images.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert train.images.std().item() == pytest.approx(info.std[0], abs=1e-3)


def test_digits_deterministic_and_disjoint():
    a, b = load("digits", "train"), load("digits", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    a.images[0] += 1.0  # returned tensors are private copies
    assert not torch.equal(a.images, load("digits", "train").images)
    from sklearn.datasets import load_digits

    assert len(load("digits", "train")) + len(load("digits", "test")) == len(load_digits().target)


def test_unknown_name_and_split():
    with pytest.raises(CertorchError, match="unknown dataset"):
        load("imagenet")
    with pytest.raises(CertorchError, match="unknown split"):
        load("digits", "val")
    with pytest.raises(CertorchError, match="subset"):
        load("digits", subset=0)


# ---------------------------------------------------------------- data-dir resolution


def test_argument_wins_over_env(monkeypatch, tmp_path, no_env):
    monkeypatch.setenv(locate.ENV_VAR, str(fake_mnist(tmp_path / "env" / "mnist", label=1).parent))
    arg = fake_mnist(tmp_path / "arg" / "mnist", label=2).parent
    assert load("mnist", "test", data_dir=arg).labels.tolist() == [2] * 6
    assert load("mnist", "test").labels.tolist() == [1] * 6


def test_env_wins_over_well_known(monkeypatch, tmp_path):
    known = fake_mnist(tmp_path / "known" / "mnist", label=3).parent
    monkeypatch.setattr(locate, "well_known_dirs", lambda: [known])
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    assert load("mnist", "test").labels.tolist() == [3] * 6
    monkeypatch.setenv(locate.ENV_VAR, str(fake_mnist(tmp_path / "env" / "mnist", label=4).parent))
    assert load("mnist", "test").labels.tolist() == [4] * 6


def test_env_falls_back_to_well_known(monkeypatch, tmp_path):
    known = fake_mnist(tmp_path / "known" / "mnist", label=5).parent
    monkeypatch.setattr(locate, "well_known_dirs", lambda: [known])
    monkeypatch.setenv(locate.ENV_VAR, str(tmp_path / "empty"))
    assert load("mnist", "test").labels.tolist() == [5] * 6


def test_well_known_places_cover_shared_and_debian():
    dirs = [os.path.normpath(d) for d in locate.well_known_dirs()]
    assert os.path.normpath(locate.REPO_ROOT.parent / "shared" / "datasets") in dirs
    assert os.path.normpath(Path.cwd().parent / "shared" / "datasets") in dirs
    assert "/usr/share/datasets" in dirs


@pytest.mark.parametrize("sub", ["mnist", "MNIST/raw"])
def test_layouts_in_subfolders(tmp_path, sub, no_env):
    fake_mnist(tmp_path / sub, label=6)
    assert load("mnist", "test", data_dir=tmp_path).labels.tolist() == [6] * 6


def test_files_directly_in_explicit_dir_and_uncompressed(tmp_path, no_env):
    fake_mnist(tmp_path, label=7)
    for f in tmp_path.glob("*.gz"):  # raw IDX works too
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    assert load("mnist", "test", data_dir=tmp_path).labels.tolist() == [7] * 6


def test_mnist_files_in_generic_root_not_taken_for_fashion(monkeypatch, tmp_path, no_env):
    monkeypatch.setenv(locate.ENV_VAR, str(fake_mnist(tmp_path / "generic", label=8)))
    with pytest.raises(CertorchError, match="fashion-mnist test files"):
        load("fashion-mnist", "test")
    monkeypatch.setenv(locate.ENV_VAR, str(fake_mnist(tmp_path / "fashion-mnist", label=8)))
    assert load("fmnist", "test").labels.tolist() == [8] * 6


def test_missing_data_error_is_one_line_with_places_and_hint(monkeypatch, tmp_path, no_env):
    monkeypatch.setenv(locate.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(CertorchError) as err:
        load("mnist", "train")
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "nowhere") in msg and str(no_env) in msg
    assert "download" in msg and "CERTORCH_DATA" in msg
    with pytest.raises(CertorchError, match="apt-get install dataset-fashion-mnist"):
        load("fashion-mnist", "test")


# ---------------------------------------------------------------- corrupt files


def test_idx_wrong_magic(tmp_path):
    path = write_idx(tmp_path / "labels.gz", np.arange(5, dtype=np.uint8))
    with pytest.raises(CertorchError, match="magic number 2049, expected 2051"):
        read_idx(path, 2051)


def test_idx_truncated_payload(tmp_path, no_env):
    folder = fake_mnist(tmp_path / "mnist")
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(CertorchError, match=r"corrupt IDX file .*t10k-images"):
        load("mnist", "test", data_dir=tmp_path)


def test_idx_bad_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(CertorchError, match="corrupt gzip"):
        read_idx(path, 2051)


def test_idx_image_label_count_mismatch(tmp_path, no_env):
    folder = fake_mnist(tmp_path / "mnist", n=6)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(CertorchError, match="6 images .* 5 labels"):
        load("mnist", "test", data_dir=tmp_path)


# ---------------------------------------------------------------- CIFAR pickle format


def test_cifar_format_roundtrip(tmp_path, no_env):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", images, [3, 1, 4, 1])
    ds = load("cifar10", "test", data_dir=tmp_path)
    assert ds.labels.tolist() == [3, 1, 4, 1]
    assert torch.equal(ds.images, torch.from_numpy(images).float() / 255)


def test_cifar_pickle_with_foreign_global_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(CertorchError, match="not allowed"):
        read_cifar_batch(path)


def test_cifar_batch_wrong_shape(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(CertorchError, match="corrupt CIFAR batch"):
        read_cifar_batch(path)


def test_labels_out_of_range_rejected(tmp_path, no_env):
    folder = fake_mnist(tmp_path / "mnist", n=3)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 10], dtype=np.uint8))
    with pytest.raises(CertorchError, match="outside 0..9"):
        load("mnist", "test", data_dir=tmp_path)


def test_docs_example_runs():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/data.md", "exec"), {})


def test_cifar_pickle_claiming_2_40_bytes_is_refused_before_allocating(tmp_path):
    """21 bytes: PROTO 4, BINBYTES8 with length 2^40, 10 bytes of payload (was a MemoryError)."""
    import struct

    p = tmp_path / "data_batch_1"
    p.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"0123456789")
    assert p.stat().st_size == 21
    with pytest.raises(CertorchError, match="corrupt pickle file") as e:
        read_cifar_batch(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("labels", [[b"x"] * 2, [10**30, 1], "ab", [1.5, 2.0], None])
def test_cifar_labels_of_wrong_type_rejected(tmp_path, labels):
    p = tmp_path / "test_batch"
    with open(p, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, f, protocol=2)
    with pytest.raises(CertorchError, match="corrupt CIFAR batch"):
        read_cifar_batch(p)


def test_idx_header_whose_size_overflows_int64_rejected(tmp_path):
    """Dimensions whose product wraps around in int64 must not slip past the size check."""
    p = tmp_path / "x.idx"
    dims = [769546, 494770, 48448661]  # product 2^64 + 4: wraps to 4 in int64
    p.write_bytes((2051).to_bytes(4, "big") + np.asarray(dims, ">u4").tobytes() + b"\x00" * 4)
    with pytest.raises(CertorchError, match="header says"):
        read_idx(p, 2051)


def test_idx_gzip_bomb_stops_at_the_limit(tmp_path, monkeypatch):
    import certorch.data.formats as fmt

    monkeypatch.setattr(fmt, "MAX_DECOMPRESSED", 10_000)
    p = tmp_path / "bomb-idx1-ubyte.gz"
    p.write_bytes(gzip.compress((2049).to_bytes(4, "big") + (100_000).to_bytes(4, "big") + bytes(100_000)))
    with pytest.raises(CertorchError, match="decompresses to more than 10000 bytes"):
        read_idx(p, 2049)


def test_idx_multi_member_gzip_still_reads(tmp_path):
    p = tmp_path / "labels-idx1-ubyte.gz"
    payload = (2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    p.write_bytes(gzip.compress(payload[:5]) + gzip.compress(payload[5:]))
    assert read_idx(p, 2049).tolist() == [1, 2, 3]
