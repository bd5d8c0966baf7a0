"""The suites: which models are trained on what and evaluated how. Data, in one place.

A suite is a list of studies (each one of the paper's tables or a part of one) plus the
training length, seeds and test subset they share. Radii are in 1/255.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.data.noise import CORRUPTIONS, NOISE_GROUPS
from bench.data.splits import BALANCED, FIRST
from bench.reports.robustbench import ROBUSTBENCH_AUTOATTACKS
from bench.reports.tables import LAMBDA_SWEEP, VARIANT_GRID
from models import UserError

ENSEMBLE_MODELS = "resnet110,in-resnet110,lambda-in-resnet110,resnet164,in-resnet164,lambda-in-resnet164"


@dataclass(frozen=True)
class Study:
    """`models` (names, globs or groups) trained on each of `datasets` with each
    initialisation in `lambda_inits`, evaluated with FGSM / IFGSM / PGD at `radii_255`; with
    `ensemble_radii_255`, the seeds' ensemble is evaluated too (at those radii).

    `lambda_inits` are intervals of the starting coefficients act(d) (None: the model's
    default); each model gets the d that starts there (ModelEntry.init_for: the interval
    itself for the ReLU rules, its logit for the sigmoid ones)."""

    table: str  # which of the paper's tables it feeds
    models: str
    datasets: tuple[str, ...]
    radii_255: tuple[float, ...] = (1.0, 2.0, 4.0)
    lambda_inits: tuple[tuple[float, float] | None, ...] = (None,)
    ensemble_radii_255: tuple[float, ...] = ()


# Registered perturbations every suite adds to the paper's protocol, each at its radii
# (None: the study's attack radii): random noise in the eps-ball (a sanity check) ...
SANITY = (("uniform", None),)
# ... PGD-50 at large radii, which must bring any model to chance, and AutoAttack.
REFERENCE = (("pgd50", (16.0, 64.0)), ("autoattack", (2.0,)))
# The AutoAttack perturbations whose subset --n-autoattack sets (RobustBench's two norms).
AUTOATTACKS = ("autoattack", "autoattack-l2", "autoattack-rand", "autoattack-rand-l2")
# RobustBench's threat models on CIFAR (bench.reports.robustbench owns the radii): AutoAttack
# standard at L-infinity 8/255 and L2 0.5, each beside the PGD its reference-gap gate compares
# it with; the large-radius gate at radii any model falls to chance at, robust ones included
# (64/255; L2 16 pixel units).
_AUTOATTACK = {name: eps_255 for name, _, eps_255 in ROBUSTBENCH_AUTOATTACKS}
ROBUSTBENCH = (
    ("pgd50", (64.0,)),
    ("pgd50-l2", (16.0 * 255,)),
    ("pgd-l2", (_AUTOATTACK["autoattack-l2"],)),
    ("uniform-l2", (_AUTOATTACK["autoattack-l2"],)),  # the noise-vs-pgd gate in L2
    *((name, (eps_255,)) for name, eps_255 in _AUTOATTACK.items()),
)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    studies: tuple[Study, ...]
    seeds: tuple[int, ...]
    length: str  # training length: "full" (the paper's epochs), "quick" (1/5), "smoke" (2 epochs)
    n_train: int | None = None  # first N training images; None: all
    n_test: int | None = None  # test subset (drawn by `subset_rule`); None: the whole test set
    subset_rule: str = BALANCED  # FIRST: RobustBench's first n_examples (bench.data.splits)
    noise_groups: tuple[str, ...] = NOISE_GROUPS  # the CIFAR-C files measured at every severity
    released_noise: bool = False  # its noise groups only from the released files (RobustBench's)
    needs_gpu: bool = True
    # registered perturbations beyond FGSM / IFGSM / PGD: (name, radii or None for the study's)
    extra: tuple[tuple[str, tuple[float, ...] | None], ...] = SANITY + REFERENCE
    # measured only on a defense AutoAttack's check finds randomized: (name, radii)
    randomized_extra: tuple[tuple[str, tuple[float, ...]], ...] = ()
    subsets: tuple[tuple[str, int], ...] = (("autoattack", 1000),)  # smaller test subsets
    checks: tuple[str, ...] = ("gradients", "model", "transfer")  # bench.eval.model_checks'
    n_stability: int = 200  # the stability stage's class-balanced test images (bench.eval.stability)
    # what one task (a training run, or a checkpoint's evaluation) asks of a worker, besides
    # one GPU where there are GPUs: CPU threads and host memory in GiB (Ray schedules by them)
    task_cpus: int = 4
    task_memory_gib: float = 8.0
    rehearsal: bool = False  # a `--rehearse` plan (bench.run.rehearsal): one seed per job but an ensemble's
    relaxed_gates: tuple[str, ...] = ()  # sanity gates flagged but never critical (a rehearsal's)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "paper",
            "every table of the paper: 5 seeds, the paper's epochs, full test sets",
            (
                Study("1-3", "main", ("cifar10", "cifar100")),
                # the paper's selection of the variants' initialisation: every interval of the grid
                Study("4", "variants", ("cifar10",), (2.0,), VARIANT_GRID),
                Study("5", "in-resnet110,lambda-in-resnet110", ("cifar10",), (2.0,), LAMBDA_SWEEP),
                Study("6", ENSEMBLE_MODELS, ("cifar10",), (2.0,), ensemble_radii_255=(2.0,)),
            ),
            seeds=(0, 1, 2, 3, 4),
            length="full",
        ),
        Suite(
            "quick",
            "the main models on CIFAR-10: 2 seeds, 1/5 of the epochs, full test set (about 38 GPU-hours: an estimate)",
            (
                Study("1-3", "main", ("cifar10",)),
                Study("6", ENSEMBLE_MODELS, ("cifar10",), (2.0,), ensemble_radii_255=(2.0,)),
            ),
            seeds=(0, 1),
            length="quick",
        ),
        Suite(
            "robustbench",
            "RobustBench's CIFAR threat models: clean, AutoAttack standard at L-infinity 8/255 and "
            "L2 0.5, the 15 corruptions at 5 severities (released CIFAR-C files), on the first n "
            "test images; with the gates' attacks",
            (Study("robustbench", "main", ("cifar10", "cifar100"), (_AUTOATTACK["autoattack"],)),),
            seeds=(0, 1, 2, 3, 4),
            length="full",
            subset_rule=FIRST,
            noise_groups=CORRUPTIONS,
            released_noise=True,
            extra=SANITY + ROBUSTBENCH,
            # a randomized defense: AutoAttack's rand version too, as RobustBench measures one
            randomized_extra=tuple((rand, (eps_255,)) for _, rand, eps_255 in ROBUSTBENCH_AUTOATTACKS),
            subsets=(),  # AutoAttack on every test image of the run, as RobustBench's benchmark()
        ),
        Suite(
            "smoke",
            "the whole pipeline on synthetic data in minutes on a CPU: tiny ResNet / In-ResNet / "
            "λ-In-ResNet, 2 seeds, 2 epochs, a test subset, every perturbation at full step count",
            (
                Study(
                    "1-3, 6",
                    "resnet14,in-resnet14,lambda-in-resnet14",
                    ("synthetic",),
                    ensemble_radii_255=(2.0,),
                ),
            ),
            seeds=(0, 1),
            length="smoke",
            n_train=2048,
            n_test=100,
            needs_gpu=False,
            extra=SANITY + (("apgd-ce-lite", (2.0,)),),  # cheap: never shown as AutoAttack
            subsets=(),
            checks=("gradients", "model"),
            n_stability=10,  # one image per class: the stage exercised, its cost a tenth of the cells'
            task_cpus=1,
            task_memory_gib=2.0,
        ),
    )
}


def find_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return SUITES[name]
