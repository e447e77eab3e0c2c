"""certorch.verify: complete and incomplete verification (LP, MILP, pipeline).

    from certorch.verify import verify_box, certify_batch, Verdict
    r = verify_box(model, box, C, stages="pgd,crown,lp,milp", timeout=60)
"""
from certorch.verify.results import Verdict, VerificationResult
from certorch.verify.pipeline import (
    DEFAULT_STAGES,
    build_stages,
    certify_batch,
    check_timeout,
    normalize_spec,
    run_stages,
    verify_box,
)

__all__ = [
    "DEFAULT_STAGES",
    "Verdict",
    "VerificationResult",
    "build_stages",
    "certify_batch",
    "check_timeout",
    "normalize_spec",
    "run_stages",
    "verify_box",
]
