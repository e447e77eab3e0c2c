"""certorch.nn"""
from certorch.nn.normalize import Normalize

__all__ = ["Normalize"]
from certorch.nn.linf_dist import LInfDistConv2d, LInfDistLinear, MeanShift  # noqa: E402,F401

__all__ += ["LInfDistConv2d", "LInfDistLinear", "MeanShift"]
