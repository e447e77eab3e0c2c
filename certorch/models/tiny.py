"""Tiny models for the demo and quick tests (scikit-learn ``digits``, 1x8x8; also MNIST)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from certorch.models.registry import conv_net, mlp, register_model

_TINY_DATASETS = ("digits", "mnist", "fashion-mnist")


@register_model(
    "digits_mlp",
    datasets=_TINY_DATASETS,
    description="Flatten -> FC64 -> FC32 -> FC10 (ReLU); 6,570 params on digits",
    paper="certorch demo model",
)
def digits_mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 32)) -> list[nn.Module]:
    """Small ReLU MLP: Flatten, ``hidden`` FC layers, FC ``num_classes``."""
    return mlp(input_shape, num_classes, hidden)


@register_model(
    "digits_cnn",
    datasets=_TINY_DATASETS,
    description="conv8 k3 s1 p1, conv16 k3 s2 p1, FC32, FC10 (ReLU); 9,802 params on digits",
    paper="certorch demo model",
)
def digits_cnn(input_shape: Sequence[int], num_classes: int, width: int = 8, hidden: int = 32) -> list[nn.Module]:
    """Small conv net: conv(w, k3, s1, p1), conv(2w, k3, s2, p1), FC ``hidden``, FC ``num_classes``."""
    return conv_net(input_shape, num_classes, [(width, 3, 1, 1), (2 * width, 3, 2, 1)], [hidden])
