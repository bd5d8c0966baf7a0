"""AutoAttack as the reference attack, registered like any other perturbation.

The official implementation (Croce & Hein 2020) as PyPI packages it (`pyautoattack`): the
standard version (APGD-CE, APGD-T, FAB-T, Square) at radius eps in L-infinity or L2 (`norm`), seeded, run
batch by batch by the engine, its adversarial batches audited and classified like every
attack's. The rand version (APGD-CE and APGD-DLR, each gradient an expectation over 20
forward passes: EOT) is the one RobustBench runs on a randomized defense. `apgd-ce-lite` is the cheap stand-in of CPU runs (APGD-CE alone, 10 iterations):
its own name, never shown as AutoAttack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.attacks.gradient import L2
from bench.attacks.perturbations import Perturbation, Setting, register

# the library warns about randomised or probability-returning models on every batch; our
# sanity checks (bench.eval.model_checks) test that once per model instead
logging.getLogger("auto-attack").setLevel(logging.ERROR)


@dataclass(frozen=True)
class AutoAttack(Perturbation):
    """The standard version: APGD-CE, APGD-T, FAB-T and Square, each on the points the
    previous ones left robust; or the rand version (`version`), for randomized defenses."""

    randomized: bool = True  # seeded from the engine's per-batch seed
    version: str = "standard"  # or "rand"

    def params(self, setting: Setting, eps_255: float) -> dict:
        return {"version": self.version}

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], setting: Setting
    ) -> list[Tensor]:
        from pyautoattack import AutoAttack as Official

        seed = int(torch.randint(0, 2**31 - 1, ()))  # from the generator the engine seeded
        attack = Official(model, device=x.device, eps=eps[0], norm=self.norm, seed=seed, version=self.version)
        attack.verbose = False
        # the library views gradients as (N, -1): it needs the default (NCHW) memory layout
        return [attack.run_standard_evaluation(x.contiguous(), y, batch_size=len(x))[0]]

    def passes(self, n: int, n_radii: int, setting: Setting) -> tuple[float, float]:
        if self.version == "rand":  # APGD-CE and APGD-DLR, 100 steps of 20 draws each
            return n * n_radii * 41, n * n_radii * 4000
        # APGD-CE 100 + APGD-T 9 x 100 + FAB-T 9 x 100 gradient steps; Square's 5,000 queries
        # run only on the points still robust: counted as a third of the images
        return n * n_radii * (1 + 5000 / 3), n * n_radii * 1900

    def describe(self, params: dict) -> str:
        return f"{params.get('version', '?')} version"


@dataclass(frozen=True)
class APGDLite(Perturbation):
    """APGD on the cross-entropy loss alone (the first attack of AutoAttack), one restart of
    a few iterations: cheap enough for a CPU, far weaker than AutoAttack."""

    randomized: bool = True
    iterations: int = 10

    def params(self, setting: Setting, eps_255: float) -> dict:
        return {"iterations": self.iterations, "loss": "ce", "restarts": 1}

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], setting: Setting
    ) -> list[Tensor]:
        from pyautoattack.autopgd_base import APGDAttack

        seed = int(torch.randint(0, 2**31 - 1, ()))
        attack = APGDAttack(
            model,
            n_iter=self.iterations,
            norm=self.norm,
            n_restarts=1,
            eps=eps[0],
            seed=seed,
            loss="ce",
            device=x.device,
        )
        return [attack.perturb(x.contiguous(), y)]  # NCHW, as AutoAttack's code needs

    def passes(self, n: int, n_radii: int, setting: Setting) -> tuple[float, float]:
        return n * n_radii * 2, n * n_radii * self.iterations

    def describe(self, params: dict) -> str:
        return f"{params.get('iterations')} iterations"


register(AutoAttack("autoattack", "AutoAttack", leaderboard=True, reference_for="pgd"))
register(APGDLite("apgd-ce-lite", "APGD-CE (10 it.)", reference_for="pgd"))
# RobustBench's L2 threat model (radii in pixel units, its CIFAR leaderboard's 0.5)
register(AutoAttack("autoattack-l2", "AutoAttack L2", norm=L2, reference_for="pgd-l2"))
register(APGDLite("apgd-ce-lite-l2", "APGD-CE L2 (10 it.)", norm=L2, reference_for="pgd-l2"))
# RobustBench's AutoAttack for a defense AutoAttack's own check finds randomized (EOT)
register(AutoAttack("autoattack-rand", "AutoAttack (rand)", version="rand"))
register(AutoAttack("autoattack-rand-l2", "AutoAttack L2 (rand)", norm=L2, version="rand"))
