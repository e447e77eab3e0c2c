"""VNN-LIB 1.0 properties (the VNN-COMP format): parser and representation.

A property declares real inputs ``X_0 .. X_{n-1}`` and outputs ``Y_0 .. Y_{m-1}`` (indices into
the flattened network input / output) and asserts constraints. VNN-COMP semantics: the asserted
formula describes the *unsafe* set; the answer is ``sat`` when some input in the box has an
output satisfying it (then a counterexample exists) and ``unsat`` when none does.

certorch represents a property as :class:`VnnlibProperty`: an input box ``lower <= X <= upper``
plus a disjunction of output regions; region ``k`` is the conjunction
``C_k @ Y + d_k <= 0`` (row-wise). The value ``max_r (C_r Y + d_r)`` of a region is <= 0 exactly
when ``Y`` lies in it, the convention of :mod:`certorch.verify.milp`.

Supported syntax: ``(declare-const X_i Real)``, ``(assert F)`` with ``F`` built from ``and``,
``or``, ``<=``, ``>=`` (``<``, ``>`` are read as their non-strict forms, as VNN-COMP tools do)
over linear expressions (numbers incl. scientific notation, variables, ``+``, ``-``, ``*`` by
constants), ``;`` comments. Input constraints must be bounds on single inputs and may not sit
inside a disjunction. Errors are :class:`CertorchError` naming the file, the line and the reason.

Limits (checked before any large allocation, each a one-line error): files larger than
:data:`MAX_VNNLIB_BYTES`, nesting deeper than :data:`MAX_DEPTH` parentheses, more than
:data:`MAX_DISJUNCTS` regions. The parser reads one top-level command at a time (memory grows with
the largest command, not the file), and with ``deadline=`` (a ``time.perf_counter()`` value) it
stops with :class:`~certorch.errors.DeadlineExceeded` once the deadline has passed.

The PyPI ``vnnlib`` package was considered: its 1.x releases target the VNN-LIB 2.0 grammar
(not the 1.0 files of VNN-COMP) and ship compiled wheels for a single Python version, so this
small parser is used instead.
"""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from certorch.domains.box import Box
from certorch.errors import CertorchError, DeadlineExceeded

__all__ = ["Region", "VnnlibProperty", "load_vnnlib", "parse_vnnlib", "MAX_DISJUNCTS", "MAX_DEPTH",
           "MAX_VNNLIB_BYTES"]

#: refuse properties whose disjunctive normal form has more regions than this
MAX_DISJUNCTS = 10_000
#: refuse formulas nested deeper than this many parentheses (VNN-COMP files use fewer than 10)
MAX_DEPTH = 200
#: refuse files larger than this (the largest VNN-COMP properties, e.g. 224x224x3 input boxes, are ~20 MB)
MAX_VNNLIB_BYTES = 256 * 2**20
_DEADLINE_EVERY = 4096  # tokens between two deadline checks

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_VAR = re.compile(r"([XY])_(\d{1,9})")
_TOKEN = re.compile(r"(\()|(\))|([^\s();]+)|(;[^\n]*)|(\n)")  # groups: open, close, word, comment, newline


@dataclass(frozen=True)
class Region:
    """One conjunction of output constraints: ``C @ y + d <= 0`` row-wise.

    ``C``: (R, n_outputs) float64, ``d``: (R,) float64.
    """

    C: Tensor
    d: Tensor

    def value(self, y: Tensor) -> Tensor:
        """(B,) ``max_r (C_r y + d_r)`` for (B, n_outputs) ``y``; <= 0 means inside the region."""
        C, d = self.C.to(y), self.d.to(y)
        return (y @ C.T + d).max(dim=1).values


@dataclass(frozen=True)
class VnnlibProperty:
    """Input box (``lower``/``upper``: (n_inputs,) float64) and the unsafe output regions."""

    lower: Tensor
    upper: Tensor
    regions: tuple[Region, ...]
    num_outputs: int
    source: str = "<string>"

    @property
    def num_inputs(self) -> int:
        return self.lower.numel()

    def input_box(self, input_shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float64) -> Box:
        """The input box as a batch of one: (1, *input_shape) (default (1, n_inputs))."""
        shape = (1, *(input_shape if input_shape is not None else (self.num_inputs,)))
        return Box(self.lower.to(dtype).reshape(shape), self.upper.to(dtype).reshape(shape))

    def violation(self, y: Tensor) -> Tensor:
        """(B,) ``min_k value_k(y)`` for (B, n_outputs) outputs: <= 0 iff ``y`` is unsafe."""
        y = y.reshape(y.shape[0], -1)
        return torch.stack([r.value(y) for r in self.regions], dim=1).min(dim=1).values

    def check_network(self, input_numel: int, output_numel: int) -> None:
        """Raise a one-line error unless the property's sizes match the network's."""
        if self.num_inputs != input_numel:
            raise CertorchError(
                f"{self.source}: property declares {self.num_inputs} inputs but the network takes {input_numel}"
            )
        if self.num_outputs != output_numel:
            raise CertorchError(
                f"{self.source}: property declares {self.num_outputs} outputs but the network has {output_numel}"
            )


# --- reading --------------------------------------------------------------------------------


def load_vnnlib(path: str | Path, deadline: float | None = None, max_bytes: int = MAX_VNNLIB_BYTES) -> VnnlibProperty:
    """Parse the VNN-LIB file at ``path`` (see module doc); files over ``max_bytes`` are refused
    before reading."""
    p = Path(path)
    if not p.is_file():
        raise CertorchError(f"VNN-LIB file not found: {path}")
    size = os.stat(p).st_size
    if size > max_bytes:
        raise CertorchError(f"{path}: VNN-LIB file is {size / 2**20:.1f} MiB, more than the limit of "
                            f"{max_bytes / 2**20:.0f} MiB")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CertorchError(f"{path}: not a text file (VNN-LIB must be UTF-8 text)") from None
    return parse_vnnlib(text, source=str(path), deadline=deadline)


class _List(list):
    """An s-expression list that remembers the line of its opening parenthesis."""

    line: int = 0


@dataclass(frozen=True)
class _Atom:
    text: str
    line: int


def _sexprs(text: str, source: str, deadline: float | None = None) -> Iterator[_List]:
    """Top-level s-expressions of ``text``, one at a time (iterative; depth <= MAX_DEPTH)."""
    def err(line: int, msg: str) -> CertorchError:
        return CertorchError(f"{source} line {line}: {msg}")

    stack: list[_List] = []
    line, count = 1, 0
    for m in _TOKEN.finditer(text):
        kind = m.lastindex
        if kind == 5:
            line += 1
            continue
        count += 1
        if deadline is not None and count % _DEADLINE_EVERY == 0 and time.perf_counter() > deadline:
            raise DeadlineExceeded(f"{source}: parsing did not finish before the time limit (line {line})")
        if kind == 1:
            if len(stack) >= MAX_DEPTH:
                raise err(line, f"parentheses nested more than {MAX_DEPTH} levels deep")
            lst = _List()
            lst.line = line
            stack.append(lst)
        elif kind == 2:
            if not stack:
                raise err(line, "unbalanced ')'")
            done = stack.pop()
            if stack:
                stack[-1].append(done)
            else:
                yield done
        elif kind == 3:
            if not stack:
                raise err(line, f"unexpected {m.group(3)!r} outside parentheses")
            stack[-1].append(_Atom(m.group(3), line))
    if stack:
        raise err(stack[-1].line, "'(' is never closed")


class _Linear:
    """``coef . vars + const`` with vars keyed ("X"|"Y", index)."""

    def __init__(self, coef: dict | None = None, const: float = 0.0):
        self.coef = coef or {}
        self.const = const

    def scaled(self, s: float) -> "_Linear":
        return _Linear({k: v * s for k, v in self.coef.items()}, self.const * s)

    def plus(self, o: "_Linear") -> "_Linear":
        c = dict(self.coef)
        for k, v in o.coef.items():
            c[k] = c.get(k, 0.0) + v
        return _Linear(c, self.const + o.const)


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.declared: dict[tuple[str, int], int] = {}

    def err(self, line: int, msg: str) -> CertorchError:
        return CertorchError(f"{self.source} line {line}: {msg}")

    @staticmethod
    def line_of(e) -> int:
        return e.line if isinstance(e, (_Atom, _List)) else 0

    def head(self, e: _List) -> str:
        if not e or not isinstance(e[0], _Atom):
            raise self.err(e.line, "expected an operator after '('")
        return e[0].text

    def declare(self, e: _List) -> None:
        if len(e) != 3 or not all(isinstance(a, _Atom) for a in e):
            raise self.err(e.line, "expected (declare-const NAME Real)")
        name, typ = e[1].text, e[2].text
        m = _VAR.fullmatch(name)
        if m is None:
            raise self.err(e.line, f"variable {name!r} must be named X_<i> (input) or Y_<i> (output)")
        if typ != "Real":
            raise self.err(e.line, f"variable {name} must have type Real, got {typ}")
        key = (m.group(1), int(m.group(2)))
        if key in self.declared:
            raise self.err(e.line, f"variable {name} is declared twice")
        self.declared[key] = e.line

    def expr(self, e) -> _Linear:
        if isinstance(e, _Atom):
            if _NUMBER.fullmatch(e.text):
                v = float(e.text)
                if not math.isfinite(v):
                    raise self.err(e.line, f"number {e.text} is out of range")
                return _Linear({}, v)
            m = _VAR.fullmatch(e.text)
            if m is None:
                raise self.err(e.line, f"unknown symbol {e.text!r} (expected a number or a declared X_i / Y_i)")
            key = (m.group(1), int(m.group(2)))
            if key not in self.declared:
                raise self.err(e.line, f"variable {e.text} is used but not declared (declare it before use)")
            return _Linear({key: 1.0})
        op = self.head(e)
        args = [self.expr(a) for a in e[1:]]
        if not args:
            raise self.err(e.line, f"operator {op!r} needs arguments")
        if op == "+":
            out = args[0]
            for a in args[1:]:
                out = out.plus(a)
            return out
        if op == "-":
            if len(args) == 1:
                return args[0].scaled(-1.0)
            out = args[0]
            for a in args[1:]:
                out = out.plus(a.scaled(-1.0))
            return out
        if op == "*":
            out = args[0]
            for a in args[1:]:
                if out.coef and a.coef:
                    raise self.err(e.line, "product of two variables is not linear")
                out = a.scaled(out.const) if not out.coef else out.scaled(a.const)
            return out
        raise self.err(e.line, f"unsupported arithmetic operator {op!r} (expected +, -, *)")

    def formula(self, e) -> list[list[tuple[_Linear, int]]]:
        """DNF of a formula: a list of conjunctions of atoms ``(lin, line)`` meaning ``lin <= 0``."""
        if not isinstance(e, _List):
            raise self.err(self.line_of(e), f"expected a constraint, got {e.text!r}")
        op = self.head(e)
        if op in ("<=", ">=", "<", ">"):
            if len(e) != 3:
                raise self.err(e.line, f"({op} a b) takes exactly two arguments, got {len(e) - 1}")
            a, b = self.expr(e[1]), self.expr(e[2])
            lin = a.plus(b.scaled(-1.0)) if op in ("<=", "<") else b.plus(a.scaled(-1.0))
            if not (math.isfinite(lin.const) and all(math.isfinite(v) for v in lin.coef.values())):
                raise self.err(e.line, "a coefficient of this constraint is out of range (overflow)")
            return [[(lin, e.line)]]
        if op in ("and", "or"):
            parts = [self.formula(a) for a in e[1:]]
            if not parts:
                raise self.err(e.line, f"({op}) needs at least one argument")
            if op == "or":
                out = [conj for p in parts for conj in p]
            else:
                out = [[]]
                for p in parts:
                    if len(out) * len(p) > MAX_DISJUNCTS:
                        raise self.err(e.line, f"formula expands to more than {MAX_DISJUNCTS} disjuncts")
                    out = [c + d for c in out for d in p]
            if len(out) > MAX_DISJUNCTS:
                raise self.err(e.line, f"formula expands to more than {MAX_DISJUNCTS} disjuncts")
            return out
        raise self.err(e.line, f"unsupported operator {op!r} (expected and, or, <=, >=)")


def parse_vnnlib(text: str, source: str = "<string>", deadline: float | None = None) -> VnnlibProperty:
    """Parse VNN-LIB 1.0 text into a :class:`VnnlibProperty` (see module doc).

    Variables must be declared before they are used (SMT-LIB order)."""
    p = _Parser(source)
    lower: dict[int, float] = {}
    upper: dict[int, float] = {}
    out_conj: list[tuple[_Linear, int]] = []
    out_dnf: list[list[list[tuple[_Linear, int]]]] = []
    for e in _sexprs(text, source, deadline):
        op = p.head(e)
        if op == "declare-const":
            p.declare(e)
            continue
        if op != "assert":
            raise p.err(e.line, f"unsupported command {op!r} (expected declare-const or assert)")
        if len(e) != 2:
            raise p.err(e.line, "(assert F) takes exactly one formula")
        dnf = p.formula(e[1])
        if len(dnf) == 1:
            for lin, line in dnf[0]:
                if _kind(p, lin, line) == "X":
                    _bound(p, lin, line, lower, upper)
                else:
                    out_conj.append((lin, line))
        else:
            for conj in dnf:
                for lin, line in conj:
                    if _kind(p, lin, line) == "X":
                        raise p.err(line, "input constraints inside a disjunction (or) are not supported")
            out_dnf.append(dnf)
    n_in = _count(p, "X")
    n_out = _count(p, "Y")
    for i in range(n_in):
        name_line = p.declared[("X", i)]
        lo, hi = lower.get(i, -math.inf), upper.get(i, math.inf)
        if not math.isfinite(lo):
            raise p.err(name_line, f"input X_{i} has no lower bound")
        if not math.isfinite(hi):
            raise p.err(name_line, f"input X_{i} has no upper bound")
        if lo > hi:
            raise p.err(name_line, f"input X_{i} has an empty range [{lo}, {hi}]")
    if not out_conj and not out_dnf:
        raise CertorchError(f"{source}: the property has no constraint on the outputs Y")
    conjs: list[list[tuple[_Linear, int]]] = [list(out_conj)]
    for dnf in out_dnf:
        if len(conjs) * len(dnf) > MAX_DISJUNCTS:
            raise CertorchError(f"{source}: the property expands to more than {MAX_DISJUNCTS} disjuncts")
        conjs = [c + d for c in conjs for d in dnf]
    regions = tuple(_region(c, n_out) for c in conjs if c)
    lo_t = torch.tensor([lower[i] for i in range(n_in)], dtype=torch.float64)
    hi_t = torch.tensor([upper[i] for i in range(n_in)], dtype=torch.float64)
    return VnnlibProperty(lo_t, hi_t, regions, n_out, source)


def _count(p: _Parser, kind: str) -> int:
    idx = sorted(i for k, i in p.declared if k == kind)
    if not idx:
        raise CertorchError(f"{p.source}: no {'input X_i' if kind == 'X' else 'output Y_i'} variables are declared")
    if idx != list(range(len(idx))):
        missing = next(i for i in range(len(idx) + 1) if i not in set(idx))
        raise CertorchError(f"{p.source}: {kind}_{missing} is not declared ({kind} indices must be 0..n-1)")
    return len(idx)


def _kind(p: _Parser, lin: _Linear, line: int) -> str:
    kinds = {k for k, _ in lin.coef if lin.coef[(k, _)] != 0}
    if not kinds:
        raise p.err(line, "constraint has no variables (constant comparison)")
    if len(kinds) > 1:
        raise p.err(line, "constraint mixes inputs X and outputs Y")
    return kinds.pop()


def _bound(p: _Parser, lin: _Linear, line: int, lower: dict[int, float], upper: dict[int, float]) -> None:
    """``a * X_i + c <= 0`` tightens X_i's bound."""
    terms = [(k, v) for k, v in lin.coef.items() if v != 0]
    if len(terms) != 1:
        raise p.err(line, "input constraints must bound a single input X_i")
    (_, i), a = terms[0]
    t = -lin.const / a
    if a > 0:
        upper[i] = min(upper.get(i, math.inf), t)
    else:
        lower[i] = max(lower.get(i, -math.inf), t)


def _region(conj: list[tuple[_Linear, int]], n_out: int) -> Region:
    rows, cols, vals = [], [], []
    for r, (lin, _) in enumerate(conj):
        for (_, j), v in lin.coef.items():
            rows.append(r)
            cols.append(j)
            vals.append(v)
    C = torch.zeros(len(conj), n_out, dtype=torch.float64)
    C.index_put_((torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)),
                 torch.tensor(vals, dtype=torch.float64), accumulate=True)
    d = torch.tensor([lin.const for lin, _ in conj], dtype=torch.float64)
    return Region(C, d)
