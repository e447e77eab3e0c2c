"""Bound engine: IBP, zonotope, symbolic intervals, CROWN, CROWN-IBP, dual network."""
from certorch.bounds.api import BoundResult, bound, bound_many, certified
from certorch.bounds.methods import METHODS, BoundMethod, get_method, list_methods, register_method

__all__ = ["bound", "bound_many", "certified", "BoundResult", "BoundMethod", "METHODS", "get_method", "list_methods", "register_method"]
