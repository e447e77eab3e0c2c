"""Shared helpers for soundness tests: sample points in a box and check them against bounds."""
from __future__ import annotations

import torch

import certorch as ct

METHODS = ["ibp", "zonotope", "symbolic", "crown", "crown-ibp", "dual"]


def sample_box(box: ct.Box, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, B, *shape) points of the box: half uniform, half corners (each coordinate at lower or upper)."""
    lo, up = box.lower, box.upper
    n_corner = n // 2
    u = torch.rand((n - n_corner, *lo.shape), generator=generator, dtype=lo.dtype)
    corners = torch.rand((n_corner, *lo.shape), generator=generator, dtype=lo.dtype) < 0.5
    pts_u = lo + (up - lo) * u
    pts_c = torch.where(corners, up.expand_as(corners), lo.expand_as(corners))
    return torch.cat([pts_u, pts_c], 0)


def spec_values(model, pts: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """(n, B, S) values of C @ model(p) for every sampled point p."""
    n, B = pts.shape[:2]
    with torch.no_grad():
        out = model(pts.reshape(n * B, *pts.shape[2:])).reshape(n, B, -1)
    return torch.einsum("bsk,nbk->nbs", C.to(out.dtype), out)


def assert_within(values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, rtol: float = 0.0, atol: float = 1e-9):
    """Every sampled value lies inside [lower, upper] (up to float tolerance)."""
    tol = atol + rtol * torch.maximum(lower.abs(), upper.abs())
    below = (values < lower - tol).sum().item()
    above = (values > upper + tol).sum().item()
    worst = max((lower - values).max().item(), (values - upper).max().item())
    assert below == 0 and above == 0, f"{below} values below the lower bound, {above} above the upper (worst {worst:.3g})"


def pgd_points(model, x: torch.Tensor, eps: float, C: torch.Tensor, steps: int = 30,
               lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """(2S, B, *shape) PGD end points inside the box: for each spec row, one run pushing it down
    and one pushing it up (the points that attack a bound most directly)."""
    box = ct.linf_ball(x, eps, lo, hi)
    S = C.shape[1]
    step = 2.5 * eps / steps if eps > 0 else 0.0
    points = []
    for s in range(S):  # test code: a loop over the few spec rows is fine
        for sign in (1.0, -1.0):
            z = box.center.clone()
            for _ in range(steps):
                z = z.detach().requires_grad_(True)
                obj = sign * torch.einsum("bk,bk->", model(z), C[:, s].to(z.dtype))
                (g,) = torch.autograd.grad(obj, z)
                z = torch.minimum(torch.maximum(z - step * g.sign(), box.lower), box.upper)
            points.append(z.detach())
    return torch.stack(points)
