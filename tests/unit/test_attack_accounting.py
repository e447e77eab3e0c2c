"""AttackResult.robust_accuracy counts an example only if it is correct clean AND attacked."""
from __future__ import annotations

import torch
from torch import nn

from certorch.attacks.base import Attack


class _Helpful(Attack):
    """Moves every input to a point the model classifies as y, if the ball holds one (here: x + eps)."""

    def run(self, model, x, y, box, eps):
        return box.upper


def test_robust_accuracy_never_exceeds_natural_accuracy_even_for_a_helpful_attack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 2))
    with torch.no_grad():  # class 1 iff x > 0.5
        model[0].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model[0].bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[0.45], [0.9], [0.2]])
    y = torch.tensor([1, 1, 0])  # the first is wrong clean but right at x + 0.1
    res = _Helpful()(model, x, y, 0.1)
    natural = float((model(x).argmax(1) == y).float().mean())
    assert not res.success[0]  # the attack point itself is classified correctly ...
    assert res.robust_accuracy <= natural  # ... yet the example does not count as robust
    assert abs(res.robust_accuracy - 2 / 3) < 1e-6
