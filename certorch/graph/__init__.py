"""Graph IR and capture from nn.Module (torch.fx)."""
from certorch.graph.capture import capture
from certorch.graph.ir import Graph, Node

__all__ = ["Graph", "Node", "capture"]
