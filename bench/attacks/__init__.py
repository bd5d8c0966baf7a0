"""Perturbations: the registry of what a cell measures (clean, noise, gradient attacks,
AutoAttack), the torchattacks wrapper and its audit."""

from bench.attacks.gradient import AttackAuditError, audit, fgsm, pgd_around_start
from bench.attacks.perturbations import Perturbation, perturbation, register

__all__ = ["AttackAuditError", "Perturbation", "audit", "fgsm", "perturbation",
           "pgd_around_start", "register"]
