"""Model registry (timm-style).

A *family* module registers builders with :func:`register_model`; users call
:func:`build`::

    from certorch.models import build
    model = build("mnist_small", dataset="mnist")      # Normalize first, takes pixels in [0, 1]

A builder is ``fn(input_shape, num_classes, **kwargs)`` returning either a list of layers
(wrapped into an ``nn.Sequential``) or an ``nn.Module``. :func:`build` prepends
:class:`certorch.nn.Normalize` with the dataset's mean/std (unless ``normalize=False``),
so ``eps`` is always in pixel space.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from certorch.data.registry import dataset_info
from certorch.errors import CertorchError
from certorch.nn.normalize import Normalize

Builder = Callable[..., "nn.Module | Sequence[nn.Module]"]


@dataclass(frozen=True)
class ModelInfo:
    """Metadata attached to a registered model name."""

    name: str
    datasets: tuple[str, ...]
    description: str
    paper: str
    builder: Builder = field(repr=False, compare=False)


_MODELS: dict[str, ModelInfo] = {}


def register_model(
    name: str, datasets: Sequence[str] = ("mnist",), description: str = "", paper: str = ""
) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(input_shape, num_classes, **kwargs)`` under ``name``.

    ``datasets`` are dataset names (aliases accepted) the architecture is meant for;
    :func:`build` refuses others. Re-registering a name with a different builder is an error.
    """
    ds = tuple(dataset_info(d).name for d in datasets)  # validates and canonicalizes

    def deco(fn: Builder) -> Builder:
        old = _MODELS.get(name)
        if old is not None and (old.builder.__module__, old.builder.__qualname__) != (fn.__module__, fn.__qualname__):
            raise CertorchError(f"model name {name!r} is already registered by {old.builder.__module__}")
        _MODELS[name] = ModelInfo(name, ds, description or (fn.__doc__ or "").strip().split("\n")[0], paper, fn)
        return fn

    return deco


def list_models(dataset: str | None = None) -> list[str]:
    """Sorted registered names, optionally only those supporting ``dataset``. Private names
    (a leading underscore, e.g. test-only models) can be built but are not listed."""
    public = {n: i for n, i in _MODELS.items() if not n.startswith("_")}
    if dataset is None:
        return sorted(public)
    key = dataset_info(dataset).name
    return sorted(n for n, i in public.items() if key in i.datasets)


def model_info(name: str) -> ModelInfo:
    """Metadata for ``name``; one-line :class:`CertorchError` listing valid names otherwise."""
    if name not in _MODELS:
        raise CertorchError(f"unknown model {name!r}; valid: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def build(name: str, dataset: str = "mnist", normalize: bool = True, **kwargs: Any) -> nn.Module:
    """Build model ``name`` for ``dataset``: ``Normalize`` (if ``normalize``) then the network.

    Input: pixels in ``[0, 1]`` of shape ``(B, *dataset_info(dataset).input_shape)``;
    output: logits ``(B, num_classes)``. Extra ``kwargs`` go to the family builder.
    """
    info = model_info(name)
    ds = dataset_info(dataset)
    if ds.name not in info.datasets:
        raise CertorchError(
            f"model {name!r} does not support dataset {dataset!r}; supported: {', '.join(info.datasets)}"
        )
    sig = inspect.signature(info.builder)
    try:
        sig.bind(ds.input_shape, ds.num_classes, **kwargs)
    except TypeError:
        accepted = list(sig.parameters)[2:]
        raise CertorchError(
            f"bad arguments {sorted(kwargs)} for model {name!r}; accepted: {', '.join(accepted) or 'none'}"
        ) from None
    body = info.builder(ds.input_shape, ds.num_classes, **kwargs)
    layers: list[nn.Module] = [Normalize(ds.mean, ds.std)] if normalize else []
    if isinstance(body, nn.Sequential):
        layers.extend(body)
    elif isinstance(body, nn.Module):
        layers.append(body)
    else:
        layers.extend(body)
    return nn.Sequential(*layers)


def count_params(model: nn.Module, weights_only: bool = False) -> int:
    """Number of trainable parameters; buffers (Normalize's mean/std, BatchNorm running
    stats) are never counted.

    ``weights_only=True`` counts only the ``weight`` tensors of ``nn.Linear`` / ``nn.Conv2d``
    (no biases, no BatchNorm affine terms), which is how some papers (e.g. MixTrain) report
    network sizes.
    """
    total = 0
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if weights_only and not (pname == "weight" and isinstance(mod, (nn.Linear, nn.Conv2d))):
                continue
            total += p.numel()
    return total


# ----------------------------------------------------------------- helpers for families
def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def output_shape(layers: Sequence[nn.Module], input_shape: Sequence[int]) -> tuple[int, ...]:
    """Per-sample output shape of ``layers`` applied to ``input_shape`` (no forward pass, so
    BatchNorm running stats are untouched). Conv2d / AvgPool2d / MaxPool2d / Flatten are
    computed by formula, other layers are assumed shape-preserving unless they define
    ``output_shape(shape)``."""
    shape = tuple(int(s) for s in input_shape)
    for layer in layers:
        if hasattr(layer, "output_shape") and callable(layer.output_shape):
            shape = tuple(layer.output_shape(shape))
        elif isinstance(layer, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d)):
            k, s, p = _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding)
            d = _pair(getattr(layer, "dilation", 1))
            c = layer.out_channels if isinstance(layer, nn.Conv2d) else shape[0]
            h = (shape[1] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
            w = (shape[2] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
            shape = (c, h, w)
        elif isinstance(layer, nn.Flatten):
            n = 1
            for v in shape:
                n *= v
            shape = (n,)
        elif isinstance(layer, nn.Linear):
            shape = (layer.out_features,)
    return shape


def flat_features(layers: Sequence[nn.Module], input_shape: Sequence[int]) -> int:
    """Number of features after ``layers`` on one ``input_shape`` sample."""
    n = 1
    for v in output_shape(layers, input_shape):
        n *= v
    return n


def conv_stack(
    in_channels: int, spec: Sequence[tuple[int, int, int, int]], batchnorm: bool = False
) -> list[nn.Module]:
    """``[Conv2d(c_in, c, k, s, p), (BatchNorm2d,) ReLU] * len(spec)`` for ``spec`` of ``(c, k, s, p)``."""
    out: list[nn.Module] = []
    c_in = in_channels
    for c, k, s, p in spec:
        out.append(nn.Conv2d(c_in, c, k, stride=s, padding=p))
        if batchnorm:
            out.append(nn.BatchNorm2d(c))
        out.append(nn.ReLU())
        c_in = c
    return out


def mlp_head(in_features: int, hidden: Sequence[int], num_classes: int, batchnorm: bool = False) -> list[nn.Module]:
    """``[Linear, (BatchNorm1d,) ReLU] * len(hidden) + [Linear(.., num_classes)]``."""
    out: list[nn.Module] = []
    d = in_features
    for h in hidden:
        out.append(nn.Linear(d, h))
        if batchnorm:
            out.append(nn.BatchNorm1d(h))
        out.append(nn.ReLU())
        d = h
    out.append(nn.Linear(d, num_classes))
    return out


def conv_net(
    input_shape: Sequence[int],
    num_classes: int,
    convs: Sequence[tuple[int, int, int, int]],
    hidden: Sequence[int],
    batchnorm: bool = False,
) -> list[nn.Module]:
    """Conv stack (``(c, k, s, p)`` per layer, each + ReLU) -> Flatten -> MLP head."""
    feats = conv_stack(input_shape[0], convs, batchnorm=batchnorm) + [nn.Flatten()]
    return feats + mlp_head(flat_features(feats, input_shape), hidden, num_classes, batchnorm=batchnorm)


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int]) -> list[nn.Module]:
    """Flatten -> fully connected ReLU net."""
    d = 1
    for s in input_shape:
        d *= int(s)
    return [nn.Flatten()] + mlp_head(d, hidden, num_classes)
