"""Element-wise activation ops (ReLU; monotone Tanh/Sigmoid for IBP)."""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from certorch.domains.box import Box
from certorch.ops.base import ActivationOp
from certorch.ops.registry import register_function_op, register_module_op
from certorch.relax import relu as relu_relax


class ReluOp(ActivationOp):
    kind = "relu"
    relaxation = relu_relax


def _monotone(f):
    """A relaxation namespace for a monotone increasing function: interval only."""
    return types.SimpleNamespace(fn=f, interval=lambda b: Box(f(b.lower), f(b.upper)), backward=None, deepz=None)


class TanhOp(ActivationOp):
    kind = "tanh"
    relaxation = _monotone(torch.tanh)


class SigmoidOp(ActivationOp):
    kind = "sigmoid"
    relaxation = _monotone(torch.sigmoid)


register_module_op(nn.ReLU)(lambda m, ins, out: ReluOp())
register_module_op(nn.Tanh)(lambda m, ins, out: TanhOp())
register_module_op(nn.Sigmoid)(lambda m, ins, out: SigmoidOp())
register_function_op(torch.relu, F.relu, "relu")(lambda ins, out, a, k: ReluOp())
register_function_op(torch.tanh, "tanh")(lambda ins, out, a, k: TanhOp())
register_function_op(torch.sigmoid, "sigmoid")(lambda ins, out, a, k: SigmoidOp())
