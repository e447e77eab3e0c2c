"""Attack registry: ``register_attack(name)`` / ``build_attack(name, **kw)`` / ``list_attacks()``."""
from __future__ import annotations

from typing import Callable, TypeVar

from certorch.errors import CertorchError

__all__ = ["register_attack", "build_attack", "list_attacks", "attack_class"]

_ATTACKS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_attack(name: str) -> Callable[[T], T]:
    """Class decorator registering an :class:`~certorch.attacks.base.Attack` subclass under ``name``."""
    key = name.lower()

    def deco(cls: T) -> T:
        if key in _ATTACKS and _ATTACKS[key] is not cls:
            raise ValueError(f"attack name {key!r} is already registered to {_ATTACKS[key].__name__}")
        _ATTACKS[key] = cls
        cls.name = key
        return cls

    return deco


def attack_class(name: str) -> type:
    """The registered class for ``name`` (case-insensitive); one-line error listing valid names otherwise."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _ATTACKS:
        raise CertorchError(f"unknown attack {name!r}; valid: {', '.join(list_attacks())}")
    return _ATTACKS[key]


def build_attack(name: str, **kwargs):
    """Instantiate the attack ``name`` with keyword hyperparameters (validated by its constructor).

    Unknown keyword arguments raise :class:`CertorchError` naming them.
    """
    cls = attack_class(name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # unknown / positional kwargs
        raise CertorchError(f"bad arguments for attack {name!r}: {e}") from None


def list_attacks() -> list[str]:
    """Sorted names of the registered attacks."""
    return sorted(_ATTACKS)
