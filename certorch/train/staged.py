"""Staged training: frozen prefixes and per-module train/eval control.

A staged run (``stages:`` in the config, see :class:`certorch.config.StageConfig`) trains in
consecutive stages. Stage ``l`` may freeze a *prefix* of the model: every layer up to and
including the ``freeze`` layer gets ``requires_grad=False`` (and is left out of the stage's
optimizer) and stays in eval mode while the rest trains, so its BatchNorm running statistics
do not change. Train/eval flags are set per module (:func:`set_train_modes`); the root's
``model.train()`` is never called while a prefix is frozen (it would put the prefix back into
training mode).

The *layers* of a model are its leaf modules in registration order (for the registry's
``nn.Sequential`` models: ``"0"`` = Normalize, ``"1"`` = the first conv, ...). ``freeze`` is a
module name (a leaf or a container: the prefix then ends with the container's last leaf) or
an integer index into the layer list (negative counts from the end).
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from certorch.config.schema import ResolvedStage
from certorch.errors import CertorchError

__all__ = ["layers", "frozen_prefix", "freeze_prefix", "set_train_modes", "stage_at", "check_stages"]


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the model's leaf modules in registration order (the root excluded;
    a model that is a single leaf module has one layer named ``""``)."""
    out = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    return out


def _names(items: list[tuple[str, nn.Module]], limit: int = 12) -> str:
    names = [n or "<root>" for n, _ in items]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} layers)" if len(names) > limit else "")


def frozen_prefix(model: nn.Module, freeze: str | int | None, where: str = "freeze") -> list[nn.Module]:
    """The modules frozen by ``freeze`` (see the module doc): the layers up to and including it,
    plus every container all of whose layers are among them. ``None``: nothing.

    Raises a one-line :class:`CertorchError` for an unknown name or an index out of range.
    """
    if freeze is None:
        return []
    leaves = layers(model)
    if isinstance(freeze, bool) or not isinstance(freeze, (int, str)):
        raise CertorchError(f"{where} must be a layer name or index, got {freeze!r}")
    if isinstance(freeze, int):
        if not -len(leaves) <= freeze < len(leaves):
            raise CertorchError(f"{where}: layer index {freeze} is out of range; the model has {len(leaves)} layers "
                                f"({_names(leaves)})")
        last = freeze % len(leaves)
    else:
        mods = dict(model.named_modules())
        if freeze not in mods or freeze == "":
            raise CertorchError(f"{where}: no layer named {freeze!r} in the model; layers: {_names(leaves)}")
        inside = [i for i, (n, _) in enumerate(leaves) if n == freeze or n.startswith(freeze + ".")]
        if not inside:
            raise CertorchError(f"{where}: module {freeze!r} holds no layer")
        last = inside[-1]
    prefix = {id(m) for _, m in leaves[: last + 1]}
    out = [m for _, m in leaves[: last + 1]]
    for _, m in model.named_modules():
        if m is model or id(m) in prefix:
            continue
        sub = [id(c) for _, c in layers(m)]
        if sub and all(i in prefix for i in sub):
            out.append(m)
    return out


def freeze_prefix(model: nn.Module, frozen: Iterable[nn.Module], trainable: dict[int, bool]) -> None:
    """Set ``requires_grad``: False on the direct parameters of ``frozen`` modules, else the
    parameter's original flag ``trainable[id(p)]`` (parameters a model keeps fixed stay fixed)."""
    off = {id(p) for m in frozen for p in m.parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(trainable.get(id(p), True) and id(p) not in off)


def set_train_modes(model: nn.Module, frozen: Iterable[nn.Module]) -> None:
    """Training mode for every module except the ``frozen`` ones (eval mode), flag by flag.

    With nothing frozen this equals ``model.train()`` for modules that do not override ``train``.
    """
    off = {id(m) for m in frozen}
    for m in model.modules():
        m.training = id(m) not in off


def stage_at(stages: list[ResolvedStage], epoch: int) -> int:
    """Index of the stage that trains (0-based, global) ``epoch``; past the end: the last stage."""
    for s in stages:
        if epoch < s.end:
            return s.index
    return stages[-1].index


def check_stages(model: nn.Module, stages: list[ResolvedStage]) -> list[list[nn.Module]]:
    """Resolve every stage's frozen prefix against ``model`` (one-line errors name the stage)."""
    return [frozen_prefix(model, s.freeze, f"stages[{s.index}].freeze") for s in stages]
