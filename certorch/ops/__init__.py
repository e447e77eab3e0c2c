"""Op registry and the supported ops (importing this registers them)."""
from certorch.ops import activations, affine  # noqa: F401  (registration side effects)
from certorch.ops.base import ActivationOp, AffineOp, InputOp, Op
from certorch.ops.registry import register_function_op, register_module_op, supported_modules

__all__ = ["Op", "AffineOp", "ActivationOp", "InputOp", "register_module_op", "register_function_op", "supported_modules"]
