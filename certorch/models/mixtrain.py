"""Fully connected MNIST nets of MixTrain (Wang, Chen, Abdou, Jana, "MixTrain: Scalable
training of verifiably robust neural networks", 2018).

The paper reports sizes as numbers of weights, biases not counted:
``mnist_fc1`` 784-512-512-10 has 668,672 weights, ``mnist_fc2`` (five hidden layers of 2048)
has 18,403,328 (see ``count_params(model, weights_only=True)``).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from certorch.models.registry import mlp, register_model

_PAPER = "Wang, Chen, Abdou, Jana. MixTrain: Scalable training of verifiably robust neural networks. arXiv:1811.02625"
_MNIST_LIKE = ("mnist", "fashion-mnist")


@register_model(
    "mnist_fc1",
    datasets=_MNIST_LIKE,
    description="FC 784-512-512-10 (ReLU); 668,672 weights (669,706 params with biases)",
    paper=_PAPER,
)
def mnist_fc1(input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    """MixTrain's MNIST_FC1: two hidden layers of 512."""
    return mlp(input_shape, num_classes, [512, 512])


@register_model(
    "mnist_fc2",
    datasets=_MNIST_LIKE,
    description="FC 784-2048x5-10 (ReLU); 18,403,328 weights (18,413,578 params with biases)",
    paper=_PAPER,
)
def mnist_fc2(input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    """MixTrain's MNIST_FC2: five hidden layers of 2048."""
    return mlp(input_shape, num_classes, [2048] * 5)
