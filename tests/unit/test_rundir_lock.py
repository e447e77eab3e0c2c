"""Run-directory lock: a second `certorch train` into a directory in use gets one error line naming
the holder; a lock left by a dead process never blocks; stale temporaries are cleaned on resume."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from certorch.cli.main import main
from certorch.errors import CertorchError
from certorch.train.run import lock_run_dir, run_lock_path

pytest.importorskip("fcntl")

ROOT = Path(__file__).resolve().parents[2]
FAST = ["epochs=1", "data.subset=64", "eval.size=0", "method.name=natural", "method.params={}", "device=cpu", "threads=1"]
CONFIG = str(ROOT / "configs" / "digits_pgd.yaml")


def _error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _holder(path: Path):
    """A separate process that holds the lock of ``path`` (the protocol of ``lock_run_dir``:
    flock on the lock file, ``pid=... host=...`` in it) until its stdin closes. Plain python,
    no torch import, so it starts in milliseconds."""
    code = textwrap.dedent(
        f"""
        import fcntl, os, socket, sys
        fd = os.open({str(run_lock_path(path))!r}, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={{os.getpid()}} host={{socket.gethostname()}}\\n".encode())
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_lock_in_same_process_is_refused_naming_holder(tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run) as path:
        assert path == run_lock_path(run) and f"pid={os.getpid()}" in path.read_text()
        with pytest.raises(CertorchError, match=rf"in use by another certorch run \(pid={os.getpid()} host=") as e:
            with lock_run_dir(run):
                pass
        assert "\n" not in str(e.value)
    assert not path.exists()  # removed on release
    with lock_run_dir(run):  # and free again
        pass


def test_train_into_directory_locked_by_another_process_fails_and_leaves_it_alone(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        line = _error_line(capsys, ["train", CONFIG, *FAST, "--out", str(run), "--no-progress"])
        assert f"pid={holder.pid}" in line and "in use by another certorch run" in line
        assert not run.exists()  # the refused run wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert main(["train", CONFIG, *FAST, "--out", str(run), "--no-progress"]) == 0  # released: works
    capsys.readouterr()


def test_resume_of_directory_locked_by_another_process_fails(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", CONFIG, *FAST, "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    holder = _holder(run)
    try:
        line = _error_line(capsys, ["train", "--resume", str(run), "epochs=2", "--no-progress"])
        assert f"pid={holder.pid}" in line
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (run / "checkpoints" / "ckpt-0002.safetensors").exists()


def test_stale_lock_file_of_killed_process_does_not_block(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    holder.kill()  # SIGKILL: no cleanup, the lock file stays with the dead pid in it
    holder.wait(timeout=30)
    assert run_lock_path(run).exists() and f"pid={holder.pid}" in run_lock_path(run).read_text()
    assert main(["train", CONFIG, *FAST, "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert not run_lock_path(run).exists()


def test_resume_cleans_stale_temporaries(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", CONFIG, *FAST, "--out", str(run), "--no-progress"]) == 0
    stale = [run / "checkpoints" / ".ckpt-0002.safetensors.k1ll3d_x.tmp", run / ".summary.json.abcd1234.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    user = run / "my-notes.tmp"
    user.write_text("mine")
    assert main(["train", "--resume", str(run), "epochs=2", "--no-progress"]) == 0
    capsys.readouterr()
    assert not any(p.exists() for p in stale) and user.exists()
    assert (run / "checkpoints" / "ckpt-0002.safetensors").is_file()


@pytest.mark.slow
def test_two_concurrent_train_commands_do_not_mix(tmp_path):
    """Started together: either one is refused by the lock (or the non-empty check if the other
    already finished); exactly one run owns the directory and its config matches its checkpoints."""
    run = tmp_path / "run"
    cmds = [
        [sys.executable, "-m", "certorch", "train", CONFIG, *FAST, f"seed={s}", "--out", str(run), "--no-progress"]
        for s in (1, 2)
    ]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for c in cmds]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1].strip().splitlines()
    assert len(loser) == 1 and loser[0].startswith("error: ")
    winner_seed = (1, 2)[[p.returncode for p in procs].index(0)]
    import json

    meta = json.loads((run / "checkpoints" / "ckpt-0001.json").read_text())
    assert meta["config"]["seed"] == winner_seed
    assert f"seed: {winner_seed}" in (run / "config.yaml").read_text()
