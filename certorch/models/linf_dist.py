"""L_inf-dist nets of Zhang et al. (ICML 2021), Table 5 and Appendix F (Table 8).

Every net is ``normalize -> backbone -> head`` (attributes of the same names):

* :class:`LInfDistNet`: ``depth`` L_inf-dist layers (mean shift after all but the last, the
  last has a bias and ``num_classes`` units), head = :class:`Negate` (logits = -distances).
  Paper: depth 5 (MNIST, Fashion-MNIST), 6 (CIFAR-10), width 5120.
* :class:`LInfDistNetMLP`: ``depth`` L_inf-dist layers, *all* followed by mean shift (the
  Net's top layer is removed), head = FC(hidden) + tanh + FC(num_classes). Paper: 4
  backbone layers for MNIST / Fashion-MNIST, 5 for CIFAR-10, width 5120, hidden 512.
* :class:`LInfDistConvNetMLP` (Appendix F): conv L_inf-dist layers (3x3, padding 1)
  128, 128, 256 (stride 2), 256, 256, then an L_inf-dist layer of 512 units, all with mean
  shift; head FC(512) + tanh + FC(num_classes).

Square layers get the identity-map initialization (Sec. 5.3) unless ``identity_init=False``.
``normalize`` is ``Normalize(mean, std)`` when those are given, else identity: models from
``certorch.models.build`` get their ``Normalize`` in front from the registry instead. With
a scalar std ``s`` the backbone is ``(1/s)``-Lipschitz in pixel space (L-inf, p = inf).
Registry defaults are CPU-friendly (width 1024, fewer channels); pass ``width=5120`` /
``channels=(128, 128, 256, 256, 256), features=512`` for the paper's sizes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from certorch.errors import CertorchError
from certorch.models.registry import register_model
from certorch.nn.linf_dist import LInfDistConv2d, LInfDistLinear, Negate
from certorch.nn.normalize import Normalize

_PAPER = (
    "Zhang, Cai, Lu, He, Wang. Towards Certifying L-infinity Robustness using Neural Networks "
    "with L-inf-dist Neurons. ICML 2021"
)
_DATASETS = ("mnist", "fashion-mnist", "cifar10", "digits")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _check_sizes(depth: int, width: int, min_depth: int = 1) -> None:
    if int(depth) < min_depth:
        raise CertorchError(f"L_inf-dist net depth must be >= {min_depth}, got {depth}")
    if int(width) < 1:
        raise CertorchError(f"L_inf-dist net width must be >= 1, got {width}")


def _normalize(mean: Sequence[float] | float | None, std: Sequence[float] | float | None) -> nn.Module:
    if (mean is None) != (std is None):
        raise CertorchError("give both mean and std (or neither) for the Normalize layer")
    return nn.Identity() if mean is None else Normalize(mean, std)


def _dist_stack(in_dim: int, width: int, n: int, p: float, identity_init: bool) -> list[nn.Module]:
    """``n`` mean-shifted L_inf-dist layers ``in_dim -> width -> ... -> width``."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(n):
        layers.append(LInfDistLinear(d, width, p=p, mean_shift=True, identity_init=identity_init and d == width))
        d = width
    return layers


class _LInfNetBase(nn.Module):
    normalize: nn.Module
    backbone: nn.Sequential
    head: nn.Module

    def features(self, x: Tensor) -> Tensor:
        """Backbone output (B, F) for pixels x: 1-Lipschitz (times 1/std) in L-inf at p = inf."""
        return self.backbone(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class LInfDistNet(_LInfNetBase):
    """Pure L_inf-dist net: logits (B, num_classes) = -(last L_inf-dist layer) for x (B, *input_shape)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 5,
        width: int = 5120,
        *,
        p: float = math.inf,
        identity_init: bool = True,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(depth, width)
        self.normalize = _normalize(mean, std)
        hidden = _dist_stack(_numel(input_shape), width, depth - 1, p, identity_init)
        last_in = width if depth > 1 else _numel(input_shape)
        top = LInfDistLinear(last_in, num_classes, p=p, mean_shift=False, bias=True)
        self.backbone = nn.Sequential(nn.Flatten(), *hidden, top)
        self.head = Negate()


class LInfDistNetMLP(_LInfNetBase):
    """L_inf-dist backbone (``depth`` mean-shifted layers of ``width``) + FC(hidden) tanh FC(num_classes)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 4,
        width: int = 5120,
        hidden: int = 512,
        *,
        p: float = math.inf,
        identity_init: bool = True,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(depth, width)
        self.normalize = _normalize(mean, std)
        self.backbone = nn.Sequential(nn.Flatten(), *_dist_stack(_numel(input_shape), width, depth, p, identity_init))
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


class LInfDistConvNetMLP(_LInfNetBase):
    """Convolutional L_inf-dist backbone (Appendix F) + FC(hidden) tanh FC(num_classes)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (128, 128, 256, 256, 256),
        strides: Sequence[int] = (1, 1, 2, 1, 1),
        features: int = 512,
        hidden: int = 512,
        *,
        kernel_size: int = 3,
        p: float = math.inf,
        identity_init: bool = True,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise CertorchError(f"need one stride per conv layer, got channels={channels}, strides={strides}")
        _check_sizes(len(channels), features)
        self.normalize = _normalize(mean, std)
        layers: list[nn.Module] = []
        shape = tuple(int(s) for s in input_shape)
        for c, s in zip(channels, strides):
            conv = LInfDistConv2d(
                shape[0], c, kernel_size, stride=s, padding=kernel_size // 2, p=p,
                identity_init=identity_init and shape[0] == c and s == 1,
            )
            layers.append(conv)
            shape = conv.output_shape(shape)
        layers += [nn.Flatten(), LInfDistLinear(_numel(shape), features, p=p, mean_shift=True)]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


def _paper_depth(input_shape: Sequence[int]) -> int:
    """Net depth of Table 5: 6 for 3-channel (CIFAR-10) input, 5 otherwise (MNIST-like)."""
    return 6 if int(input_shape[0]) == 3 else 5


@register_model(
    "linf_dist_net",
    datasets=_DATASETS,
    description="L_inf-dist Net: depth 5 (6 on CIFAR-10) L_inf-dist layers + mean shift, width 1024 (paper: 5120)",
    paper=_PAPER,
)
def linf_dist_net(
    input_shape: Sequence[int], num_classes: int, depth: int | None = None, width: int = 1024, **kwargs
) -> nn.Module:
    """Pure L_inf-dist net (Table 5, "L_inf-dist Net"); output = negated last layer."""
    return LInfDistNet(input_shape, num_classes, depth or _paper_depth(input_shape), width, **kwargs)


@register_model(
    "linf_dist_net_mlp",
    datasets=_DATASETS,
    description="L_inf-dist Net+MLP: 4 (5 on CIFAR-10) L_inf-dist layers of 1024 (paper: 5120) + FC512 tanh + FC",
    paper=_PAPER,
)
def linf_dist_net_mlp(
    input_shape: Sequence[int], num_classes: int, depth: int | None = None, width: int = 1024, hidden: int = 512,
    **kwargs,
) -> nn.Module:
    """L_inf-dist backbone (the Net minus its top layer) + 2-layer tanh MLP head (Table 5)."""
    return LInfDistNetMLP(input_shape, num_classes, depth or _paper_depth(input_shape) - 1, width, hidden, **kwargs)


# The public name of the Net+MLP model; ``linf_dist_net_mlp`` above is kept as an alias.
register_model(
    "linf_dist_mlp",
    datasets=_DATASETS,
    description="L_inf-dist Net+MLP (alias linf_dist_net_mlp): L_inf-dist backbone + FC512 tanh + FC",
    paper=_PAPER,
)(linf_dist_net_mlp)


@register_model(
    "linf_dist_conv_mlp",
    datasets=("cifar10", "mnist", "fashion-mnist"),
    description="Conv L_inf-dist Net+MLP (App. F): 5 conv 3x3 layers "
    "(paper 128,128,256s2,256,256; default 32,32,64s2,64,64) "
    "+ L_inf-dist 512 (default 256) + FC512 tanh + FC",
    paper=_PAPER,
)
def linf_dist_conv_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (32, 32, 64, 64, 64),
    strides: Sequence[int] = (1, 1, 2, 1, 1),
    features: int = 256,
    hidden: int = 512,
    **kwargs,
) -> nn.Module:
    """Convolutional L_inf-dist Net+MLP (Table 8), CPU-sized channel defaults."""
    return LInfDistConvNetMLP(input_shape, num_classes, channels, strides, features, hidden, **kwargs)
