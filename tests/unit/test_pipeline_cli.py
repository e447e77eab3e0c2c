"""`certorch certify` end to end (zoo model + safetensors on the bundled digits data) and Ray sharding."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from certorch.cli.main import main
from certorch.models import build

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build("digits_mlp", dataset="digits")
    path = tmp_path_factory.mktemp("w") / "digits_mlp.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _args(weights, out, *extra):
    return ["certify", "digits_mlp", "--weights", str(weights), "--data", "digits", "--n", "6", "--eps", "0.02",
            "--stages", "pgd,crown,milp", "--timeout", "20", "--out", str(out), *extra]


def test_certify_writes_jsonl_summary_and_resumes(weights, tmp_path, capsys):
    assert main(_args(weights, tmp_path)) == 0
    lines = (tmp_path / "results-eps0.02.jsonl").read_text().splitlines()
    rows = [json.loads(ln) for ln in lines]
    assert sorted(r["index"] for r in rows) == list(range(6))
    assert all(r["verdict"] in ("verified", "falsified", "not_verified", "unknown", "timeout") for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())[0]
    assert summary["examples"] == 6 and 0 <= summary["certified_acc"] <= summary["pgd_acc"] <= summary["clean_acc"]
    assert "certified_acc" in capsys.readouterr().out
    assert main(_args(weights, tmp_path)) == 0  # rerun: everything done, nothing appended
    assert len((tmp_path / "results-eps0.02.jsonl").read_text().splitlines()) == 6


def test_certify_eps_sweep_writes_plot(weights, tmp_path):
    args = _args(weights, tmp_path)
    args[args.index("--eps"):args.index("--eps") + 2] = ["--eps-sweep", "0.01,0.03"]
    args[args.index("--stages") + 1] = "pgd,crown"
    assert main(args) == 0
    assert (tmp_path / "certified_vs_eps.png").stat().st_size > 0


@pytest.mark.parametrize("extra, msg", [
    (["--timeout", "0"], "timeout must be > 0"),
    (["--stages", "crown,bogus"], "unknown verification stage"),
    (["--address", "127.0.0.1:1"], "cannot reach Ray cluster"),
])
def test_certify_bad_input_is_one_line_error(weights, tmp_path, capsys, extra, msg):
    pytest.importorskip("ray") if "--address" in extra else None
    assert main(_args(weights, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1


@pytest.mark.slow  # starting a local Ray runtime takes ~30-70 s on a loaded 2-core machine
def test_two_ray_workers_give_the_same_verdicts_as_one():
    pytest.importorskip("ray")
    from certorch.distributed.ray_certify import certify_sharded, shutdown

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    with torch.no_grad():
        net[1].weight.mul_(6.0)
    x = torch.rand(10, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    kw = dict(stages="pgd,crown,milp", timeout=20, chunk_size=3)
    one = {r.index: r.verdict for rs in certify_sharded(net, x, y, 0.1, **kw) for r in rs}
    try:
        two = {r.index: r.verdict for rs in certify_sharded(net, x, y, 0.1, workers=2, **kw) for r in rs}
    finally:
        shutdown()
    assert one == two and len(one) == 10


def _rows(path):
    return {r["index"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_refine_carries_decided_verdicts_and_runs_only_the_rest(weights, tmp_path):
    cheap, full = tmp_path / "cheap", tmp_path / "full"
    args = _args(weights, cheap, "--n", "12")
    args[args.index("--stages") + 1] = "pgd"
    assert main(args) == 0
    before = _rows(cheap / "results-eps0.02.jsonl")
    decided = {i: r for i, r in before.items() if r["verdict"] in ("verified", "falsified", "not_verified")}
    assert 0 < len(decided) < 12  # the untrained net misclassifies some, PGD decides no correct one
    assert main(_args(weights, full, "--n", "12", "--refine", str(cheap))) == 0
    after = _rows(full / "results-eps0.02.jsonl")
    assert sorted(after) == list(range(12))
    assert all(after[i] == r for i, r in decided.items())  # carried over as they were
    assert all(after[i]["stage_seconds"].keys() >= {"crown"} for i in after if i not in decided)


def test_sample_runs_k_of_the_pool_reruns_the_same_and_extends(weights, tmp_path):
    assert main(_args(weights, tmp_path, "--n", "12", "--sample", "3", "--seed", "1")) == 0
    first = set(_rows(tmp_path / "results-eps0.02.jsonl"))
    assert len(first) == 3
    assert main(_args(weights, tmp_path, "--n", "12", "--sample", "3", "--seed", "1")) == 0
    assert set(_rows(tmp_path / "results-eps0.02.jsonl")) == first  # nothing new
    assert main(_args(weights, tmp_path, "--n", "12", "--sample", "5", "--seed", "1")) == 0
    grown = set(_rows(tmp_path / "results-eps0.02.jsonl"))
    assert len(grown) == 5 and first < grown
    est = json.loads((tmp_path / "summary.json").read_text())[0]["estimate"]
    assert est["population"] == 12 and est["sampled"] == 5 and est["pool"] == 12
    lo, hi = est["certified_ci95"]
    assert est["certified_lower"] <= lo <= est["certified_estimate"] <= hi <= est["certified_upper"]


def test_refine_from_another_model_is_refused(weights, tmp_path, capsys):
    cheap = tmp_path / "cheap"
    args = _args(weights, cheap, "--n", "12")
    args[args.index("--stages") + 1] = "pgd"
    assert main(args) == 0
    rows = [json.loads(ln) for ln in (cheap / "results-eps0.02.jsonl").read_text().splitlines()]
    for r in rows:  # what a different model would have written: every clean verdict flipped
        r["verdict"] = "falsified" if r["verdict"] == "not_verified" else "not_verified"
    (cheap / "results-eps0.02.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(_args(weights, tmp_path / "full", "--n", "12", "--refine", str(cheap))) == 2
    err = capsys.readouterr().err.strip()
    assert "not the model that wrote them" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra, msg", [
    (["--sample", "0"], "--sample must be >= 1"),
    (["--refine", "/nonexistent/folder"], "no such folder"),
])
def test_refine_and_sample_bad_input(weights, tmp_path, capsys, extra, msg):
    assert main(_args(weights, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1


def test_refine_with_other_labels_is_refused(weights, tmp_path, capsys):
    cheap = tmp_path / "cheap"
    cheap.mkdir()
    (cheap / "results-eps0.02.jsonl").write_text(json.dumps({"index": 0, "label": 99, "verdict": "verified"}) + "\n")
    assert main(_args(weights, tmp_path / "full", "--refine", str(cheap))) == 2
    assert "not the same test set" in capsys.readouterr().err
