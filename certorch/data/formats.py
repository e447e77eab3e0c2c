"""Readers for the standard on-disk formats, decoded whole with numpy (no per-item loops).

* MNIST / Fashion-MNIST: IDX files (gzip-compressed or raw), big-endian header,
  magic 2051 for images (N, 28, 28) and 2049 for labels (N,).
* CIFAR-10: python pickle batches (``data_batch_1..5``, ``test_batch``), each a dict with
  ``data`` (10000, 3072) uint8 (R, G, B planes row-major) and ``labels`` (list of ints).
  They are read with a restricted unpickler that can only rebuild plain numpy arrays, so a
  malicious file cannot run code; still, only read dataset files from sources you trust.
"""
from __future__ import annotations

import gzip
import io
import math
import pickle
import pickletools
import zlib
from pathlib import Path

import numpy as np

from certorch.errors import CertorchError

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
#: largest decompressed IDX file accepted (MNIST's biggest is 47 MB); a gzip bomb stops here
MAX_DECOMPRESSED = 1 << 31


def _read_raw(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CertorchError(f"cannot read {path}: {e.strerror or e}") from None


def _gunzip(raw: bytes, path: Path, limit: int | None = None) -> bytes:
    """Decompress gzip ``raw`` (all members), refusing output beyond ``limit`` bytes
    (default :data:`MAX_DECOMPRESSED`)."""
    limit = MAX_DECOMPRESSED if limit is None else limit
    out = io.BytesIO()
    try:
        while raw:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            chunk = d.decompress(raw, limit + 1 - out.tell())
            out.write(chunk)
            if out.tell() > limit or d.unconsumed_tail:
                raise CertorchError(f"corrupt gzip file {path}: decompresses to more than {limit} bytes")
            if not d.eof:
                raise CertorchError(f"corrupt gzip file {path}: truncated")
            raw = d.unused_data.lstrip(b"\x00")  # next member (gzip allows concatenation; skip padding)
    except zlib.error as e:
        raise CertorchError(f"corrupt gzip file {path}: {e}") from None
    return out.getvalue()


def _read_bytes(path: Path) -> bytes:
    raw = _read_raw(path)
    return _gunzip(raw, path) if raw[:2] == b"\x1f\x8b" else raw


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Decode an IDX file (``.gz`` or raw) into a uint8 array of the shape its header states.

    ``magic`` is the expected header value (2051 images, 2049 labels); a wrong magic, a
    truncated payload or trailing bytes raise :class:`CertorchError`.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 8:
        raise CertorchError(f"corrupt IDX file {path}: only {len(data)} bytes")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise CertorchError(f"corrupt IDX file {path}: magic number {found}, expected {magic}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CertorchError(f"corrupt IDX file {path}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape)  # exact (python ints): a header cannot overflow its way past the check
    if len(data) - header != expected:
        raise CertorchError(
            f"corrupt IDX file {path}: header says {shape} ({expected} bytes) but {len(data) - header} bytes follow"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 1, H, W)`` uint8 and labels ``(N,)`` int64 from an MNIST-style IDX pair."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise CertorchError(f"corrupt IDX file {images_path}: expected 3 dimensions (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise CertorchError(f"corrupt IDX file {labels_path}: expected 1 dimension (N,), got {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise CertorchError(f"IDX files disagree: {images.shape[0]} images in {images_path}, {labels.shape[0]} labels in {labels_path}")
    return images[:, None], labels.astype(np.int64)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays/dtypes (plus builtin containers and scalars)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")
        if module.startswith("numpy") and name in ("_reconstruct", "scalar"):
            try:
                from numpy._core import multiarray  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core import multiarray
            return getattr(multiarray, name)
        return super().find_class(module, name)


def _check_opcodes(data: bytes, path: Path) -> None:
    """Walk the pickle's opcodes without executing them: every length field is checked against
    the bytes actually present (``pickletools`` reads from memory and never allocates what a
    length claims), so a 21-byte file claiming a 2^40-byte string is refused before the
    unpickler would try to allocate it."""
    try:
        for _op, _arg, _pos in pickletools.genops(data):
            pass
    except Exception as e:  # noqa: BLE001  (ValueError on truncation/bad opcodes, others on garbage)
        raise CertorchError(f"corrupt pickle file {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def load_pickle(path: str | Path) -> object:
    """Unpickle a trusted-format dataset file allowing only numpy arrays (``encoding="bytes"``).

    The opcodes are checked against the file's size first (:func:`_check_opcodes`); any
    failure of the restricted unpickler is a one-line :class:`CertorchError`."""
    path = Path(path)
    data = _read_raw(path)
    _check_opcodes(data, path)
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except MemoryError:
        raise CertorchError(f"corrupt pickle file {path}: it asks for more memory than is available") from None
    except RecursionError:
        raise CertorchError(f"corrupt pickle file {path}: nested too deeply") from None
    except Exception as e:  # noqa: BLE001  (outside input: every failure is a corrupt file)
        raise CertorchError(f"corrupt pickle file {path}: {_first_line(e)}") from None


def _get(d: dict, key: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    return None


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from one CIFAR-10 python batch."""
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise CertorchError(f"corrupt CIFAR batch {path}: expected a dict, got {type(obj).__name__}")
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if data is None or labels is None:
        raise CertorchError(f"corrupt CIFAR batch {path}: missing 'data' or 'labels'")
    if not isinstance(data, np.ndarray):
        raise CertorchError(f"corrupt CIFAR batch {path}: 'data' is a {type(data).__name__}, expected a uint8 array")
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise CertorchError(f"corrupt CIFAR batch {path}: 'labels' is a {type(labels).__name__}, expected a list of ints")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise CertorchError(f"corrupt CIFAR batch {path}: 'labels' must be integers")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (OverflowError, ValueError, TypeError):
        raise CertorchError(f"corrupt CIFAR batch {path}: 'labels' must be integers in int64 range") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise CertorchError(
            f"corrupt CIFAR batch {path}: data {data.dtype}{tuple(data.shape)}, labels {tuple(labels.shape)}; "
            "expected uint8 (N, 3072) and (N,)"
        )
    return data.reshape(-1, 3, 32, 32), labels



def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzip-compressed if ``path`` ends in ``.gz``).

    1-D arrays get the labels magic 2049, 3-D arrays the images magic 2051 (e.g. to save a
    subset or build small test fixtures).
    """
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {1: IDX_LABELS_MAGIC, 3: IDX_IMAGES_MAGIC}.get(array.ndim)
    if magic is None:
        raise CertorchError(f"write_idx supports 1-D labels or 3-D images, got shape {array.shape}")
    data = magic.to_bytes(4, "big") + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def write_cifar_batch(path: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``images`` ``(N, 3, 32, 32)`` uint8 and ``labels`` ``(N,)`` as a CIFAR-10 python batch."""
    path = Path(path)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise CertorchError(f"write_cifar_batch expects images (N, 3, 32, 32), got {images.shape}")
    batch = {b"data": images.reshape(len(images), -1), b"labels": [int(v) for v in labels]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return path
