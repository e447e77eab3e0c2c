"""A solver's "infeasible" proves a branch-and-bound domain empty only with a checked Farkas
certificate (``certorch.verify.solve.farkas_certified``)."""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from certorch.verify.solve import farkas_certified

INF = math.inf


class _Ray:
    """Stands in for a Highs object: hands out a chosen dual ray."""

    def __init__(self, ray, exists=True):
        self.ray, self.exists = ray, exists

    def getDualRay(self):
        return None, self.exists, np.asarray(self.ray, dtype=np.float64)


# x1, x2 in [0, 1]; rows: x1 + x2 >= 3 (impossible), x1 - x2 <= 5 (harmless)
A = sp.csr_matrix(np.array([[1.0, 1.0], [1.0, -1.0]]))
RLO, RHI = np.array([3.0, -INF]), np.array([INF, 5.0])
CLO, CHI = np.zeros(2), np.ones(2)


def test_a_valid_ray_certifies_an_empty_polytope():
    assert farkas_certified(_Ray([1.0, 0.0]), A, RLO, RHI, CLO, CHI)
    assert farkas_certified(_Ray([-2.0, 0.0]), A, RLO, RHI, CLO, CHI)  # either sign


def test_a_wrong_ray_certifies_nothing():
    assert not farkas_certified(_Ray([0.0, 1.0]), A, RLO, RHI, CLO, CHI)
    assert not farkas_certified(_Ray([1.0, 0.0], exists=False), A, RLO, RHI, CLO, CHI)
    assert not farkas_certified(_Ray([1.0]), A, RLO, RHI, CLO, CHI)  # wrong length
    assert not farkas_certified(_Ray([np.nan, 0.0]), A, RLO, RHI, CLO, CHI)


def test_no_ray_certifies_a_feasible_polytope():
    rlo = np.array([1.5, -INF])  # x1 + x2 >= 1.5 is feasible
    for ray in ([1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [3.0, 2.0]):
        assert not farkas_certified(_Ray(ray), A, rlo, RHI, CLO, CHI)
