"""A small graph IR: a topologically ordered list of nodes; node 0 is the input."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from certorch.ops.base import ActivationOp, AffineOp, InputOp, Op


@dataclass
class Node:
    index: int
    name: str  # module path or fx node name, for error messages and per-layer access
    op: Op
    inputs: tuple[int, ...]
    shape: tuple[int, ...]  # per-example output shape (no batch dim)

    @property
    def is_affine(self) -> bool:
        return isinstance(self.op, AffineOp)

    @property
    def is_activation(self) -> bool:
        return isinstance(self.op, ActivationOp)

    @property
    def is_input(self) -> bool:
        return isinstance(self.op, InputOp)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Graph:
    nodes: list[Node]
    output: int
    users: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.users = {n.index: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                self.users[i].append(n.index)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.nodes[self.output].shape

    def node(self, key: int | str) -> Node:
        if isinstance(key, int):
            return self.nodes[key]
        for n in self.nodes:
            if n.name == key:
                return n
        raise KeyError(f"no node named {key!r}; nodes: {[n.name for n in self.nodes]}")

    def ancestors(self, target: int) -> list[int]:
        """Indices of ``target`` and all nodes it depends on, in topological order."""
        seen = {target}
        stack = [target]
        while stack:
            for i in self.nodes[stack.pop()].inputs:
                if i not in seen:
                    seen.add(i)
                    stack.append(i)
        return sorted(seen)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Concrete forward pass; returns every node's value (list indexed by node)."""
        values: list[Tensor] = [x]
        for n in self.nodes[1:]:
            values.append(n.op.forward(*(values[i] for i in n.inputs)))
        return values

    def activation_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.is_activation]

    def __repr__(self) -> str:
        lines = [f"Graph(output={self.output})"]
        for n in self.nodes:
            lines.append(f"  %{n.index} {n.name}: {n.op.kind}{list(n.inputs)} -> {n.shape}")
        return "\n".join(lines)
