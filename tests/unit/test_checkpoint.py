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


def _edit_meta(folder, **changes):
    import json

    p = folder / "ckpt-0001.json"
    meta = json.loads(p.read_text())
    meta.update(changes)
    p.write_text(json.dumps(meta))


def _write_state_json(folder, raw: bytes):
    """Replace the .state.json and record its hash, as a consistent (but hostile) writer would."""
    import hashlib
    import json

    (folder / "ckpt-0001.state.json").write_bytes(raw)
    p = folder / "ckpt-0001.json"
    meta = json.loads(p.read_text())
    meta["sha256"]["state_json"] = hashlib.sha256(raw).hexdigest()
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"config": "hello"}, "'config' must be an object"),
        ({"epoch": "x"}, "'epoch' must be an integer"),
        ({"epoch": -1}, "'epoch' must be an integer >= 0"),
        ({"epoch": True}, "'epoch' must be an integer"),
        ({"metrics": [1]}, "'metrics' must be an object"),
        ({"version": "1"}, "'version' must be an integer"),
        ({"files": "x"}, "'files' must be an object of file names"),
        ({"files": {"state": "../../etc/passwd"}}, "'files' must be an object of file names"),
        ({"sha256": []}, "'sha256' must be an object"),
        ({"sha256": {}}, "no sha256 of the weights"),
    ],
)
def test_metadata_of_wrong_types_is_one_line_error(tmp_path, changes, pattern):
    ck.save_checkpoint(tmp_path, 1, small_model(), {"name": "x"}, {"acc": 0.5})
    _edit_meta(tmp_path, **changes)
    with pytest.raises(CertorchError, match=pattern) as e:
        ck.load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "raw, pattern",
    [
        (b"[]", "expected a JSON object, got a list"),
        (b'{"epoch": "x"}', "'epoch' must be the checkpoint's epoch"),
        (b'{"epoch": 7}', "'epoch' must be the checkpoint's epoch"),
        (b'{"seconds": "soon"}', "'seconds' must be a finite number"),
        (b'{"optimizer": 3}', "'optimizer' must be an object"),
        (b'{"base_lrs": ["a"]}', "'base_lrs' must be a list of finite numbers"),
        (b'{"epoch": 1' + b"0" * 5000 + b"}", "corrupt checkpoint state"),  # beyond python's int digit limit
    ],
)
def test_state_json_of_wrong_types_is_one_line_error(tmp_path, raw, pattern):
    ck.save_checkpoint(tmp_path, 1, small_model(), {}, {}, {}, {"epoch": 1})
    _write_state_json(tmp_path, raw)
    c = ck.load_checkpoint(tmp_path)
    with pytest.raises(CertorchError, match=pattern) as e:
        ck.load_train_state(c)
    assert "\n" not in str(e.value)


def _adam_state(tmp_path):
    import json

    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    t, j = optimizer_state(opt)
    ck.save_checkpoint(tmp_path, 1, model, {}, {}, t, {"optimizer": j})
    return t, json.loads(json.dumps(j))


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda t, j: j["param_groups"][0].__setitem__("lr", "x"), "param group 0 'lr'"),
        (lambda t, j: j["param_groups"][0].__setitem__("betas", [0.9]), "param group 0 'betas'"),
        (lambda t, j: j["param_groups"][0].__setitem__("params", [0, 1]), "other parameters"),
        (lambda t, j: j.__setitem__("param_groups", [1]), "param group"),
        (lambda t, j: j.__setitem__("scalars", {"x.step": 1}), "names no parameter"),
        (lambda t, j: j.__setitem__("scalars", {"0.step": "x"}), "scalar '0.step'"),
        (lambda t, j: t.__setitem__("optim.0.exp_avg", torch.zeros(7)), "has shape"),
        (lambda t, j: t.__setitem__("optim.99.exp_avg", torch.zeros(3)), "names no parameter"),
    ],
)
def test_optimizer_state_that_does_not_fit_is_one_line_error(tmp_path, mutate, pattern):
    t, j = _adam_state(tmp_path)
    mutate(t, j)
    opt = torch.optim.Adam(small_model(1).parameters(), lr=0.01)
    with pytest.raises(CertorchError, match=pattern) as e:
        load_optimizer_state(opt, t, j)
    assert "\n" not in str(e.value)


def test_rng_state_of_wrong_types_is_one_line_error():
    from certorch.train.state import load_rng_state, rng_state

    gen = torch.Generator().manual_seed(0)
    t, j = rng_state(gen)
    j["python"]["state"] = [10**30] * 625
    with pytest.raises(CertorchError, match="RNG state is incomplete or corrupt"):
        load_rng_state(gen, t, j)
    with pytest.raises(CertorchError, match="RNG state is incomplete or corrupt"):
        load_rng_state(gen, t, [])


def test_stale_temporaries_are_cleaned_and_nothing_else(tmp_path):
    model = small_model()
    ck.save_checkpoint(tmp_path, 1, model, {}, {})
    stale = [tmp_path / ".ckpt-0002.safetensors.a1b2c3d4.tmp", tmp_path / ".ckpt-0002.json.zz_9abcd.tmp"]
    for p in stale:
        p.write_bytes(b"half a write")
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "ckpt-0001.json"]
    keep[0].write_text("user file")
    keep[1].write_text("user file")
    removed = ck.clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale) and not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


def test_prune_removes_stale_temporaries(tmp_path):
    ck.save_checkpoint(tmp_path, 1, small_model(), {}, {})
    stale = tmp_path / ".ckpt-0002.state.json.abcdefgh.tmp"
    stale.write_text("{")
    ck.prune_checkpoints(tmp_path, keep=2)
    assert not stale.exists() and ck.latest_checkpoint(tmp_path).name == "ckpt-0001.safetensors"


def test_temporary_name_matches_cleaner_pattern(tmp_path, monkeypatch):
    """A write killed between mkstemp and os.replace leaves a file the cleaner recognises."""
    def killed(src, dst):
        raise KeyboardInterrupt

    seen = []
    real_unlink = ck.os.unlink
    monkeypatch.setattr(ck.os, "replace", killed)
    monkeypatch.setattr(ck.os, "unlink", lambda p: seen.append(p))  # simulate: cleanup never ran
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_write_bytes(tmp_path / "ckpt-0003.json", b"{}")
    monkeypatch.setattr(ck.os, "unlink", real_unlink)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    assert [p.name for p in ck.clean_stale_temporaries(tmp_path)] == leftovers
