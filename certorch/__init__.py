"""certorch: certified L-infinity robustness for PyTorch.

Quick start::

    import certorch as ct
    b = ct.bound(model, x, eps=0.1, method="crown", y=y)   # b.lower, b.upper: (B, K-1)
    ok = ct.certified(model, x, y, eps=0.1, method="crown")
"""
from certorch.domains.box import Box
from certorch.errors import CertorchError
from certorch.spec import linf_ball, margin_matrix, margins

__version__ = "0.1.0"

__all__ = ["Box", "CertorchError", "linf_ball", "margin_matrix", "margins", "__version__"]


def __getattr__(name):  # lazy: keep `import certorch` light, avoid import cycles
    if name in ("bound", "bound_many", "certified", "BoundResult"):
        from certorch.bounds import api

        return getattr(api, name)
    raise AttributeError(f"module 'certorch' has no attribute {name!r}")
