"""Activation ops: ReLU, LeakyReLU, Sigmoid, Tanh (element-wise) and MaxPool2d (max over windows).

Each op carries its relaxation object (:mod:`certorch.relax`); the bound interpreters ask the
object for its lines and intervals and never branch on the op's kind. Adding an activation:
a relaxation module in ``certorch/relax/``, an op class and its registration here, and its
rows in the soundness tests (``tests/unit/test_activation_relaxations.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certorch.ops.base import ActivationOp
from certorch.ops.registry import register_function_op, register_module_op
from certorch.relax import leaky_relu as leaky_relax
from certorch.relax import maxpool as maxpool_relax
from certorch.relax import relu as relu_relax
from certorch.relax import sshape


class ReluOp(ActivationOp):
    kind = "relu"
    relaxation = relu_relax


class LeakyReluOp(ActivationOp):
    kind = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01):
        self.relaxation = leaky_relax.make(negative_slope)


class TanhOp(ActivationOp):
    kind = "tanh"
    relaxation = sshape.tanh


class SigmoidOp(ActivationOp):
    kind = "sigmoid"
    relaxation = sshape.sigmoid


class MaxPool2dOp(ActivationOp):
    """Max over windows: not element-wise; its relaxation gives a dense backward rule."""

    kind = "maxpool"

    def __init__(self, m: nn.MaxPool2d):
        self.relaxation = maxpool_relax.make(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


def _leaky_slope(args, kwargs) -> float:
    if "negative_slope" in kwargs:
        return float(kwargs["negative_slope"])
    return float(args[1]) if len(args) > 1 else 0.01


register_module_op(nn.ReLU)(lambda m, ins, out: ReluOp())
register_module_op(nn.LeakyReLU)(lambda m, ins, out: LeakyReluOp(m.negative_slope))
register_module_op(nn.Tanh)(lambda m, ins, out: TanhOp())
register_module_op(nn.MaxPool2d)(lambda m, ins, out: MaxPool2dOp(m))
register_module_op(nn.Sigmoid)(lambda m, ins, out: SigmoidOp())
register_function_op(torch.relu, F.relu, "relu")(lambda ins, out, a, k: ReluOp())
register_function_op(F.leaky_relu)(lambda ins, out, a, k: LeakyReluOp(_leaky_slope(a, k)))
register_function_op(torch.tanh, "tanh")(lambda ins, out, a, k: TanhOp())
register_function_op(torch.sigmoid, "sigmoid")(lambda ins, out, a, k: SigmoidOp())
