"""IBP / CROWN-IBP conv nets.

* ``dm_small``, ``dm_medium``, ``dm_large``: Gowal et al., "On the effectiveness of interval
  bound propagation for training verifiably robust models" (2018), as used by CROWN-IBP
  (Zhang et al., ICLR 2020). Paddings follow DeepMind's ``interval-bound-propagation``
  examples: small and medium use ``VALID`` convolutions (padding 0), large uses ``SAME``
  (padding 1 for k3; CROWN-IBP's PyTorch ``IBP_large`` also uses padding 1, which gives
  the same shapes as TF ``SAME`` on even inputs, with symmetric instead of bottom/right
  padding for the stride-2 layer).
* ``cnn7``: the CNN-7 of Shi et al., "Fast certified robust training with short warmup"
  (NeurIPS 2021), ``cnn_7layer_bn2`` in ``shizhouxing/Fast-Certified-Robust-Training``:
  five k3 p1 convs (64, 64, 128 s2, 128, 128), each + BatchNorm2d + ReLU, FC512 +
  BatchNorm1d + ReLU, FC10.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from certorch.models.registry import conv_net, register_model

_GOWAL = "Gowal et al. On the effectiveness of interval bound propagation for training verifiably robust models. 2018"
_CROWN_IBP = "Zhang et al. Towards stable and efficient training of verifiably robust neural networks (CROWN-IBP). ICLR 2020"
_SHI = "Shi, Wang, Zhang, Yi, Hsieh. Fast certified robust training with short warmup. NeurIPS 2021"
_DATASETS = ("mnist", "fashion-mnist", "cifar10")


@register_model(
    "dm_small",
    datasets=_DATASETS,
    description="conv16 k4 s2 p0, conv32 k4 s1 p0, FC100, FC10; 329,606 params (MNIST), 470,918 (CIFAR-10)",
    paper=f"{_GOWAL}; {_CROWN_IBP}",
)
def dm_small(input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    """DM-small (VALID padding)."""
    return conv_net(input_shape, num_classes, [(16, 4, 2, 0), (32, 4, 1, 0)], [100])


@register_model(
    "dm_medium",
    datasets=_DATASETS,
    description="conv32 k3 s1, conv32 k4 s2, conv64 k3 s1, conv64 k4 s2 (p0), FC512, FC512, FC10; 893,418 / 1,188,906 params",
    paper=f"{_GOWAL}; {_CROWN_IBP}",
)
def dm_medium(input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    """DM-medium (VALID padding)."""
    convs = [(32, 3, 1, 0), (32, 4, 2, 0), (64, 3, 1, 0), (64, 4, 2, 0)]
    return conv_net(input_shape, num_classes, convs, [512, 512])


@register_model(
    "dm_large",
    datasets=_DATASETS,
    description="conv64 k3 s1, conv64 k3 s1, conv128 k3 s2, conv128 k3 s1, conv128 k3 s1 (p1), FC512, FC10; 17,190,602 params (CIFAR-10)",
    paper=f"{_GOWAL}; {_CROWN_IBP}",
)
def dm_large(input_shape: Sequence[int], num_classes: int, linear_size: int = 512) -> list[nn.Module]:
    """DM-large (SAME padding = 1)."""
    convs = [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)]
    return conv_net(input_shape, num_classes, convs, [linear_size])


@register_model(
    "cnn7",
    datasets=_DATASETS,
    description="CNN-7: conv64, conv64, conv128 s2, conv128, conv128 (k3 p1, BN, ReLU), FC512 (BN, ReLU), FC10; 17,192,650 params (CIFAR-10)",
    paper=_SHI,
)
def cnn7(input_shape: Sequence[int], num_classes: int, width: int = 64, linear_size: int = 512) -> list[nn.Module]:
    """CNN-7 with BatchNorm (``cnn_7layer_bn2``); ``width`` 128 gives their "wide" variant."""
    w = width
    convs = [(w, 3, 1, 1), (w, 3, 1, 1), (2 * w, 3, 2, 1), (2 * w, 3, 1, 1), (2 * w, 3, 1, 1)]
    return conv_net(input_shape, num_classes, convs, [linear_size], batchnorm=True)
