"""User-facing errors.

Every problem caused by bad input (wrong shapes, eps < 0, NaN, unknown names, corrupt
files, unsupported layers) raises a :class:`CertorchError` whose message is one line
naming the problem. The CLI prints that line and exits with code 2, no traceback.
"""
from __future__ import annotations


class CertorchError(ValueError):
    """Bad input or unsupported request; the message is one self-contained line."""


class UnsupportedOperationError(CertorchError):
    """A layer or operation the bound engine / verifier cannot handle."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`CertorchError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CertorchError(message)


class MemoryBudgetError(CertorchError):
    """A computation would need more memory than its budget allows (raised before allocating)."""


class DeadlineExceeded(CertorchError):
    """A computation ran past the deadline it was given (checked between layers)."""
