"""The branch-and-bound domain queue keeps exactly the domains put in and not taken out, takes
out the lowest bounds, merges children of another layout, and does not copy the queue per step."""
from __future__ import annotations

import math

import torch

from certorch.bounds.alpha import AlphaState
from certorch.domains.box import Box
from certorch.verify.domains import DomainQueue, Domains

KEY = ("out", "relu1", 1)
BETA = ("out", "pre1", "beta")


def _doms(lbs, seed: int, beta: bool = False) -> Domains:
    """Domains whose every tensor encodes its lb (so a domain's parts can be checked to stay together)."""
    g = torch.Generator().manual_seed(seed)
    lb = torch.tensor(lbs, dtype=torch.float64)
    D = lb.numel()
    tag = lb[:, None]
    sides = {"lower": {KEY: (torch.tensor([0, 2]), (tag[:, :, None] * torch.ones(D, 2, 5)).float())}}
    if beta:
        sides["lower"][BETA] = (torch.tensor([0, 2]), torch.rand(D, 2, 3, generator=g))
    return Domains(rows=tag.expand(D, 3).clone(), lb=lb, sound=tag.expand(D, 3) - 1, box=Box(tag - 2, tag + 2),
                   splits={"pre1": torch.randint(-1, 2, (D, 4), generator=g, dtype=torch.int8)},
                   bounds={"pre1": Box(tag.expand(D, 4) - 3, tag.expand(D, 4) + 3)},
                   alpha=AlphaState(("sig",), D, sides), coeffs={}, choice=lb.long())


def _consistent(d: Domains) -> None:
    t = d.lb[:, None]
    assert torch.equal(d.rows, t.expand_as(d.rows)) and torch.equal(d.sound, t.expand_as(d.sound) - 1)
    assert torch.equal(d.box.lower, t - 2) and torch.equal(d.bounds["pre1"].upper, t.expand(-1, 4) + 3)
    assert torch.equal(d.choice, d.lb.long())
    assert torch.equal(d.alpha.sides["lower"][KEY][1], (t[:, :, None] * torch.ones(d.size, 2, 5)).float())


def test_the_queue_holds_what_was_pushed_and_not_popped_and_pops_the_lowest():
    g = torch.Generator().manual_seed(0)
    q = DomainQueue(_doms([5.0, 3.0, 9.0], 0))
    ref = {5.0, 3.0, 9.0}
    nxt = 10.0
    for step in range(40):
        k = int(torch.randint(1, 6, (1,), generator=g))
        popped = q.pop_lowest(k)
        _consistent(popped)
        want = sorted(ref)[:k]
        assert sorted(popped.lb.tolist()) == want
        ref -= set(want)
        m = int(torch.randint(0, 9, (1,), generator=g))
        new = [nxt + j + float(torch.rand(1, generator=g)) * 0.5 - 9 for j in range(m)]
        nxt += m
        q.push(_doms(new, step + 1))
        ref |= set(new)
        assert q.size == len(ref)
        live = q.view()
        _consistent(live)
        assert sorted(live.lb.tolist()) == sorted(ref)
        if q.size:  # the buffers' bytes: every tensor holds `capacity` domains
            assert q.nbytes() * q.size == live.nbytes() * q.capacity


def test_pushing_within_capacity_writes_in_place():
    q = DomainQueue(_doms([1.0, 2.0], 0))
    assert q.capacity >= 64
    before = {k: b.data_ptr() for k, b in q.buf.items()}
    q.pop_lowest(1)
    q.push(_doms([float(v) for v in range(3, 40)], 1))
    assert {k: b.data_ptr() for k, b in q.buf.items()} == before
    q.push(_doms([float(v) for v in range(40, 100)], 2))  # past the capacity: buffers grow
    assert q.capacity >= q.size == 98
    _consistent(q.view())


def test_children_with_new_slopes_are_merged_with_unknown_slopes_for_the_rest():
    q = DomainQueue(_doms([1.0, 2.0, 3.0], 0))
    q.pop_lowest(1)
    q.push(_doms([4.0, 5.0], 1, beta=True))  # a split node's multipliers, seen for the first time
    live = q.view()
    assert sorted(live.lb.tolist()) == [2.0, 3.0, 4.0, 5.0]
    ids, beta = live.alpha.sides["lower"][BETA]
    known = ~torch.isnan(beta).flatten(1).any(1)
    assert sorted(live.lb[known].tolist()) == [4.0, 5.0] and torch.isnan(beta[~known]).all()
    _consistent(live)
    q.push(_doms([6.0], 2, beta=True))  # the new layout now fits in place
    assert q.size == 5 and not math.isnan(float(q.view().alpha.sides["lower"][BETA][1][q.view().lb == 6.0].sum()))
