"""Cascades of certified models (Wong et al. 2018, section 3.3 and Algorithm 2): training.

Stage k+1 is trained, and evaluated, only on the examples that stages 1..k cannot certify
(exact bound ``cascade.certify``, float64, eval semantics, at ``eps.value``). A cascade run
directory holds every stage::

    RUN/config.yaml         the resolved config (cascade.stages = K)
    RUN/cascade.json        progress: stages done, the remaining train / held-out indices, counts
    RUN/stage_1 ... stage_K ordinary run directories (checkpoints, metrics, curves)
    RUN/summary.json        per stage: examples trained on, certified, left

Stage k trains with seed ``seed + k - 1`` from a fresh initialization. ``--resume`` continues the
stage that was interrupted (its own checkpoints) and recomputes a routing step that was cut short,
so a killed cascade resumes exactly. When earlier stages certify every remaining training example
the cascade stops early (documented behaviour; ``summary.json`` says ``stopped_after``).

Certifying a cascade (``certorch certify RUN``) lives in :mod:`certorch.verify.cascade`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from certorch.config.schema import CascadeConfig, TrainConfig, config_to_yaml
from certorch.errors import CertorchError
from certorch.train import checkpoint as ckpt
from certorch.train.trainer import CONFIG, SUMMARY, Trainer, is_main_process

STATE = "cascade.json"

__all__ = ["fit_cascade", "is_cascade_run", "stage_dirs", "certified_mask", "CascadeResult", "STATE"]


def is_cascade_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / STATE).is_file()


def stage_dirs(run_dir: str | Path) -> list[Path]:
    """The trained stage directories of a cascade run, in order."""
    state = _read_state(Path(run_dir))
    return [Path(run_dir) / f"stage_{k}" for k in range(1, int(state["done"]) + 1)]


def certified_mask(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str, batch_size: int,
                   progress: bool = False, desc: str = "certify") -> Tensor:
    """Bool (N,): ``ct.certified`` (float64, eval semantics) of every example, ``batch_size`` at a time."""
    from certorch.bounds.api import certified

    out = []
    chunks = list(zip(x.split(batch_size), y.split(batch_size)))
    bar = None
    if progress and is_main_process():
        from tqdm import tqdm

        bar = tqdm(total=len(chunks), desc=desc, leave=False, file=sys.stderr, disable=None)
    for xb, yb in chunks:
        out.append(certified(model, xb, yb, eps, method=method).cpu())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


@dataclass
class CascadeResult:
    run_dir: Path
    models: list[nn.Module]
    summary: dict[str, Any]


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CertorchError(f"corrupt cascade state {path}: {e}") from None
    ok = (isinstance(state, dict) and isinstance(state.get("done"), int) and isinstance(state.get("stages"), list)
          and all(isinstance(state.get(k), (list, type(None))) for k in ("train", "eval")))
    if not ok:
        raise CertorchError(f"corrupt cascade state {path}: expected done (int), stages (list), train/eval (lists)")
    return state


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    if is_main_process():
        ckpt.atomic_write_text(run_dir / STATE, json.dumps(state) + "\n")


def fit_cascade(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, data_dir: str | None = None,
                log: Any = None) -> CascadeResult:
    """Train the ``cfg.cascade.stages`` models of a cascade into ``run_dir`` (see module doc)."""
    from certorch.bounds.methods import get_method

    log = log if log is not None else (lambda s: print(s, file=sys.stderr))
    method = get_method(cfg.cascade.certify)
    if method.name not in ("ibp", "crown", "crown-ibp", "dual", "zonotope", "symbolic"):
        raise CertorchError(f"cascade.certify must be a sound bound method, got {cfg.cascade.certify!r}")
    run_dir = Path(run_dir)
    if resume:
        if not is_cascade_run(run_dir):
            raise CertorchError(f"cannot resume: {run_dir} is not a cascade run (no {STATE})")
        state = _read_state(run_dir)
    else:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise CertorchError(f"run directory {run_dir} already exists and is not empty (use --resume or another --out)")
        state = {"done": 0, "train": None, "eval": None, "stages": []}
    stage_cfg = lambda k: replace(cfg, seed=cfg.seed + k - 1, name=f"{cfg.name}-stage{k}",  # noqa: E731
                                  cascade=CascadeConfig())
    if not resume:
        Trainer(stage_cfg(1), run_dir / "stage_1", data_dir=data_dir, log=lambda s: None)  # validate before writing
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        ckpt.atomic_write_text(run_dir / CONFIG, config_to_yaml(cfg))
        if not resume:
            _write_state(run_dir, state)
    models: list[nn.Module] = []
    for k in range(1, cfg.cascade.stages + 1):
        sdir = run_dir / f"stage_{k}"
        if k <= state["done"]:
            from certorch.train.run import load_model

            models.append(load_model(sdir))
            continue
        train_idx = None if state["train"] is None else torch.tensor(state["train"], dtype=torch.long)
        eval_idx = None if state["eval"] is None else torch.tensor(state["eval"], dtype=torch.long)
        if train_idx is not None and train_idx.numel() < 2:
            log(f"cascade: stages 1..{k - 1} certify all but {train_idx.numel()} training example(s); "
                f"stopping after {k - 1} stage(s)")
            state["stopped_after"] = k - 1
            break
        log(f"cascade stage {k}/{cfg.cascade.stages}: training on "
            f"{'all' if train_idx is None else train_idx.numel()} examples")
        resume_k = ckpt.latest_checkpoint(sdir / ckpt.CKPT_DIR) is not None
        trainer = Trainer(stage_cfg(k), sdir, resume=resume_k, data_dir=data_dir, log=log,
                          train_indices=train_idx, eval_indices=eval_idx)
        result = trainer.fit()
        model = result.model
        eps = cfg.eps.value
        cert_train = certified_mask(model, trainer.train_x.to(trainer.device), trainer.train_y.to(trainer.device), eps,
                                    method.name, cfg.cascade.batch_size, cfg.progress, f"stage {k}: certify train")
        base_train = torch.arange(len(cert_train)) if train_idx is None else train_idx
        entry = {"stage": k, "train_examples": int(len(cert_train)), "train_certified": int(cert_train.sum())}
        state["train"] = base_train[~cert_train].tolist()
        if trainer.eval_x is not None:
            cert_eval = certified_mask(model, trainer.eval_x, trainer.eval_y, eps, method.name,
                                       cfg.cascade.batch_size, cfg.progress, f"stage {k}: certify held-out")
            base_eval = torch.arange(len(cert_eval)) if eval_idx is None else eval_idx
            state["eval"] = base_eval[~cert_eval].tolist()
            entry.update(eval_examples=int(len(cert_eval)), eval_certified=int(cert_eval.sum()))
        else:
            state["eval"] = [] if eval_idx is not None else None
        state["stages"].append(entry)
        state["done"] = k
        _write_state(run_dir, state)
        log(f"cascade stage {k}: certifies {entry['train_certified']}/{entry['train_examples']} of its training "
            f"examples ({method.name}, eps {eps:g})")
        models.append(model)
    summary = {"name": cfg.name, "cascade_stages": cfg.cascade.stages, "stages_trained": state["done"],
               "certify": method.name, "eps": cfg.eps.value, "stages": state["stages"],
               "stopped_after": state.get("stopped_after")}
    _write_state(run_dir, state)
    if is_main_process():
        ckpt.atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return CascadeResult(run_dir, models, summary)
