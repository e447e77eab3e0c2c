"""Download the standard dataset files from their public mirrors, verified by md5.

Files are streamed to a temporary file in the target folder and renamed into place only
after the checksum matches, so an interrupted or corrupt download never leaves a file that
looks valid. The base URL can be overridden per call (``base_url=``) or per dataset with the
environment variables ``CERTORCH_MNIST_URL``, ``CERTORCH_FASHION_MNIST_URL`` and
``CERTORCH_CIFAR10_URL`` (e.g. to use a local mirror).
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from certorch.data.locate import SUBDIRS, default_download_dir
from certorch.data.registry import dataset_info
from certorch.errors import CertorchError


@dataclass
class Source:
    """Where a dataset's files come from: ``base_url + filename`` with expected md5 of each file."""

    base_url: str
    md5: dict[str, str] = field(default_factory=dict)
    archive: bool = False  # the single file is a tar.gz to extract into the root


SOURCES: dict[str, Source] = {
    "mnist": Source(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": Source(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {  # published in github.com/zalandoresearch/fashion-mnist README (Debian's re-gzipped copies differ)
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "cifar10": Source(
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        archive=True,
    ),
}


def url_env_var(name: str) -> str:
    """Environment variable overriding the base URL of dataset ``name`` (e.g. ``CERTORCH_MNIST_URL``)."""
    return "CERTORCH_" + name.upper().replace("-", "_") + "_URL"


def md5_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_file(url: str, dest: Path, md5: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically; verify ``md5`` (if given) before the rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    while block := resp.read(1 << 20):
                        h.update(block)
                        out.write(block)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise CertorchError(f"download of {url} failed: {reason}") from None
        got = h.hexdigest()
        if md5 is not None and got != md5:
            raise CertorchError(f"checksum mismatch for {url}: md5 {got}, expected {md5}; file not saved")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _extract_tar(archive: Path, root: Path) -> None:
    """Extract a tarball into ``root``, refusing members that escape it or are not files/dirs."""
    root_abs = os.path.abspath(root)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                target = os.path.abspath(os.path.join(root_abs, m.name))
                if not (m.isfile() or m.isdir()) or os.path.commonpath([root_abs, target]) != root_abs:
                    raise CertorchError(f"refusing to extract unsafe member {m.name!r} from {archive}")
            tar.extractall(root, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CertorchError(f"cannot extract {archive}: {e}") from None


def download(
    name: str,
    data_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch dataset ``name`` into ``data_dir`` (default: first ``$CERTORCH_DATA`` entry, else
    ``~/.cache/certorch/datasets``) and return the folder holding its files.

    Layout written: ``<data_dir>/mnist/*.gz``, ``<data_dir>/fashion-mnist/*.gz``,
    ``<data_dir>/cifar-10-batches-py/`` (extracted from the verified tarball). Files already
    present with the right md5 are not fetched again. ``digits`` ships with scikit-learn.
    """
    key = dataset_info(name).name
    if key == "digits":
        raise CertorchError("dataset 'digits' ships with scikit-learn; nothing to download")
    if key not in SOURCES:
        raise CertorchError(f"no download source for dataset {key!r}; valid: {', '.join(sorted(SOURCES))}")
    src = SOURCES[key]
    base = base_url or os.environ.get(url_env_var(key)) or src.base_url
    if not base.endswith("/"):
        base += "/"
    root = default_download_dir(data_dir)
    folder = root / SUBDIRS[key][0]
    if src.archive and all((folder / f).is_file() for f in ("test_batch", "data_batch_1", "data_batch_5")):
        return folder
    target_dir = root if src.archive else folder
    for fname, md5 in src.md5.items():
        dest = target_dir / fname
        if dest.is_file() and md5_file(dest) == md5:
            continue
        fetch_file(base + fname, dest, md5, timeout=timeout)
    if src.archive:
        for fname in src.md5:
            _extract_tar(target_dir / fname, root)
    if src.archive and not folder.is_dir():
        raise CertorchError(f"archive for {key} did not contain {SUBDIRS[key][0]}/")
    return folder

