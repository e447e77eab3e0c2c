"""certorch.data.download against a local HTTP server on 127.0.0.1 (no other network)."""
from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

import certorch.data.fetch as fetch
import certorch.data.locate as locate
from certorch.data import download, load
from certorch.data.formats import write_cifar_batch, write_idx
from certorch.errors import CertorchError

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class Server:
    """A static file server over ``root`` on an ephemeral 127.0.0.1 port, recording requested paths."""

    def __init__(self, root: Path):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """Fake MNIST files (5 train, 3 test) and a CIFAR tarball served locally; SOURCES point at them."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    served = tmp_path / "served"
    (served / "mnist").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx(served / "mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(served / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8))
    build = tmp_path / "build" / "cifar-10-batches-py"
    build.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        write_cifar_batch(build / name, rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), [i, 9 - i])
    (served / "cifar").mkdir()
    with tarfile.open(served / "cifar" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(build, arcname="cifar-10-batches-py")
    server = Server(served)
    monkeypatch.setitem(
        fetch.SOURCES, "mnist", fetch.Source(server.url + "mnist/", {f: md5(served / "mnist" / f) for f in MNIST_FILES})
    )
    tarball = served / "cifar" / "cifar-10-python.tar.gz"
    monkeypatch.setitem(
        fetch.SOURCES, "cifar10", fetch.Source(server.url + "cifar/", {tarball.name: md5(tarball)}, archive=True)
    )
    yield server
    server.close()


def test_download_mnist_then_load(mirror, tmp_path):
    target = tmp_path / "data"
    folder = download("mnist", target)
    assert folder == target / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_FILES)
    ds = load("mnist", "test", data_dir=target)
    assert ds.images.shape == (3, 1, 28, 28) and ds.labels.tolist() == [0, 1, 2]
    assert len(load("mnist", "train", data_dir=target)) == 5


def test_second_download_skips_verified_files(mirror, tmp_path):
    download("mnist", tmp_path / "data")
    n = len(mirror.requests)
    download("mnist", tmp_path / "data")
    assert len(mirror.requests) == n == 4


def test_checksum_mismatch_leaves_no_file(mirror, tmp_path, monkeypatch):
    bad = dict(fetch.SOURCES["mnist"].md5, **{"t10k-labels-idx1-ubyte.gz": "0" * 32})
    monkeypatch.setitem(fetch.SOURCES, "mnist", fetch.Source(fetch.SOURCES["mnist"].base_url, bad))
    with pytest.raises(CertorchError, match=r"checksum mismatch for .*t10k-labels-idx1-ubyte.gz: md5 [0-9a-f]{32}, expected 0{32}"):
        download("mnist", tmp_path / "data")
    leftovers = [p.name for p in (tmp_path / "data" / "mnist").iterdir()]
    assert "t10k-labels-idx1-ubyte.gz" not in leftovers
    assert not [n for n in leftovers if n.endswith(".part")]


def test_missing_remote_file_is_clear_error(mirror, tmp_path):
    with pytest.raises(CertorchError, match="download of .*nothing-here/train-images-idx3-ubyte.gz failed"):
        download("mnist", tmp_path / "data", base_url=mirror.url + "nothing-here")


def test_base_url_from_env(mirror, tmp_path, monkeypatch):
    monkeypatch.setitem(fetch.SOURCES, "mnist", fetch.Source("http://127.0.0.1:9/unused/", fetch.SOURCES["mnist"].md5))
    monkeypatch.setenv(fetch.url_env_var("mnist"), mirror.url + "mnist")
    assert fetch.url_env_var("fashion-mnist") == "CERTORCH_FASHION_MNIST_URL"
    download("mnist", tmp_path / "data")
    assert all(r.startswith("/mnist/") for r in mirror.requests)


def test_load_with_download_flag(mirror, tmp_path):
    ds = load("mnist", "test", data_dir=tmp_path / "data", download=True)
    assert ds.labels.tolist() == [0, 1, 2]


def test_download_goes_to_env_dir_by_default(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv(locate.ENV_VAR, str(tmp_path / "envdata"))
    assert download("mnist") == tmp_path / "envdata" / "mnist"


def test_download_cifar_tarball_extracts(mirror, tmp_path):
    folder = download("cifar10", tmp_path / "data")
    assert folder == tmp_path / "data" / "cifar-10-batches-py"
    assert load("cifar10", "test", data_dir=tmp_path / "data").labels.tolist() == [5, 4]
    assert load("cifar10", "train", data_dir=tmp_path / "data").labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]


def test_unsafe_tar_member_refused(tmp_path, monkeypatch, mirror):
    evil = tmp_path / "served" / "cifar" / "cifar-10-python.tar.gz"
    buf = io.BytesIO(b"x")
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, buf)
    monkeypatch.setitem(fetch.SOURCES, "cifar10", fetch.Source(mirror.url + "cifar/", {evil.name: md5(evil)}, archive=True))
    with pytest.raises(CertorchError, match="unsafe member"):
        download("cifar10", tmp_path / "data")
    assert not (tmp_path / "escape.txt").exists()


def test_digits_needs_no_download():
    with pytest.raises(CertorchError, match="scikit-learn"):
        download("digits")


def test_real_sources_have_published_md5s():
    assert fetch.SOURCES["cifar10"].md5 == {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
    assert fetch.SOURCES["mnist"].md5["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert fetch.SOURCES["fashion-mnist"].md5["t10k-labels-idx1-ubyte.gz"] == "bb300cfdad3c16e7a12a480ee83cd310"


def test_cli_download_fetches_and_verifies(mirror, tmp_path, capsys):
    from certorch.cli.main import main

    target = tmp_path / "cli-data"
    target.mkdir()
    assert main(["download", "mnist", "--data-dir", str(target)]) == 0
    assert "files verified" in capsys.readouterr().out
    assert len(load("mnist", "test", data_dir=target)) == 3


def test_cli_download_of_digits_is_a_one_line_error(capsys):
    from certorch.cli.main import main

    assert main(["download", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nothing to download" in err and "\n" not in err
