"""The one training loop: config in, run directory out; objectives plug in by name.

    from certorch.config import load_config
    from certorch.train import Trainer
    result = Trainer(load_config("configs/digits_demo.yaml", ["epochs=2"]), run_dir="runs/x").fit()

Everything that can fail on bad input (objective params, dataset, model, optimizer) is
built in ``Trainer.__init__``, before the run directory is created, so a bad config
leaves nothing behind. ``fit`` writes ``config.yaml``, one checkpoint per
``checkpoint.every`` epochs, ``metrics.jsonl``/``metrics.csv``, ``summary.json`` and
``curves.png``. ``Trainer(..., resume=True)`` continues from the newest complete
checkpoint and reproduces the uninterrupted run exactly (same seed, same device).

A run with ``stages:`` trains stage after stage (:mod:`certorch.train.staged`): each stage has
its own epochs, optimizer (fresh), lr / eps / objective schedules (restarted at the stage's
epoch 0), ``method.params`` overrides and frozen prefix. The stage index is in every
checkpoint and metrics record; ``summary.json`` has an entry per stage.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certorch.config.schema import OptimConfig, ResolvedStage, TrainConfig, config_from_dict, config_to_yaml
from certorch.config.typed import to_dict
from certorch.errors import CertorchError
from certorch.nn.mode import eval_mode
from certorch.spec import check_finite
from certorch.train import checkpoint as ckpt
from certorch.train.metrics import PLOT, plot_curves, read_history, write_history
from certorch.train.objectives import Objective, TrainState, build_objective
from certorch.train.schedules import Ramp, eps_schedule, lr_factor, named_schedule
from certorch.train.staged import check_stages, freeze_prefix, set_train_modes, stage_at
from certorch.train.state import load_optimizer_state, load_rng_state, optimizer_state, rng_state, seed_everything

__all__ = ["Trainer", "RunResult", "resolve_device", "build_optimizer", "epoch_batches", "evaluate", "is_main_process"]

SUMMARY = "summary.json"
CONFIG = "config.yaml"


# ------------------------------------------------------------------ hooks for distributed training
def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` unless ``torch.distributed`` is initialized."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Only the main process logs, writes files and shows progress bars."""
    return world()[0] == 0


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Index batches (each (b,) int64) of one epoch over ``n`` examples in a random order.

    The order comes from ``generator`` (checkpointed). Under distributed training each rank
    takes every ``world_size``-th index of the same permutation. A final batch of a single
    example is dropped (BatchNorm cannot train on it).
    """
    rank, size = world()
    perm = torch.randperm(n, generator=generator)[rank::size]
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() < 2:
        batches.pop()
    return batches


# ------------------------------------------------------------------ building blocks
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CertorchError("device: cuda requested but no CUDA GPU is available (use device=auto or cpu)")
    return torch.device(name)


def build_optimizer(cfg: TrainConfig, objective: Objective, model: nn.Module, optim: OptimConfig | None = None,
                    trainable_only: bool = False) -> torch.optim.Optimizer:
    """sgd / adam / adamw over the objective's parameter groups (per-group weight decay).

    ``optim`` replaces ``cfg.optim`` (a stage's optimizer); ``trainable_only`` drops parameters
    with ``requires_grad=False`` (a frozen prefix) and groups left empty."""
    o = optim if optim is not None else cfg.optim
    groups = objective.param_groups(model, o.weight_decay)
    if trainable_only:
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise CertorchError("the frozen prefix leaves no parameter to train (freeze fewer layers)")
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay)


@torch.no_grad()
def _clean_pass(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and the (B,) mask of correctly classified examples."""
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="sum"), logits.argmax(1) == y


def evaluate(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, objective: Objective | None = None) -> dict[str, float]:
    """Held-out metrics of ``model`` on (N, C, H, W) ``x``, (N,) ``y``: ``eval_loss``,
    ``nat_acc``, ``pgd_acc`` (attack ``cfg.eval.attack`` at ``cfg.eval_eps``, seeded) plus the
    objective's :meth:`~Objective.eval_metrics` (means over all of ``x``, computed per eval batch).
    Global RNG states are left untouched."""
    from certorch.attacks import build_attack

    e = cfg.eval
    eps = cfg.eval_eps
    kwargs: dict[str, Any] = {}
    if e.attack == "pgd":
        kwargs = {"steps": e.steps, "restarts": e.restarts, "step_size": e.step_size, "seed": cfg.seed}
    attack = build_attack(e.attack, **kwargs)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    robust = torch.zeros((), device=x.device, dtype=torch.long)
    extra: dict[str, float] = {}
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(model):  # every module's own flag restored after
        for xb, yb in zip(x.split(e.batch_size), y.split(e.batch_size)):
            l, ok = _clean_pass(model, xb, yb)
            loss_sum += l
            correct += ok.sum()
            if eps > 0:  # robust: correct on the clean input AND the attacked one
                robust += (ok & ~attack(model, xb, yb, eps).success).sum()
            else:
                robust += ok.sum()
            if objective is not None:  # per-batch means, summed with batch-size weights
                for k, v in objective.eval_metrics(model, xb, yb, eps).items():
                    extra[k] = extra.get(k, 0.0) + float(v) * len(yb)
    n = max(len(y), 1)
    extra = {k: v / n for k, v in extra.items()}
    return {"eval_loss": float(loss_sum) / n, "nat_acc": float(correct) / n, f"{e.attack}_acc": float(robust) / n, **extra}


@dataclass
class RunResult:
    """What :meth:`Trainer.fit` returns."""

    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def _tensor_mean(total: Tensor | float, n: int) -> float:
    return float(total) / max(n, 1)


# ------------------------------------------------------------------ the trainer
class Trainer:
    """Train ``cfg`` into ``run_dir``; see the module docstring.

    ``data_dir`` overrides ``cfg.data.data_dir`` (the CLI's ``--data-dir``). ``log`` receives
    one line per epoch (main process only).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        data_dir: str | None = None,
        log: Any = None,
        train_indices: Tensor | None = None,
        eval_indices: Tensor | None = None,
    ) -> None:
        from certorch.data import load
        from certorch.models import build

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.log = log if log is not None else (lambda s: print(s, file=sys.stderr))
        if resume and ckpt.latest_checkpoint(self.run_dir / ckpt.CKPT_DIR) is None:
            raise CertorchError(f"cannot resume: no complete checkpoint in {self.run_dir / ckpt.CKPT_DIR}")
        self._check_run_dir()
        self.device = resolve_device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.stages: list[ResolvedStage] = cfg.resolved_stages()
        self.staged = cfg.stages is not None
        self.objectives = [build_objective(cfg.method.name, s.params, f"stages[{s.index}].params" if self.staged
                                           else "method.params") for s in self.stages]
        for o in self.objectives:
            o.check(cfg)
        self.objective = self.objectives[0]
        ddir = data_dir if data_dir is not None else cfg.data.data_dir
        train = load(cfg.data.dataset, "train", data_dir=ddir, subset=cfg.data.subset)
        evalset = load(cfg.data.dataset, cfg.data.eval_split, data_dir=ddir, subset=cfg.eval.size or None) if cfg.eval.size else None
        check_finite(train.images, "training images")
        if evalset is not None:
            check_finite(evalset.images, "evaluation images")
        self.dataset = train.name
        self.train_x, self.train_y = train.images, train.labels
        if train_indices is not None:  # a cascade stage: only the examples earlier stages cannot certify
            if train_indices.numel() < 2:
                raise CertorchError(f"cannot train on {train_indices.numel()} example(s): need at least 2")
            self.train_x, self.train_y = self.train_x[train_indices], self.train_y[train_indices]
        if evalset is not None and eval_indices is not None and eval_indices.numel() == 0:
            evalset = None  # a cascade stage whose held-out examples are all certified by earlier stages
        self.eval_x = evalset.images.to(self.device) if evalset is not None else None
        self.eval_y = evalset.labels.to(self.device) if evalset is not None else None
        if evalset is not None and eval_indices is not None:
            self.eval_x, self.eval_y = self.eval_x[eval_indices.to(self.device)], self.eval_y[eval_indices.to(self.device)]
        self.data_gen = seed_everything(cfg.seed)
        self.model = build(cfg.model.name, dataset=cfg.data.dataset, **cfg.model.kwargs).to(self.device)
        self._trainable = {id(p): p.requires_grad for p in self.model.parameters()}
        self.frozen_by_stage = check_stages(self.model, self.stages)
        self.stage = -1
        self.frozen: list[nn.Module] = []
        self.optimizer: torch.optim.Optimizer
        self.base_lrs: list[float] = []
        self.eps_ramp: Ramp
        self.named: dict[str, Ramp] = {}
        for s in range(1, len(self.stages)):  # a stage that freezes everything fails now, not mid-run
            self._enter_stage(s, carry=False)
        self._enter_stage(0, carry=False)
        self.steps_per_epoch = len(epoch_batches(len(self.train_y), cfg.batch_size, torch.Generator()))
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.seconds = 0.0

    def _check_run_dir(self) -> None:
        if not self.resume and self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
            raise CertorchError(f"run directory {self.run_dir} already exists and is not empty (use --resume or another --out)")

    # -------------------------------------------------------------- stages
    def _enter_stage(self, s: int, carry: bool = True) -> None:
        """Make stage ``s`` current: its frozen prefix, objective (``carry``: with the current
        objective's state), a fresh optimizer over the trainable parameters, its schedules."""
        plan = self.stages[s]
        obj = self.objectives[s]
        if carry and obj is not self.objective:
            obj.load_state_dict(self.objective.state_dict())
        self.objective = obj
        self.frozen = self.frozen_by_stage[s]
        freeze_prefix(self.model, self.frozen, self._trainable)
        self.optimizer = build_optimizer(self.cfg, obj, self.model, plan.optim, trainable_only=bool(self.frozen))
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.eps_ramp = eps_schedule(plan.eps)
        self.named = {k: named_schedule(v, plan.eps) for k, v in obj.schedules().items()}
        self.stage = s

    # -------------------------------------------------------------- state
    def schedule_values(self, t: float) -> tuple[float, dict[str, float]]:
        """Training eps and named schedule values at time ``t`` (epochs)."""
        return self.eps_ramp(t), {k: r(t) for k, r in self.named.items()}

    def _save(self, epoch: int, record: dict[str, Any]) -> Path:
        opt_t, opt_j = optimizer_state(self.optimizer)
        rng_t, rng_j = rng_state(self.data_gen)
        state_json = {"optimizer": opt_j, "rng": rng_j, "epoch": epoch, "seconds": self.seconds, "base_lrs": self.base_lrs,
                      "objective": self.objective.state_dict()}
        if self.staged:
            state_json["stage"] = self.stage
        path = ckpt.save_checkpoint(
            self.run_dir / ckpt.CKPT_DIR, epoch, self.model, to_dict(self.cfg), record, {**opt_t, **rng_t}, state_json
        )
        stage_ends = frozenset(plan.end for plan in self.stages) if self.staged else frozenset()  # kept: each stage's model
        ckpt.prune_checkpoints(self.run_dir / ckpt.CKPT_DIR, self.cfg.checkpoint.keep, stage_ends)
        return path

    def _restore(self) -> None:
        c = ckpt.load_checkpoint(self.run_dir)
        ckpt.load_weights_into(self.model, c.weights, c.path)
        tensors, state = ckpt.load_train_state(c)
        epoch = int(state.get("epoch", c.epoch))
        saved = state.get("stage", 0)
        if isinstance(saved, bool) or not isinstance(saved, int) or saved < 0:
            raise CertorchError(f"corrupt checkpoint {c.path}: 'stage' must be an integer >= 0, got {saved!r}")
        if saved >= len(self.stages):
            raise CertorchError(f"checkpoint {c.path} was saved in stage {saved}, but the config has {len(self.stages)} stage(s)")
        s = stage_at(self.stages, epoch)
        at_boundary = saved == s - 1 and epoch == self.stages[s].start  # stage `saved` ended with this checkpoint
        if saved != s and not at_boundary:
            raise CertorchError(f"checkpoint {c.path} does not fit the stages: epoch {epoch} is in stage {s}, the checkpoint says {saved}")
        if s != self.stage:
            self._enter_stage(s)
        if not at_boundary:  # the next stage starts with a fresh optimizer, as in an uninterrupted run
            load_optimizer_state(self.optimizer, tensors, state.get("optimizer") or {})
        load_rng_state(self.data_gen, tensors, state.get("rng") or {})
        obj_state = state.get("objective") or {}
        if not isinstance(obj_state, dict):
            raise CertorchError(f"corrupt checkpoint {c.path}: objective state must be a mapping")
        self.objective.load_state_dict(obj_state)
        self.start_epoch = epoch
        self.seconds = float(state.get("seconds", 0.0))
        self.history = [r for r in read_history(self.run_dir) if int(r.get("epoch", 0)) <= self.start_epoch]
        if c.metrics and not any(r.get("epoch") == self.start_epoch for r in self.history):
            self.history.append(c.metrics)

    # -------------------------------------------------------------- loop
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data; returns the epoch's averaged training metrics."""
        from certorch.data import augment_batch

        cfg, model, opt = self.cfg, self.model, self.optimizer
        plan = self.stages[self.stage]
        e = epoch - plan.start  # the stage's own epoch: its schedules restart at 0
        batches = epoch_batches(len(self.train_y), cfg.batch_size, self.data_gen)
        spe = len(batches)
        set_train_modes(model, self.frozen)  # a frozen prefix stays in eval mode (BatchNorm statistics kept)
        sums: dict[str, Tensor] = {}
        n_seen, n_acc = 0, 0
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        bar = None
        if cfg.progress and is_main_process():
            from tqdm import tqdm

            desc = f"epoch {epoch + 1}/{cfg.epochs}" + (f" stage {self.stage}" if self.staged else "")
            bar = tqdm(total=spe, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)
        eps = 0.0
        values: dict[str, float] = {}
        lr = 0.0
        for i, idx in enumerate(batches):
            xb, yb = self.train_x[idx], self.train_y[idx]
            if cfg.data.augment:
                xb = augment_batch(xb, self.dataset, self.data_gen)
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            t = e + i / spe
            eps, values = self.schedule_values(t)
            lr_f = lr_factor(plan.lr_schedule, e + (i + 1) / spe, plan.epochs, plan.optim.lr)
            for g, base in zip(opt.param_groups, self.base_lrs):
                g["lr"] = base * lr_f
            lr = self.base_lrs[0] * lr_f
            state = TrainState(
                epoch=e, step=epoch * spe + i, epoch_step=i, steps_per_epoch=spe, total_epochs=plan.epochs,
                t=t, progress=t / plan.epochs, eps=eps, eps_target=plan.eps.value, lr=lr, values=values, stage=self.stage,
            )
            out = self.objective(model, xb, yb, eps, state)
            if not bool(torch.isfinite(out.loss)):
                raise CertorchError(f"training diverged: loss is {float(out.loss.detach())} at epoch {epoch + 1}, step {i + 1} (try a lower optim.lr)")
            opt.zero_grad(set_to_none=True)  # after the objective: attacks must not leak into .grad
            out.loss.backward()
            if plan.optim.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), plan.optim.grad_clip)
            opt.step()
            b = yb.shape[0]
            n_seen += b
            sums["loss"] = sums.get("loss", 0) + out.loss.detach() * b
            for k, v in out.metrics.items():
                v = v.detach() if isinstance(v, Tensor) else torch.tensor(float(v), device=self.device)
                sums[k] = sums.get(k, 0) + v * b
            if out.logits is not None:
                correct += (out.logits.argmax(1) == yb).sum()
                n_acc += b
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}", eps=f"{eps:.3g}")
        if bar is not None:
            bar.close()
        rec: dict[str, Any] = {"train_loss": _tensor_mean(sums.pop("loss", 0), n_seen)}
        if n_acc:
            rec["train_acc"] = _tensor_mean(correct, n_acc)
        rec.update({f"train_{k}": _tensor_mean(v, n_seen) for k, v in sums.items()})
        rec.update({"eps": eps, "lr": lr, **values})
        return rec

    def fit(self, stop_after: int | None = None) -> RunResult:
        """Train to ``cfg.epochs`` (from the checkpoint when resuming). ``stop_after=k`` stops
        after epoch ``k`` as if the process were killed (used to test resuming)."""
        self._check_run_dir()
        created = existed_empty = False
        if not self.resume:
            existed_empty = self.run_dir.is_dir()
            created = True
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.resume:
                self._restore()
            if is_main_process():
                ckpt.atomic_write_text(self.run_dir / CONFIG, config_to_yaml(self.cfg))
            self._loop(stop_after)
        except BaseException:
            if created and ckpt.latest_checkpoint(self.run_dir / ckpt.CKPT_DIR) is None:
                shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing worth keeping
                if existed_empty:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
            raise
        summary = self.summary()
        if is_main_process():
            plot_curves(self.history, self.run_dir / PLOT, title=f"{self.cfg.name} ({self.cfg.method.name})")
        return RunResult(self.run_dir, self.model, self.history, summary)

    def _warn_eps(self) -> None:
        """Say once when an eps schedule does not reach eps.value within its (stage's) epochs."""
        for plan in self.stages:
            end = eps_schedule(plan.eps)(float(plan.epochs))
            if end < plan.eps.value and is_main_process():  # documented behaviour: train anyway, say so once
                where = f"stage {plan.index}: " if self.staged else ""
                self.log(f"warning: {where}the eps schedule is longer than training: eps reaches {end:.4g} of eps.value = "
                         f"{plan.eps.value:g} after {plan.epochs} epochs (warmup_epochs + ramp_epochs = "
                         f"{plan.eps.warmup_epochs + plan.eps.ramp_epochs:g})")

    def _loop(self, stop_after: int | None) -> None:
        cfg = self.cfg
        self._warn_eps()
        for epoch in range(self.start_epoch, cfg.epochs):
            s = stage_at(self.stages, epoch)
            if s != self.stage:
                self._enter_stage(s)
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"epoch": epoch + 1}
            if self.staged:
                rec["stage"] = s
            rec.update(self.train_epoch(epoch))
            t1 = time.perf_counter()
            rec["train_seconds"] = t1 - t0
            last = epoch + 1 == cfg.epochs
            stage_end = self.staged and epoch + 1 == self.stages[s].end
            if self.eval_x is not None and ((epoch + 1) % cfg.eval.every == 0 or last or stage_end):
                rec.update(evaluate(self.model, self.eval_x, self.eval_y, cfg, self.objective))
                rec["eval_eps"] = cfg.eval_eps
            rec["eval_seconds"] = time.perf_counter() - t1
            rec.update({k: v for k, v in self.objective.state_dict().items() if isinstance(v, (int, float))
                        and not isinstance(v, bool) and not k.startswith("_")})  # the state this epoch trained with
            self.objective.after_epoch(epoch + 1, rec)
            self.seconds += time.perf_counter() - t0
            rec["seconds"] = time.perf_counter() - t0
            self.history.append(rec)
            if is_main_process():
                if (epoch + 1) % cfg.checkpoint.every == 0 or last or stage_end or stop_after == epoch + 1:
                    self._save(epoch + 1, rec)
                write_history(self.run_dir, self.history)
                ckpt.atomic_write_text(self.run_dir / SUMMARY, json.dumps(self.summary(), indent=2) + "\n")
                self.log(_epoch_line(rec, cfg.epochs))
            if stop_after is not None and epoch + 1 >= stop_after:
                break

    def summary(self) -> dict[str, Any]:
        """The small ``summary.json`` of the run."""
        from certorch.models import count_params

        last = self.history[-1] if self.history else {}
        latest = ckpt.latest_checkpoint(self.run_dir / ckpt.CKPT_DIR)
        out = {
            "name": self.cfg.name,
            "dataset": self.dataset,
            "model": self.cfg.model.name,
            "method": self.cfg.method.name,
            "params": count_params(self.model),
            "device": str(self.device),
            "epochs": self.cfg.epochs,
            "epochs_done": int(last.get("epoch", 0)),
            "train_eps": self.cfg.eps.value,
            "eval_eps": self.cfg.eval_eps,
            "eval_size": 0 if self.eval_y is None else int(len(self.eval_y)),
            "seconds": round(self.seconds, 3),
            "final": {k: v for k, v in last.items() if not k.endswith("seconds")},
            "checkpoint": str(latest.relative_to(self.run_dir)) if latest is not None else None,
        }
        if self.staged:
            out["stages"] = [self._stage_summary(plan) for plan in self.stages]
        return out

    def _stage_summary(self, plan: ResolvedStage) -> dict[str, Any]:
        recs = [r for r in self.history if r.get("stage") == plan.index]
        last = recs[-1] if recs else {}
        return {
            "stage": plan.index,
            "name": plan.name,
            "freeze": plan.freeze,
            "epochs": plan.epochs,
            "first_epoch": plan.start + 1,
            "epochs_done": len(recs),
            "seconds": round(sum(float(r.get("seconds", 0.0)) for r in recs), 3),
            "final": {k: v for k, v in last.items() if not k.endswith("seconds")},
        }


def _epoch_line(rec: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {rec['epoch']}/{epochs}"] + ([f"stage {rec['stage']}"] if "stage" in rec else [])
    for key in ("train_loss", "eps", "nat_acc", "pgd_acc"):
        if key in rec and isinstance(rec[key], float) and math.isfinite(rec[key]):
            parts.append(f"{key} {rec[key]:.4f}")
    parts.append(f"{rec.get('seconds', 0.0):.1f}s")
    return "  ".join(parts)


def config_of_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The resolved config stored in ``run_dir/config.yaml``, with overrides applied."""
    from certorch.config.schema import read_yaml

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CertorchError(f"no {CONFIG} in {run_dir}: not a certorch run directory")
    return config_from_dict(read_yaml(path), overrides)
