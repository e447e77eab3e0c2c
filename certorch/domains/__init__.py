"""Abstract-domain value objects: boxes, zonotopes, linear bounds."""
from certorch.domains.box import Box

__all__ = ["Box"]
