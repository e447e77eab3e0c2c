"""Verification results: a verdict enum and a named dataclass (DESIGN.md item 8)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import Tensor


class Verdict(str, Enum):
    """Outcome of verifying one property.

    ``NOT_VERIFIED``: the clean input is already misclassified (nothing to certify).
    ``ERROR``: a stage crashed; never reported as ``UNKNOWN``.
    """

    VERIFIED = "verified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"
    TIMEOUT = "timeout"
    ERROR = "error"
    NOT_VERIFIED = "not_verified"

    def __str__(self) -> str:
        return self.value


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class VerificationResult:
    """One example's verification outcome.

    Attributes:
        verdict: the :class:`Verdict`.
        stage: name of the deciding stage (``None`` when nothing decided).
        margin_lb: best proven lower bound of the property value (min over output regions of
            ``max_r C_r f + d_r``; for classification: the smallest margin); ``-inf`` if none.
        seconds: total wall time for this example.
        stage_seconds: wall time per stage that ran on this example.
        counterexample: (*input_shape) float64 input inside the box whose float64 forward pass
            violates the property (only for ``FALSIFIED``).
        margin_ub: property value at the counterexample (``FALSIFIED``), else ``+inf``.
        message: the error for ``ERROR``, else a short note (may be empty).
        index: position of the example in its data set (pipeline), or None.
        label: the label (classification), or None.
    """

    verdict: Verdict
    stage: str | None
    margin_lb: float
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    counterexample: Tensor | None = None
    margin_ub: float = math.inf
    message: str = ""
    index: int | None = None
    label: int | None = None

    @property
    def decided(self) -> bool:
        return self.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED, Verdict.NOT_VERIFIED)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (the counterexample is stored apart; infinities become null)."""
        return {
            "index": self.index,
            "label": self.label,
            "verdict": self.verdict.value,
            "stage": self.stage,
            "margin_lb": _num(self.margin_lb),
            "margin_ub": _num(self.margin_ub),
            "seconds": round(float(self.seconds), 6),
            "stage_seconds": {k: round(float(v), 6) for k, v in self.stage_seconds.items()},
            "message": self.message,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "VerificationResult":
        lb, ub = d.get("margin_lb"), d.get("margin_ub")
        return VerificationResult(
            verdict=Verdict(d["verdict"]),
            stage=d.get("stage"),
            margin_lb=-math.inf if lb is None else float(lb),
            seconds=float(d.get("seconds", 0.0)),
            stage_seconds=dict(d.get("stage_seconds", {})),
            margin_ub=math.inf if ub is None else float(ub),
            message=d.get("message", ""),
            index=d.get("index"),
            label=d.get("label"),
        )
