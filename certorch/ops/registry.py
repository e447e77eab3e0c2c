"""Op registry: maps torch modules / functions to certorch ops.

``register_module_op(nn.Linear)`` registers a factory ``(module, in_shapes, out_shape) -> Op``;
``register_function_op(torch.relu, "relu")`` registers a factory for fx ``call_function`` targets
and ``call_method`` names. Lookup of modules follows the class MRO (subclasses of a registered
type are supported); anything else fails with a message naming the module and the supported list.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from certorch.errors import UnsupportedOperationError

Shape = tuple[int, ...]
ModuleFactory = Callable[[nn.Module, list[Shape], Shape], "Any"]
FunctionFactory = Callable[[list[Shape], Shape, tuple, dict], "Any"]

MODULE_OPS: dict[type, ModuleFactory] = {}
FUNCTION_OPS: dict[Any, FunctionFactory] = {}


def register_module_op(*types: type) -> Callable[[ModuleFactory], ModuleFactory]:
    def deco(factory: ModuleFactory) -> ModuleFactory:
        for t in types:
            MODULE_OPS[t] = factory
        return factory

    return deco


def register_function_op(*targets: Any) -> Callable[[FunctionFactory], FunctionFactory]:
    def deco(factory: FunctionFactory) -> FunctionFactory:
        for t in targets:
            FUNCTION_OPS[t] = factory
        return factory

    return deco


def supported_modules() -> list[str]:
    return sorted({t.__name__ for t in MODULE_OPS})


def module_factory(module: nn.Module, path: str) -> ModuleFactory:
    for cls in type(module).__mro__:
        if cls in MODULE_OPS:
            return MODULE_OPS[cls]
    raise UnsupportedOperationError(
        f"unsupported module {path!r} ({type(module).__name__}); supported: {', '.join(supported_modules())}"
    )


def is_registered_module(module: nn.Module) -> bool:
    return any(cls in MODULE_OPS for cls in type(module).__mro__)


def function_factory(target: Any, where: str) -> FunctionFactory:
    if target in FUNCTION_OPS:
        return FUNCTION_OPS[target]
    name = getattr(target, "__name__", str(target))
    supported = sorted({getattr(t, "__name__", str(t)) for t in FUNCTION_OPS})
    raise UnsupportedOperationError(f"unsupported operation {name!r} at {where!r}; supported: {', '.join(supported)}")
