"""Wong, Schmidt, Metzen, Kolter, "Scaling provable adversarial defenses" (NeurIPS 2018).

Architectures follow the ``examples/problems.py`` of the ``locuslab/convex_adversarial``
repository (``mnist_model``, ``mnist_model_vgg`` [called "large" in the paper],
``cifar_model``, ``cifar_model_large``, ``cifar_model_resnet(N=1, factor=1)``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from certorch.models.registry import conv_net, mlp_head, output_shape, register_model

_PAPER = "Wong, Schmidt, Metzen, Kolter. Scaling provable adversarial defenses. NeurIPS 2018"
_MNIST_LIKE = ("mnist", "fashion-mnist")

_SMALL = [(16, 4, 2, 1), (32, 4, 2, 1)]
_LARGE = [(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)]


@register_model(
    "mnist_small",
    datasets=_MNIST_LIKE,
    description="conv16 k4 s2 p1, conv32 k4 s2 p1, FC100, FC10; 166,406 params on MNIST",
    paper=_PAPER,
)
def mnist_small(input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    """Wong et al.'s small MNIST conv net (``mnist_model``)."""
    return conv_net(input_shape, num_classes, _SMALL, [100])


@register_model(
    "mnist_large",
    datasets=_MNIST_LIKE,
    description="conv32 k3 s1 p1, conv32 k4 s2 p1, conv64 k3 s1 p1, conv64 k4 s2 p1, FC512, FC512, FC10; 1,974,762 params",
    paper=_PAPER,
)
def mnist_large(input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    """Wong et al.'s large MNIST conv net (``mnist_model_vgg`` in their code)."""
    return conv_net(input_shape, num_classes, _LARGE, [512, 512])


@register_model(
    "cifar_small",
    datasets=("cifar10",),
    description="conv16 k4 s2 p1, conv32 k4 s2 p1, FC100, FC10; 214,918 params on CIFAR-10",
    paper=_PAPER,
)
def cifar_small(input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    """Wong et al.'s small CIFAR conv net (``cifar_model``): same layers as ``mnist_small``."""
    return conv_net(input_shape, num_classes, _SMALL, [100])


@register_model(
    "cifar_large",
    datasets=("cifar10",),
    description="conv32 k3 s1 p1, conv32 k4 s2 p1, conv64 k3 s1 p1, conv64 k4 s2 p1, FC512, FC512, FC10; 2,466,858 params",
    paper=_PAPER,
)
def cifar_large(input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    """Wong et al.'s large CIFAR conv net (``cifar_model_large``): same layers as ``mnist_large``."""
    return conv_net(input_shape, num_classes, _LARGE, [512, 512])


class ResBlock(nn.Module):
    """Residual block of Wong et al.'s CIFAR ResNet.

    ``h = relu(conv_a(x))``; ``out = relu(conv_skip(x) + conv_b(h))`` where, without
    downsampling, conv_a is k3 s1 p1 and conv_skip k1 s1 p0, and with downsampling conv_a
    is k4 s2 p1 and conv_skip k2 s2 p0; conv_b is always k3 s1 p1. The forward pass has no
    data-dependent control flow, so ``torch.fx.symbolic_trace`` captures the ``+``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, downsample: bool = False) -> None:
        super().__init__()
        if downsample:
            self.conv_a = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
            self.conv_skip = nn.Conv2d(in_channels, out_channels, 2, stride=2, padding=0)
        else:
            self.conv_a = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
            self.conv_skip = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)
        self.relu_a = nn.ReLU()
        self.conv_b = nn.Conv2d(out_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2)
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu_a(self.conv_a(x))
        return self.relu_out(self.conv_skip(x) + self.conv_b(h))

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return output_shape([self.conv_a, self.conv_b], shape)


@register_model(
    "cifar_resnet",
    datasets=("cifar10",),
    description="conv16 k3, ResBlocks 16-16, 16-16, 16-32 (down), 32-64 (down), FC1000, FC10; 4,214,850 params",
    paper=_PAPER,
)
def cifar_resnet(input_shape: Sequence[int], num_classes: int, n: int = 1, factor: int = 1) -> list[nn.Module]:
    """Wong et al.'s CIFAR ResNet (``cifar_model_resnet(N=n, factor=factor)``; defaults as in the paper)."""
    w = 16 * factor
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], 16, 3, stride=1, padding=1), nn.ReLU()]
    layers.append(ResBlock(16, w, 3, downsample=False))
    layers += [ResBlock(w, w, 3, downsample=False) for _ in range(n)]
    layers.append(ResBlock(w, 2 * w, 3, downsample=True))
    layers += [ResBlock(2 * w, 2 * w, 3, downsample=False) for _ in range(n - 1)]
    layers.append(ResBlock(2 * w, 4 * w, 3, downsample=True))
    layers += [ResBlock(4 * w, 4 * w, 3, downsample=False) for _ in range(n - 1)]
    layers.append(nn.Flatten())
    d = 1
    for v in output_shape(layers, input_shape):
        d *= v
    return layers + mlp_head(d, [1000], num_classes)
