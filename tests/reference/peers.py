"""Import helpers for the peer libraries used in cross-checks (test code only, never the package).

auto_LiRPA 0.3 predates numpy 2 and torch 2.x; these small import-time shims let it run:
* ``numpy.lib.arraysetops`` (removed in numpy 2) -> an alias module exposing ``isin``;
* ``torch.onnx.symbolic_helper._set_opset_version`` (removed) -> a no-op;
* ``torch._C.Node.__getitem__`` (``n["value"]``, removed) -> attribute lookup by kind;
* ``BoundedModule._named_members`` lacks torch's ``remove_duplicate`` keyword -> accept and drop it.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch


def _shim() -> None:  # import-time shims (see module docstring)
    if "numpy.lib.arraysetops" not in sys.modules:
        mod = types.ModuleType("numpy.lib.arraysetops")
        mod.isin = np.isin
        mod.unique = np.unique
        sys.modules["numpy.lib.arraysetops"] = mod
    import torch.onnx.symbolic_helper as sh

    if not hasattr(sh, "_set_opset_version"):
        sh._set_opset_version = lambda v: None
    if not hasattr(torch._C.Node, "__getitem__"):
        torch._C.Node.__getitem__ = lambda self, k: getattr(self, self.kindOf(k))(k)


def auto_lirpa():
    """The auto_LiRPA module, or skip the test with a clear reason."""
    _shim()
    try:
        import auto_LiRPA
        from auto_LiRPA import bound_general
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"auto_LiRPA not usable here ({type(e).__name__}: {e}); install with `make install`")
    cls = bound_general.BoundedModule
    if not getattr(cls, "_certorch_shimmed", False):
        original = cls._named_members

        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
            return original(self, get_members_fn, prefix, recurse)

        cls._named_members = _named_members
        cls._certorch_shimmed = True
    return auto_LiRPA


def convex_adversarial():
    try:
        import convex_adversarial
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"convex_adversarial not usable here ({type(e).__name__}: {e}); install with `make install`")
    return convex_adversarial
