"""Where dataset files are looked for.

Order: the explicit ``data_dir`` argument (only that directory), else the directories in the
``CERTORCH_DATA`` environment variable (``os.pathsep``-separated), then the well-known places:
``../shared/datasets`` relative to the current directory and to the repository root, the
download cache ``~/.cache/certorch/datasets`` and ``/usr/share/datasets`` (Debian's
``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist/``).

Inside a root, a dataset may sit in its usual sub-folder (``mnist/``, ``fashion-mnist/``,
``cifar-10-batches-py/``, or torchvision's ``MNIST/raw/``...) or directly in the root. For the
MNIST-like sets (identical file names) files directly in a root are only used when the root is
the explicit ``data_dir`` or is named like the dataset, so Fashion-MNIST is never read as MNIST.
"""
from __future__ import annotations

import os
from pathlib import Path

from certorch.errors import CertorchError

ENV_VAR = "CERTORCH_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.path.expanduser("~")) / ".cache" / "certorch" / "datasets"
SYSTEM_DIR = Path("/usr/share/datasets")

# canonical name -> sub-folders tried inside each root (first is where downloads go)
SUBDIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
    "cifar10": ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "CIFAR10/cifar-10-batches-py"),
}
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

HOW_TO_GET = {
    "mnist": "download it with certorch.data.download('mnist', DIR) (CLI: certorch download NAME --data-dir DIR) or set CERTORCH_DATA=DIR",
    "fashion-mnist": "run `apt-get install dataset-fashion-mnist`, or download it with "
    "certorch.data.download('fashion-mnist', DIR) (CLI: certorch download NAME --data-dir DIR), or set CERTORCH_DATA=DIR",
    "cifar10": "download it with certorch.data.download('cifar10', DIR) (CLI: certorch download NAME --data-dir DIR) or set CERTORCH_DATA=DIR",
}


def well_known_dirs() -> list[Path]:
    """The default search roots, in order (they need not exist)."""
    dirs = [Path.cwd().parent / "shared" / "datasets", REPO_ROOT.parent / "shared" / "datasets", CACHE_DIR, SYSTEM_DIR]
    return [Path(os.path.normpath(d)) for d in dirs]


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Roots to search, in priority order: ``data_dir`` alone if given, else ``$CERTORCH_DATA`` then well-known."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    roots: list[Path] = []
    for r in env + well_known_dirs():
        key = os.path.normpath(os.path.abspath(r))
        if key not in {os.path.normpath(os.path.abspath(x)) for x in roots}:
            roots.append(r)
    return roots


def default_download_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`certorch.data.download` writes: ``data_dir``, else first ``$CERTORCH_DATA`` entry, else the cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    return Path(env[0]).expanduser() if env else CACHE_DIR


def _candidate_dirs(name: str, root: Path, explicit: bool) -> list[Path]:
    dirs = [root / sub for sub in SUBDIRS[name]]
    if name == "cifar10" or explicit or root.name.lower() in {s.lower() for s in SUBDIRS[name]}:
        dirs.append(root)
    return dirs


def _idx_file(folder: Path, stem: str) -> Path | None:
    for fname in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (folder / fname).is_file():
            return folder / fname
    return None


def _files_in(name: str, split: str, folder: Path) -> list[Path] | None:
    if name == "cifar10":
        files = [folder / f for f in CIFAR_FILES[split]]
        return files if all(f.is_file() for f in files) else None
    found = [_idx_file(folder, stem) for stem in IDX_STEMS[split]]
    return found if all(f is not None for f in found) else None  # type: ignore[return-value]


def find_files(name: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Paths of the files holding ``split`` of dataset ``name`` (canonical name).

    MNIST-like: ``[images, labels]``; CIFAR-10: the batch files. Raises a one-line
    :class:`CertorchError` listing every place looked in and how to get the data.
    """
    if split not in ("train", "test"):
        raise CertorchError(f"unknown split {split!r}; valid: train, test")
    roots = search_roots(data_dir)
    looked: list[str] = []
    for root in roots:
        for folder in _candidate_dirs(name, root, explicit=data_dir is not None):
            files = _files_in(name, split, folder)
            if files is not None:
                return files
        looked.append(str(root))
    hint = f" (from {ENV_VAR})" if data_dir is None and os.environ.get(ENV_VAR) else ""
    wanted = CIFAR_FILES[split] if name == "cifar10" else tuple(s + ".gz" for s in IDX_STEMS[split])
    raise CertorchError(
        f"{name} {split} files ({', '.join(wanted)}) not found; looked in {', '.join(looked)}{hint}; {HOW_TO_GET[name]}"
    )
