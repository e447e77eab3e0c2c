"""Checkpoints: round trip, atomic writes, corrupt files, resolution of run directories."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from certorch.errors import CertorchError
from certorch.train import checkpoint as ck
from certorch.train.state import load_optimizer_state, optimizer_state


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_atomic_write_crash_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    ck.atomic_write_bytes(path, b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError):
        ck.atomic_write_bytes(path, b"new-content")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temp file left behind


def test_checkpoint_round_trip(tmp_path):
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    t, j = optimizer_state(opt)
    path = ck.save_checkpoint(tmp_path, 3, model, {"name": "x"}, {"acc": 0.5}, t, {"optimizer": j})
    c = ck.load_checkpoint(tmp_path)
    assert c.path == path and c.epoch == 3 and c.metrics == {"acc": 0.5} and c.config == {"name": "x"}
    for k, v in model.state_dict().items():
        assert torch.equal(c.weights[k], v)
    tensors, state = ck.load_train_state(c)
    other = small_model(1)
    opt2 = torch.optim.Adam(other.parameters(), lr=0.01)
    load_optimizer_state(opt2, tensors, state["optimizer"])
    for p1, p2 in zip(model.parameters(), other.parameters()):
        a, b = opt.state[p1], opt2.state[p2]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])


def test_incomplete_checkpoint_is_ignored(tmp_path):
    model = small_model()
    ck.save_checkpoint(tmp_path, 1, model, {}, {})
    ck.save_checkpoint(tmp_path, 2, model, {}, {})
    (tmp_path / "ckpt-0002.json").unlink()  # crash before the commit marker
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-0001.safetensors"


def test_corrupt_weights_give_one_line_error(tmp_path):
    ck.save_checkpoint(tmp_path, 1, small_model(), {}, {})
    w = tmp_path / "ckpt-0001.safetensors"
    w.write_bytes(w.read_bytes()[:-7] + b"garbage")
    with pytest.raises(CertorchError, match="corrupt checkpoint") as e:
        ck.load_checkpoint(w)
    assert "\n" not in str(e.value)


def test_garbage_safetensors_without_json(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(CertorchError, match="corrupt checkpoint file"):
        ck.load_checkpoint(bad)


def test_truncated_json_gives_one_line_error(tmp_path):
    ck.save_checkpoint(tmp_path, 1, small_model(), {}, {})
    (tmp_path / "ckpt-0001.json").write_text('{"format": "certorch-chec')
    with pytest.raises(CertorchError, match="corrupt checkpoint metadata"):
        ck.load_checkpoint(tmp_path / "ckpt-0001.safetensors")


def test_resolve_run_dir_and_missing(tmp_path):
    ck.save_checkpoint(tmp_path / "run" / ck.CKPT_DIR, 4, small_model(), {}, {})
    assert ck.resolve_checkpoint(tmp_path / "run").name == "ckpt-0004.safetensors"
    with pytest.raises(CertorchError, match="not found"):
        ck.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CertorchError, match="no checkpoint found"):
        ck.resolve_checkpoint(tmp_path / "empty")


def test_prune_keeps_newest(tmp_path):
    for e in range(1, 5):
        ck.save_checkpoint(tmp_path, e, small_model(), {}, {})
    ck.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-0003.safetensors", "ckpt-0004.safetensors"]
    assert len(list(tmp_path.iterdir())) == 8


def test_weights_of_other_model_rejected(tmp_path):
    ck.save_checkpoint(tmp_path, 1, small_model(), {}, {})
    c = ck.load_checkpoint(tmp_path)
    with pytest.raises(CertorchError, match="do not fit the model"):
        ck.load_weights_into(nn.Sequential(nn.Linear(4, 5)), c.weights)
