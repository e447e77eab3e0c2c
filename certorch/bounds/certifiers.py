"""Registry of model-family certifiers (DESIGN.md: families plug in, the generic API does not
import them).

A family whose networks need their own certificate (L_inf-dist nets: a Lipschitz margin rule
instead of a linear relaxation of their layers) registers a :class:`Certifier`:
``applies(model) -> bool`` and ``margins(model, x, y, eps) -> (B,)`` *lower bounds* of the
smallest margin ``logit[y] - logit[j]`` over the ball (float64). :func:`certified` in
``certorch.bounds.api`` and the verifier's family stage both call :func:`find_certifier`.

Family modules are listed by name in :data:`FAMILY_MODULES` and imported on the first lookup,
so registration does not depend on what the user happened to import.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

#: modules that register certifiers when imported
FAMILY_MODULES: tuple[str, ...] = ("certorch.nn.linf_dist_cert",)


@dataclass(frozen=True)
class Certifier:
    name: str
    applies: Callable[[nn.Module], bool]
    margins: Callable[[nn.Module, Tensor, Tensor, "float | Tensor"], Tensor]
    description: str = ""


CERTIFIERS: dict[str, Certifier] = {}
_loaded = False


def register_certifier(c: Certifier) -> Certifier:
    CERTIFIERS[c.name] = c
    return c


def find_certifier(model: nn.Module) -> Certifier | None:
    """The registered family certifier that applies to ``model``, or None (generic bounds)."""
    global _loaded
    if not _loaded:
        for name in FAMILY_MODULES:
            importlib.import_module(name)
        _loaded = True
    for c in CERTIFIERS.values():
        if c.applies(model):
            return c
    return None
