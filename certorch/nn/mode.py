"""Per-module train/eval control that restores every module's own flag afterwards.

``model.eval(); ...; model.train(was)`` on the root is wrong for models whose submodules have
their own flags (a frozen BatchNorm inside a training model, COLT's frozen prefix): it resets
them all to the root's flag. :func:`eval_mode` records each module's flag and restores it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode for the ``with`` block; restore each flag after.

    The model is changed only while the block runs (not thread-safe for concurrent users of
    the same model object).
    """
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def modes(model: nn.Module) -> dict[str, bool]:
    """``{qualified name: training flag}`` of every module (the root is ``""``)."""
    return {name: m.training for name, m in model.named_modules()}
