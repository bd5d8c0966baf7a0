"""The perturbation registry, where users import it to add an attack (`register`).

It lives in bench.attacks.perturbations; this module keeps the documented import path.
"""

from bench.attacks.perturbations import (
    ATTACK,
    CLEAN,
    DERIVED,
    NOISE,
    PERTURBATIONS,
    Iterative,
    Perturbation,
    perturbation,
    register,
)

__all__ = ["ATTACK", "CLEAN", "DERIVED", "NOISE", "PERTURBATIONS", "Iterative", "Perturbation", "perturbation",
           "register"]
