"""certorch.nn"""
from certorch.nn.normalize import Normalize

__all__ = ["Normalize"]
