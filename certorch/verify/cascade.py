"""Certifying a cascade of models (Wong et al. 2018, Algorithm 2), two ways.

A cascade predicts with the first model that certifies an input, else with the last model.

* **Paper rule** (Algorithm 2, the numbers of its Table 2): model k+1 is tried on the examples
  models 1..k did not certify; an example counts as robust when some model certifies it. This
  rule is *not* sound: a point ``x'`` of the ball around a certified ``x`` may fail the first
  model's certificate at ``x'`` and be routed to a later model that predicts another class
  (Chi, Mangal et al., "On the Perils of Cascading Robust Classifiers", 2023).
* **Sound rule** (certorch): which model a point ``x'`` of the ball is routed to depends on the
  certifier's answer *at x'*, and an incomplete certifier may fail at ``x'`` even where the
  model is robust. So the cascade is robust at ``(x, y)`` when every model predicts ``y`` on the
  ball (each certified at ``eps``: wherever ``x'`` is routed, the answer is ``y``), or, for a
  cascade that routes with **IBP** certificates, when for some k models 1..k-1 are certified at
  ``eps`` and IBP certifies model k at ``2 eps``: IBP is inclusion-monotone and ``B(x', eps)``
  lies in ``B(x, 2 eps)``, so IBP certifies model k at every ``x'`` of the ball, every ``x'`` is
  routed to a model j <= k, and each of those predicts ``y`` on the ball. (A non-monotone
  router such as CROWN with adaptive slopes gives no such guarantee.)

Each certificate is one run of the verification pipeline (:func:`certify_batch`). Model k's
certificate of example i is computed once (the paper rule runs model k where models 1..k-1 all
failed, the sound rule where they all succeeded: disjoint sets for k >= 2), reported chunk by
chunk through ``record`` and taken from ``known`` when given (resuming a killed run).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from certorch.nn.mode import eval_mode
from certorch.verify.pipeline import certify_batch
from certorch.verify.results import Verdict


def _verified(model: nn.Module, x: Tensor, y: Tensor, eps: float, stages, timeout, threads: int,
              chunk: int) -> Tensor:
    """Verified (N,) bool of ``model`` on every example, one pipeline run per chunk."""
    ok = []
    for xb, yb in zip(x.split(chunk), y.split(chunk)):
        rs = certify_batch(model, xb, yb, eps, stages, timeout, threads=threads)
        ok += [r.verdict == Verdict.VERIFIED for r in rs]
    return torch.tensor(ok, dtype=torch.bool)


def paper_rule(certified: Sequence[Tensor], preds: Sequence[Tensor], y: Tensor) -> list[dict[str, float]]:
    """Per stage k, the cascade of models 1..k by Algorithm 2: ``robust_err`` (1 - fraction
    certified by some model <= k), ``std_err`` (error of the cascade's prediction: the first
    certifying model's, else model k's) and ``certified_here`` (first certified by model k)."""
    n = len(y)
    rows, first = [], torch.full((n,), -1, dtype=torch.long)
    for k, (c, p) in enumerate(zip(certified, preds)):
        new = c & (first < 0)
        first[new] = k
        pred = p.clone()
        for j in range(k + 1):  # few stages: a loop over models, not over examples
            pred[first == j] = preds[j][first == j]
        rows.append({"stage": k + 1, "certified_here": int(new.sum()), "robust_err": float((first < 0).float().mean()),
                     "std_err": float((pred != y).float().mean())})
    return rows


def sound_rule(cert_eps: Sequence[Tensor], ibp_2eps: Sequence[Tensor] | None = None) -> Tensor:
    """Bool (N,): the sound cascade certificate (module doc) from per-model certificates at eps
    and, for an IBP-routed cascade, IBP certificates at 2 eps (each (N,) bool, cascade order)."""
    n = cert_eps[0].numel()
    prefix = torch.ones(n, dtype=torch.bool)  # models 1..k-1 certified at eps
    robust = torch.zeros(n, dtype=torch.bool)
    for k, c in enumerate(cert_eps):
        if ibp_2eps is not None:
            robust |= prefix & ibp_2eps[k]
        prefix &= c
    return robust | prefix


def certify_cascade(models: Sequence[nn.Module], x: Tensor, y: Tensor, eps: float, stages="pgd,ibp,crown,lp,milp",
                    timeout: float = 60.0, threads: int = 1, chunk: int = 64, sound: bool = True,
                    known: Mapping[tuple[int, int], bool] | None = None,
                    record: Callable[[int, list[int], list[bool]], None] | None = None) -> dict[str, Any]:
    """Report of a cascade on (N, ...) ``x`` with labels ``y``: the paper's per-stage table and,
    with ``sound``, the sound cascade robust error.

    ``known``: ``{(model k, example index): verified}`` from an earlier run, not recomputed;
    ``record(k, indices, verified)`` is called after every chunk certified here (progress,
    persistence). Models are numbered from 0, examples by their position in ``x``.

    The sound rule needs model k's certificate at ``eps`` only where models 1..k-1 are all
    certified (elsewhere it cannot change the answer, see :func:`sound_rule`), so model k runs on
    those examples only, and model 1's certificates are the paper rule's (it runs on every
    example there). ``sound_certified[k]`` says on how many examples model k ran and how many it
    certified; model 1's single-model robust error is ``1 - certified / examples``."""
    known = dict(known or {})

    def verified(k: int, idx: Tensor) -> Tensor:
        """Model k's certificates (n,) of examples ``idx`` (n,): ``known`` ones reused, the rest run."""
        todo = idx[torch.tensor([(k, i) not in known for i in idx.tolist()], dtype=torch.bool)]
        for part in todo.split(chunk) if todo.numel() else ():  # (split of an empty tensor yields one empty part)
            v = _verified(models[k], x[part], y[part], eps, stages, timeout, threads, chunk)
            known.update({(k, i): bool(b) for i, b in zip(part.tolist(), v.tolist())})
            if record is not None:
                record(k, part.tolist(), v.tolist())
        return torch.tensor([known[(k, i)] for i in idx.tolist()], dtype=torch.bool)

    certified, preds = [], []
    remaining = torch.ones(len(y), dtype=torch.bool)
    for k, model in enumerate(models):  # paper rule: each model sees only what earlier ones did not certify
        c = torch.zeros(len(y), dtype=torch.bool)
        idx = remaining.nonzero().flatten()
        if idx.numel():
            c[idx] = verified(k, idx)
        with eval_mode(model), torch.no_grad():  # the caller's train/eval flags are restored
            p = next(model.parameters(), None)
            preds.append(torch.cat([model(xb.to(p.dtype)).argmax(1).cpu() for xb in x.split(chunk)]))
        certified.append(c)
        remaining &= ~c
    report: dict[str, Any] = {"eps": eps, "examples": len(y), "paper_rule": paper_rule(certified, preds, y.cpu())}
    if sound:
        from certorch.bounds.api import certified as ct_certified

        at_eps, prefix, counts = [], torch.ones(len(y), dtype=torch.bool), []
        for k, m in enumerate(models):
            if k == 0:
                c = certified[0]  # the paper rule ran model 1 on every example
            else:
                c = torch.zeros(len(y), dtype=torch.bool)
                idx = prefix.nonzero().flatten()
                if idx.numel():
                    c[idx] = verified(k, idx)
            counts.append({"stage": k + 1, "evaluated": int(prefix.sum()), "certified": int((c & prefix).sum())})
            at_eps.append(c)
            prefix = prefix & c
        ibp2 = [torch.cat([ct_certified(m, xb, yb, 2 * eps, method="ibp").cpu()
                           for xb, yb in zip(x.split(chunk), y.split(chunk))]) for m in models]
        report["sound_robust_err"] = float((~sound_rule(at_eps)).float().mean())
        report["sound_robust_err_ibp_routed"] = float((~sound_rule(at_eps, ibp2)).float().mean())
        report["sound_certified"] = counts
    return report
