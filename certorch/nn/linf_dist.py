"""L_inf-dist neurons (Zhang et al., ICML 2021, "Towards Certifying L-infinity Robustness using
Neural Networks with L-inf-dist Neurons").

A unit computes ``u_i(x) = ||x - w_i||_p + b_i``. With ``p = inf`` (the true neuron) every
layer is 1-Lipschitz w.r.t. L-inf, so a stack of them is too (Fact 3.4). Finite ``p >= 1``
is the smoothed approximation used early in training (Sec. 5.2); it is *not* 1-Lipschitz
in L-inf and certificates refuse it.

* :class:`LInfDistLinear`, :class:`LInfDistConv2d` (Appendix F: the same neuron on patches).
* :class:`MeanShift`: subtract the per-unit batch mean (training) / running mean (eval);
  no scaling, no affine (Sec. 5.1). A constant shift in eval, so the Lipschitz constant stays 1.
* identity-map initialization for square layers (Sec. 5.3): Gaussian weights, diagonal
  ``w_ii = -10``, so ``||x - w_i||_inf = x_i + 10`` while ``x_i + 10 >= |x_j - w_ij|``.
* :func:`lp_weight_decay` (Eq. 6), :func:`linf_hinge_loss`, :func:`set_p`,
  :func:`check_lipschitz_backbone`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from certorch.errors import CertorchError
from certorch.nn.linf_dist_kernels import CHUNK_ELEMS, IMPLS, check_p, lp_dist
from certorch.nn.normalize import Normalize
from certorch.spec import margins

#: Diagonal value of the identity-map initialization (the paper uses -10 in all experiments).
IDENTITY_VALUE = -10.0


class MeanShift(nn.Module):
    """``x - mean`` per unit (dim 1): batch mean in training, running mean in eval.

    Input (B, C) or (B, C, *spatial); the training mean is over every dim except 1.
    ``running_mean <- (1 - momentum) running_mean + momentum * batch_mean``.
    """

    running_mean: Tensor

    def __init__(self, num_features: int, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise CertorchError(f"MeanShift momentum must lie in [0, 1], got {momentum}")
        self.num_features = int(num_features)
        self.momentum = float(momentum)
        self.register_buffer("running_mean", torch.zeros(self.num_features))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise CertorchError(f"MeanShift({self.num_features}) got input of shape {tuple(x.shape)}")
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean.to(x.dtype)
        return x - mean.view(view)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"


class Negate(nn.Module):
    """``-x``: an L_inf-dist net outputs the negated last layer (large distance = low logit)."""

    def forward(self, x: Tensor) -> Tensor:
        return -x


class _LInfDistBase(nn.Module):
    """Shared state of the L_inf-dist layers: order ``p``, mean shift, bias, identity init."""

    weight: nn.Parameter

    def _setup(
        self, out_units: int, p: float, mean_shift: bool, bias: bool | None, impl: str, chunk_elems: int,
        momentum: float,
    ) -> None:
        self.p = p  # validated by the setter
        if impl not in IMPLS:
            raise CertorchError(f"unknown L_inf-dist impl {impl!r}; valid: {', '.join(IMPLS)}")
        self.impl = impl
        self.chunk_elems = int(chunk_elems)
        # A bias before a mean shift is redundant (the shift removes it): off by default then.
        use_bias = (not mean_shift) if bias is None else bool(bias)
        self.mean_shift = MeanShift(out_units, momentum) if mean_shift else None
        self.bias = nn.Parameter(torch.zeros(out_units)) if use_bias else None

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = check_p(value)

    def _identity_init(self, square: bool, value: float, what: str) -> None:
        if not square:
            raise CertorchError(f"identity init needs a square layer, got {what}")
        with torch.no_grad():
            w = self.weight
            n = w.shape[0]
            idx = torch.arange(n, device=w.device)
            if w.dim() == 2:
                w[idx, idx] = value
            else:  # conv: centre tap of channel i -> unit i
                w[idx, idx, w.shape[2] // 2, w.shape[3] // 2] = value

    def _finish(self, y: Tensor) -> Tensor:
        if self.mean_shift is not None:
            y = self.mean_shift(y)
        if self.bias is not None:
            y = y + self.bias.view((1, -1) + (1,) * (y.dim() - 2)).to(y.dtype)
        return y


class LInfDistLinear(_LInfDistBase):
    """``u_i(x) = ||x - w_i||_p (- mean shift) (+ b_i)`` for x (B, in_features) -> (B, out_features).

    ``p``: ``inf`` (default, 1-Lipschitz in L-inf) or a finite ``p >= 1`` (smoothed training
    approximation; change it any time with ``layer.p = ...`` or :func:`set_p`).
    ``mean_shift``: follow the distance with :class:`MeanShift` (intermediate layers).
    ``bias``: default ``not mean_shift``. ``identity_init``: square layers only; weights
    ~ N(0, 1) with ``w_ii = identity_value`` (-10), so the layer is ``x + 10`` on inputs
    with ``x_i + 10 >= max_j |x_j - w_ij|`` (for example ``|x| <= 2`` at width 5120).
    The kernel never holds the (B, out, in) difference tensor (see ``linf_dist_kernels``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        p: float = math.inf,
        mean_shift: bool = True,
        bias: bool | None = None,
        *,
        identity_init: bool = False,
        identity_value: float = IDENTITY_VALUE,
        momentum: float = 0.1,
        impl: str = "auto",
        chunk_elems: int = CHUNK_ELEMS,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise CertorchError(f"LInfDistLinear needs positive sizes, got {in_features} -> {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.randn(self.out_features, self.in_features))
        self._setup(self.out_features, p, mean_shift, bias, impl, chunk_elems, momentum)
        if identity_init:
            self.identity_init_(identity_value)

    def identity_init_(self, value: float = IDENTITY_VALUE) -> None:
        """Set ``w_ii = value`` (in place); :class:`CertorchError` unless in == out."""
        self._identity_init(
            self.in_features == self.out_features, value, f"{self.in_features} -> {self.out_features} features"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise CertorchError(f"LInfDistLinear expects input (B, {self.in_features}), got {tuple(x.shape)}")
        y = lp_dist(x, self.weight.to(x.dtype), self.p, impl=self.impl, chunk_elems=self.chunk_elems)
        return self._finish(y)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, p={self.p}, "
            f"mean_shift={self.mean_shift is not None}, bias={self.bias is not None}"
        )


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class LInfDistConv2d(_LInfDistBase):
    """Convolutional L_inf-dist layer (Appendix F): ``u_i(patch) = ||patch - w_i||_p``.

    Input (B, C, H, W) -> (B, out_channels, H', W') with the usual conv output size; zero
    padding pads the *input* (a constant, so the layer stays 1-Lipschitz in L-inf at p = inf).
    Patches are unfolded one batch slice at a time (at most ``4 * chunk_elems`` patch entries);
    with autograd on and several slices, each slice is checkpointed, so its unfolded patches
    are recomputed in backward instead of stored. ``identity_init`` needs in == out channels
    (sets the centre tap ``w[i, i, k//2, k//2] = identity_value``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        p: float = math.inf,
        mean_shift: bool = True,
        bias: bool | None = None,
        *,
        identity_init: bool = False,
        identity_value: float = IDENTITY_VALUE,
        momentum: float = 0.1,
        impl: str = "auto",
        chunk_elems: int = CHUNK_ELEMS,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise CertorchError(f"LInfDistConv2d needs positive channels, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise CertorchError("LInfDistConv2d: kernel_size, stride, dilation must be >= 1 and padding >= 0")
        self.weight = nn.Parameter(torch.randn(self.out_channels, self.in_channels, *self.kernel_size))
        self._setup(self.out_channels, p, mean_shift, bias, impl, chunk_elems, momentum)
        if identity_init:
            self.identity_init_(identity_value)

    def identity_init_(self, value: float = IDENTITY_VALUE) -> None:
        """Set the centre tap ``w[i, i] = value`` (in place); error unless in == out channels."""
        self._identity_init(
            self.in_channels == self.out_channels, value, f"{self.in_channels} -> {self.out_channels} channels"
        )

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Per-sample output shape for a per-sample input shape ``(C, H, W)``."""
        _, h, w = shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (
            self.out_channels,
            (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1,
        )

    def _dist(self, xb: Tensor, w: Tensor, ho: int, wo: int) -> Tensor:
        cols = F.unfold(xb, self.kernel_size, self.dilation, self.padding, self.stride)  # (b, CKK, L)
        b, ckk, L = cols.shape
        y = lp_dist(cols.transpose(1, 2).reshape(b * L, ckk), w, self.p, impl=self.impl, chunk_elems=self.chunk_elems)
        return y.view(b, L, -1).transpose(1, 2).reshape(b, -1, ho, wo)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise CertorchError(f"LInfDistConv2d expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        _, ho, wo = self.output_shape(tuple(x.shape[1:]))
        if ho < 1 or wo < 1:
            raise CertorchError(f"LInfDistConv2d: input {tuple(x.shape[2:])} is smaller than the kernel")
        w = self.weight.to(x.dtype).reshape(self.out_channels, -1)
        per_example = w.shape[1] * ho * wo
        step = max(1, (4 * self.chunk_elems) // per_example)
        if x.shape[0] <= step:
            y = self._dist(x, w, ho, wo)
        else:
            grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
            outs = []
            for xb in x.split(step):
                if grad:
                    outs.append(checkpoint(self._dist, xb, w, ho, wo, use_reentrant=False))
                else:
                    outs.append(self._dist(xb, w, ho, wo))
            y = torch.cat(outs)
        return self._finish(y)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, p={self.p}, mean_shift={self.mean_shift is not None}, "
            f"bias={self.bias is not None}"
        )


LINF_DIST_LAYERS = (LInfDistLinear, LInfDistConv2d)


def linf_dist_layers(model: nn.Module) -> list[_LInfDistBase]:
    """All L_inf-dist layers of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, LINF_DIST_LAYERS)]


def set_p(model: nn.Module, p: float) -> None:
    """Set the order ``p`` of every L_inf-dist layer (the training schedule's knob)."""
    q = check_p(p)
    for m in linf_dist_layers(model):
        m.p = q


def get_p(model: nn.Module) -> float | None:
    """The order of the first L_inf-dist layer (None if there is none)."""
    layers = linf_dist_layers(model)
    return layers[0].p if layers else None


# ------------------------------------------------------------------- weight decay (Eq. 6)
def _row_lp_norm(w: Tensor, p: float) -> Tensor:
    """Per-unit ``||w_i||_p`` of ``w`` (O, ...) -> (O,), stable for large p (max-normalized)."""
    a = w.reshape(w.shape[0], -1).abs()
    m = a.amax(dim=1)
    if math.isinf(p):
        return m
    md = m.detach().clamp_min(torch.finfo(a.dtype).tiny)
    return md * (a / md.unsqueeze(1)).pow(p).sum(dim=1).pow(1.0 / p)


def lp_weight_decay(model: nn.Module, p: float | None = None) -> Tensor:
    """The l_p-norm weight decay penalty of the paper: ``sum_layers sum_i ||w_i||_p^2 / 2``.

    Sums over the L_inf-dist layers of ``model`` (conventional layers are left to ordinary
    weight decay); ``p=None`` uses each layer's current order. Its gradient is Eq. 6,
    ``||w_i||_p (|w_ij| / ||w_i||_p)^(p-1) sign(w_ij)`` (``w`` itself at p = 2, only the
    largest |w_ij| of each unit at p = inf): multiply by the decay coefficient and add to
    the loss, or apply the update directly with :func:`lp_decay_direction`.
    """
    total: Tensor | None = None
    for m in linf_dist_layers(model):
        q = m.p if p is None else check_p(p)
        term = 0.5 * _row_lp_norm(m.weight, q).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


@torch.no_grad()
def lp_decay_direction(weight: Tensor, p: float) -> Tensor:
    """Eq. 6 update direction for one layer's weight (O, ...): ``d/dw ||w_i||_p^2 / 2``.

    ``w <- w - lr * coeff * lp_decay_direction(w, p)`` is the decoupled l_p weight decay.
    At p = inf the direction is ``||w_i||_inf sign(w_ij)`` on the first largest entry only.
    """
    q = check_p(p)
    flat = weight.reshape(weight.shape[0], -1)
    a = flat.abs()
    norm = _row_lp_norm(flat, q)
    if math.isinf(q):
        d = torch.zeros_like(flat).scatter_(1, a.argmax(dim=1, keepdim=True), 1.0)
    else:
        d = (a / norm.clamp_min(torch.finfo(a.dtype).tiny).unsqueeze(1)).pow(q - 1.0)
    return (d * torch.sign(flat) * norm.unsqueeze(1)).view_as(weight)


# ------------------------------------------------------------------------------ loss
def linf_hinge_loss(logits: Tensor, y: Tensor, theta: float) -> Tensor:
    """Multi-class hinge loss with threshold ``theta``: ``mean_b max(0, theta - margin_b)``.

    ``margin_b = z[b, y_b] - max_{j != y_b} z[b, j]`` (the top-1 margin that certificates
    use); logits (B, K), y (B,). The loss is zero once every margin reaches ``theta``; pick
    ``theta`` above ``2 * eps * lipschitz_factor`` to aim for certified margins.
    """
    if not math.isfinite(theta) or theta < 0:
        raise CertorchError(f"hinge threshold theta must be finite and >= 0, got {theta}")
    if logits.dim() != 2 or logits.shape[1] < 2 or y.shape != logits.shape[:1]:
        raise CertorchError(
            f"linf_hinge_loss expects logits (B, K>=2) and y (B,), got {tuple(logits.shape)}, {tuple(y.shape)}"
        )
    top1 = margins(logits, y).min(dim=1).values
    return F.relu(theta - top1).mean()


# ------------------------------------------------------------------------ validation
_LIPSCHITZ_OK = (
    LInfDistLinear, LInfDistConv2d, MeanShift, Negate, Normalize, nn.Flatten, nn.Identity, nn.Sequential, nn.ModuleList,
)
_SCALING_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _is_linf_net(m: nn.Module) -> bool:
    """Net containers exposing ``normalize`` / ``backbone`` / ``head`` (the L_inf-dist nets)."""
    return all(isinstance(getattr(m, a, None), nn.Module) for a in ("normalize", "backbone", "head"))


def split_backbone_head(model: nn.Module) -> tuple[nn.Sequential, nn.Module]:
    """``(features, head)`` with ``model(x) == head(features(x))``; ``features`` shares modules.

    Understands an L_inf-dist net (``normalize`` -> ``backbone`` -> ``head``), the same net
    behind a prefix as built by ``certorch.models.build`` (``Sequential(Normalize, net)``),
    and any other module, which is then all backbone with an identity head.
    """
    if _is_linf_net(model):
        return nn.Sequential(model.normalize, model.backbone), model.head
    if isinstance(model, nn.Sequential) and len(model) > 0 and _is_linf_net(model[-1]):
        net = model[-1]
        return nn.Sequential(*list(model)[:-1], net.normalize, net.backbone), net.head
    return nn.Sequential(model), nn.Identity()


def check_lipschitz_backbone(model: nn.Module, require_inf: bool = False) -> None:
    """Refuse modules that void the L-inf Lipschitz guarantee of an L_inf-dist backbone.

    Checks the feature part of ``model`` (see :func:`split_backbone_head`; a conventional
    head is not checked). Allowed: L_inf-dist layers, :class:`MeanShift`, :class:`Negate`,
    ``Normalize`` (its 1/std factor is accounted for by ``lipschitz_factor``), Flatten,
    Identity, Sequential. BatchNorm (and other rescaling norms) raise
    :class:`CertorchError`, as does any other module type, and, with ``require_inf``, any
    layer whose ``p`` is finite.
    """
    features, _ = split_backbone_head(model)
    for name, m in features.named_modules():
        where = name or type(model).__name__
        if isinstance(m, _SCALING_NORMS):
            raise CertorchError(
                f"{type(m).__name__} at {where!r} inside an L_inf-dist backbone rescales features and breaks the "
                "1-Lipschitz guarantee; use MeanShift (mean_shift=True) instead"
            )
        if isinstance(m, LINF_DIST_LAYERS):
            if require_inf and not math.isinf(m.p):
                raise CertorchError(
                    f"L_inf-dist layer {where!r} uses p={m.p}; certificates need p=inf (call set_p(model, inf))"
                )
            continue
        if not isinstance(m, _LIPSCHITZ_OK):
            raise CertorchError(f"module {where!r} ({type(m).__name__}) has no L-inf Lipschitz guarantee in a backbone")
