"""Fuzzing every outside-input parser with mutations of valid files: only one-line CertorchErrors.

Parsers: ONNX import, checkpoint metadata / training state (JSON, safetensors, optimizer and RNG
restore), config YAML, IDX (raw and gzip), CIFAR pickle batches. Mutations: byte flips, set
bytes, truncations, insertions and deletions (biased towards headers), and for the structured
formats type swaps / deletions / additions at random places of the parsed tree, re-serialized
(for checkpoint files with the hashes recomputed, as a hostile but consistent writer would).
Hypothesis is derandomized (fixed examples every run) and each test is kept to about a second.
"""
from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from certorch.config import config_from_dict, load_config
from certorch.config.typed import to_dict
from certorch.data.formats import read_cifar_batch, read_idx_pair, write_cifar_batch, write_idx
from certorch.errors import CertorchError
from certorch.train import checkpoint as ck
from certorch.train.state import load_optimizer_state, load_rng_state, optimizer_state, rng_state

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
#: examples per test; CERTORCH_FUZZ_EXAMPLES=5000 (and CERTORCH_FUZZ_RANDOM=1) for a long hunt
EXAMPLES = int(os.environ.get("CERTORCH_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("CERTORCH_FUZZ_RANDOM"), database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
ODD_VALUES = [None, True, False, 0, -1, 3, 1.5, -1e308, 2**64, 2**70, float("inf"), float("nan"), "x", "",
              "1e-3", [], {}, [1, "a"], {"a": None}, [[[]]]]


def one_line_or_ok(fn, *args) -> None:
    """Run ``fn``: success, or a CertorchError whose message is one line; anything else fails."""
    try:
        fn(*args)
    except CertorchError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)


# ----------------------------------------------------------------------------- mutation strategies
@st.composite
def mutated_bytes(draw, base: bytes, header: int = 64) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.one_of(st.integers(0, min(header, len(data)) - 1), st.integers(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        else:
            del data[pos : pos + draw(st.integers(1, 9))]
    return bytes(data)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):  # long lists (RNG states): their first items are enough
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_tree(draw, base):
    """Replace / delete / add at random places of a JSON-like tree (type swaps included)."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(obj))))
        value = draw(st.sampled_from(ODD_VALUES))
        if not path:
            obj = copy.deepcopy(value) if draw(st.booleans()) else obj
            continue
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        kind = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if kind == "replace":
            parent[path[-1]] = copy.deepcopy(value)
        elif kind == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "epoch", "lr", "0.step"]))] = copy.deepcopy(value)
        else:
            parent.insert(path[-1], copy.deepcopy(value))
    return obj


# ----------------------------------------------------------------------------- checkpoints
def _small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@functools.lru_cache(maxsize=1)
def _ckpt_files() -> dict[str, bytes]:
    """Bytes of one complete checkpoint (weights, state tensors, state JSON, metadata). Not a
    fixture: hypothesis would print the whole checkpoint with every failing example."""
    with tempfile.TemporaryDirectory() as d:
        return _write_ckpt(Path(d))


def _write_ckpt(folder: Path) -> dict[str, bytes]:
    model = _small_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    opt_t, opt_j = optimizer_state(opt)
    rng_t, rng_j = rng_state(torch.Generator().manual_seed(0))
    cfg = to_dict(config_from_dict({"name": "fuzz"}))
    state_json = {"optimizer": opt_j, "rng": rng_j, "epoch": 1, "seconds": 1.5, "base_lrs": [0.01]}
    ck.save_checkpoint(folder, 1, model, cfg, {"acc": 0.5}, {**opt_t, **rng_t}, state_json)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _restore(folder: Path) -> None:
    """What resuming does with a checkpoint's files (global RNG states restored afterwards)."""
    c = ck.load_checkpoint(folder)
    model = _small_model(1)
    ck.load_weights_into(model, c.weights, c.path)
    config_from_dict(c.config)
    tensors, state = ck.load_train_state(c)
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            load_optimizer_state(torch.optim.Adam(model.parameters(), lr=0.01), tensors, state.get("optimizer") or {})
            load_rng_state(torch.Generator(), tensors, state.get("rng") or {})
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _with_files(files: dict[str, bytes], rehash: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        if rehash:  # a consistent writer: the metadata's hashes match the (mutated) files
            meta = json.loads(files["ckpt-0001.json"])
            for key, name in (("weights", "ckpt-0001.safetensors"), ("state", "ckpt-0001.state.safetensors"),
                              ("state_json", "ckpt-0001.state.json")):
                meta["sha256"][key] = hashlib.sha256(files[name]).hexdigest()
            files = {**files, "ckpt-0001.json": json.dumps(meta).encode()}
        for name, data in files.items():
            (folder / name).write_bytes(data)
        one_line_or_ok(_restore, folder)


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_metadata_bytes(data):
    ckpt_files = _ckpt_files()
    meta = data.draw(mutated_bytes(ckpt_files["ckpt-0001.json"], header=400))
    _with_files({**ckpt_files, "ckpt-0001.json": meta}, rehash=False)


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_metadata_types(data):
    ckpt_files = _ckpt_files()
    meta = data.draw(mutated_tree(json.loads(ckpt_files["ckpt-0001.json"])))
    _with_files({**ckpt_files, "ckpt-0001.json": json.dumps(meta).encode()}, rehash=False)


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_state_json(data):
    ckpt_files = _ckpt_files()
    base = json.loads(ckpt_files["ckpt-0001.state.json"])
    if data.draw(st.booleans()):
        raw = json.dumps(data.draw(mutated_tree(base))).encode()
    else:
        raw = data.draw(mutated_bytes(ckpt_files["ckpt-0001.state.json"], header=2000))
    _with_files({**ckpt_files, "ckpt-0001.state.json": raw}, rehash=True)


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_safetensors(data):
    ckpt_files = _ckpt_files()
    name = data.draw(st.sampled_from(["ckpt-0001.safetensors", "ckpt-0001.state.safetensors"]))
    raw = data.draw(mutated_bytes(ckpt_files[name], header=300))
    _with_files({**ckpt_files, name: raw}, rehash=True)


# ----------------------------------------------------------------------------- config YAML
CONFIG_TEXT = (ROOT / "configs" / "digits_pgd.yaml").read_text()


def _load_yaml_config(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_bytes(text)
        load_config(p)


@FUZZ
@given(data=st.data())
def test_fuzz_config_yaml_bytes(data):
    one_line_or_ok(_load_yaml_config, data.draw(mutated_bytes(CONFIG_TEXT.encode(), header=len(CONFIG_TEXT))))


@FUZZ
@given(data=st.data())
def test_fuzz_config_yaml_types(data):
    tree = data.draw(mutated_tree(yaml.safe_load(CONFIG_TEXT)))
    one_line_or_ok(_load_yaml_config, yaml.safe_dump(tree).encode())


# ----------------------------------------------------------------------------- IDX
def _idx_pair(n: int = 3) -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        im = write_idx(Path(d) / "im", rng.integers(0, 256, (n, 5, 4), dtype=np.uint8)).read_bytes()
        lb = write_idx(Path(d) / "lb", rng.integers(0, 10, n, dtype=np.uint8)).read_bytes()
    return im, lb


IDX_IMAGES, IDX_LABELS = _idx_pair()


def _read_pair(images: bytes, labels: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "im").write_bytes(images)
        (Path(d) / "lb").write_bytes(labels)
        read_idx_pair(Path(d) / "im", Path(d) / "lb")


@FUZZ
@given(data=st.data())
def test_fuzz_idx(data):
    which = data.draw(st.sampled_from(["images", "labels"]))
    compressed = data.draw(st.sampled_from(["no", "before", "after"]))
    im, lb = IDX_IMAGES, IDX_LABELS
    base = im if which == "images" else lb
    if compressed == "after":  # mutate the gzip stream itself
        new = data.draw(mutated_bytes(gzip.compress(base, mtime=0), header=32))
    else:
        new = data.draw(mutated_bytes(base, header=16))
        new = gzip.compress(new, mtime=0) if compressed == "before" else new
    im, lb = (new, lb) if which == "images" else (im, new)
    one_line_or_ok(_read_pair, im, lb)


# ----------------------------------------------------------------------------- CIFAR pickles
def _cifar_bytes(batch: object | None = None) -> bytes:
    if batch is None:
        with tempfile.TemporaryDirectory() as d:
            images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
            return write_cifar_batch(Path(d) / "b", images, np.array([3, 7])).read_bytes()
    return pickle.dumps(batch, protocol=2)


CIFAR = _cifar_bytes()


def _read_cifar(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "b").write_bytes(raw)
        read_cifar_batch(Path(d) / "b")


@FUZZ
@given(data=st.data())
def test_fuzz_cifar_pickle_bytes(data):
    raw = data.draw(mutated_bytes(CIFAR, header=120))
    if data.draw(st.booleans()):  # also mutate the tail (the labels list)
        raw = raw[:-40] + data.draw(mutated_bytes(raw[-40:], header=40))
    one_line_or_ok(_read_cifar, raw)


@FUZZ
@given(data=st.data())
def test_fuzz_cifar_pickle_types(data):
    batch = {"data": "ARRAY", "labels": [3, 7]}
    tree = data.draw(mutated_tree(batch))
    if isinstance(tree, dict) and tree.get("data") == "ARRAY":
        tree["data"] = np.zeros((2, 3072), np.uint8)
    if isinstance(tree, dict):
        tree = {(k.encode() if isinstance(k, str) else k): v for k, v in tree.items()}
    one_line_or_ok(_read_cifar, _cifar_bytes(tree))
