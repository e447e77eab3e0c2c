"""Conv nets of COLT (Balunovic & Vechev, "Adversarial training and provable defenses:
bridging the gap", ICLR 2020), also used by MAAR-style latent-adversary training.

Architectures follow ``code/networks.py`` of the public ``eth-sri/colt`` repository:

* ``colt_mnist`` = ``ConvMed`` with ``width1=2, width2=2, linear_size=100`` (the network of
  the repository's ``trained_models/mnist_0.1_convmed_flat_2_2_100.pt``): conv32 k5 s2 p2,
  conv64 k4 s2 p1, FC100, FC10.
* ``colt_cifar`` = ``ConvMedBig`` with ``width1=2, width2=2, width3=4, linear_size=250``
  (``--net convmedbig_flat_2_2_4_250`` in ``scripts/train_cifar10_*``): conv32 k3 s1 p1,
  conv32 k4 s2 p1, conv128 k4 s2 p1, FC250, FC10. Note: the second conv has kernel 4 in
  the public code (some summaries list kernels 3, 3, 4); we follow the code.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from certorch.models.registry import conv_net, register_model

_PAPER = "Balunovic, Vechev. Adversarial training and provable defenses: bridging the gap. ICLR 2020"


@register_model(
    "colt_mnist",
    datasets=("mnist", "fashion-mnist"),
    description="conv32 k5 s2 p2, conv64 k4 s2 p1, FC100, FC10 (COLT ConvMed 2_2_100); 348,374 params",
    paper=_PAPER,
)
def colt_mnist(input_shape: Sequence[int], num_classes: int, linear_size: int = 100) -> list[nn.Module]:
    """COLT's MNIST ConvMed (widths 32/64 from ``convmed_flat_2_2_100``)."""
    return conv_net(input_shape, num_classes, [(32, 5, 2, 2), (64, 4, 2, 1)], [linear_size])


@register_model(
    "colt_cifar",
    datasets=("cifar10",),
    description="conv32 k3 s1 p1, conv32 k4 s2 p1, conv128 k4 s2 p1, FC250, FC10 (COLT ConvMedBig 2_2_4_250); 2,133,736 params",
    paper=_PAPER,
)
def colt_cifar(input_shape: Sequence[int], num_classes: int, linear_size: int = 250) -> list[nn.Module]:
    """COLT's CIFAR-10 ConvMedBig (``convmedbig_flat_2_2_4_250``)."""
    return conv_net(input_shape, num_classes, [(32, 3, 1, 1), (32, 4, 2, 1), (128, 4, 2, 1)], [linear_size])
