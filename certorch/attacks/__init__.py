"""certorch.attacks: L-inf adversarial attacks (foolbox-3 style).

Every attack is an :class:`Attack` whose final ``__call__(model, x, y, eps, lo=0., hi=1.)``
validates inputs, freezes the model parameters, calls the subclass's ``run``, clips the result
into ``linf_ball(x, eps, lo, hi)`` and returns an :class:`AttackResult`
(``x_adv``, ``success``, ``margin``, ``logits``, ``queries``, ``seconds``).

    from certorch.attacks import PGD, build_attack, pgd
    res = PGD(steps=20, restarts=2)(model, x, y, eps=0.1)
    res = pgd(model, x, y, 0.1, steps=20)            # functional shortcut
    atk = build_attack("cw", steps=50)               # registry: list_attacks() -> ['cw', 'fgsm', 'pgd']
"""
from certorch.attacks.base import Attack, AttackResult, frozen_parameters, project, worst_margin
from certorch.attacks.registry import attack_class, build_attack, list_attacks, register_attack
from certorch.attacks.pgd_attack import PGD, attack_loss, input_gradient, step_factor, uniform_in_box
from certorch.attacks.fgsm import FGSM
from certorch.attacks.cw import CW
from certorch.attacks.pgd_attack import pgd
from certorch.attacks.interval import IntervalAttack
from certorch.attacks.latent import LatentAttackResult, forward_from, latent_attack

__all__ = [
    "Attack",
    "AttackResult",
    "PGD",
    "FGSM",
    "CW",
    "IntervalAttack",
    "latent_attack",
    "LatentAttackResult",
    "forward_from",
    "pgd",
    "register_attack",
    "build_attack",
    "list_attacks",
    "attack_class",
    "attack_loss",
    "input_gradient",
    "step_factor",
    "uniform_in_box",
    "frozen_parameters",
    "project",
    "worst_margin",
]
