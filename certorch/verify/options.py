"""Stage options written after a stage's name: ``bab:branch_candidates=3:batch=32``,
``alpha-crown:iters=5``. One parser for every stage that takes options (a frozen dataclass
whose fields are the keys); unknown keys and bad values are one-line errors."""
from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

from certorch.errors import CertorchError

T = TypeVar("T")


def parse_stage_options(cls: type[T], text: str, stage: str) -> T:
    """``cls(**options)`` from ``key=value`` pairs separated by ``:``; each value is converted to
    the type of the field's default (bool: true/false/1/0; int; float). ``stage`` names the
    stage in error messages."""
    defaults = cls()
    names = [f.name for f in fields(cls)]
    kw: dict[str, int | float | bool] = {}
    for item in filter(None, text.split(":")):
        key, eq, value = (t.strip() for t in item.partition("="))
        if not eq or key not in names:
            raise CertorchError(f"{stage} option {item!r} is not key=value with a key among: {', '.join(names)}")
        if isinstance(getattr(defaults, key), bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise CertorchError(f"{stage} option {key} takes true or false, got {value!r}")
            kw[key] = value.lower() in ("true", "1")
        else:
            kind = type(getattr(defaults, key))
            try:
                kw[key] = kind(value)
            except ValueError:
                raise CertorchError(f"{stage} option {key} takes {'an integer' if kind is int else 'a number'}, "
                                    f"got {value!r}") from None
    return cls(**kw)
