"""The checks on a checkpoint that the check stage measures and records (their gates and
verdicts are bench.records.sanity's): input gradients, determinism, logits, classes and
dynamic forward passes (AutoAttack's own checks), and the transfer check from the plain
ResNet of the same architecture."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from bench.attacks.perturbations import Setting, perturbation
from bench.eval.protocol import Cell, Subject
from bench.eval.testdata import EvalData
from bench.records.sanity import TRANSFER_MARGIN, ZERO_GRADIENTS

CHECK_BATCH = 256  # images the model checks use
T = TypeVar("T")


class _Captured(logging.Handler):
    """Collects the warnings AutoAttack's checks log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _autoattack_check(check: Callable[..., T], *args: object) -> tuple[bool, T]:
    """(warned, result) of one of AutoAttack's checks, its warning captured, not logged."""
    logger = logging.getLogger("inres-bench.eval.model_checks.autoattack")
    logger.propagate = False
    handler = _Captured()
    logger.addHandler(handler)
    try:
        result = check(*args, logger=logger)
    finally:
        logger.removeHandler(handler)
    return bool(handler.messages), result


def model_checks(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int) -> list[tuple]:
    """(check, value, limit, detail) for a batch `x`, `y` on the model's device: input
    gradients, determinism, logits, classes and dynamic forward passes."""
    from pyautoattack import checks

    x_in = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x_in), y, reduction="sum")
    grad = torch.autograd.grad(loss, x_in)[0].flatten(1)
    zero = float((grad.abs().sum(1) == 0).float().mean())
    nonfinite = float((~torch.isfinite(grad)).any(1).float().mean())
    randomized, _ = _autoattack_check(checks.check_randomized, model, x, y, len(x))
    probabilities, outputs = _autoattack_check(checks.check_range_output, model, x)
    dynamic, _ = _autoattack_check(checks.check_dynamic, model, x, False)
    n = len(x)
    return [
        ("zero-gradients", zero, ZERO_GRADIENTS, f"{round(zero * n)} of {n} images"),
        ("nonfinite-gradients", nonfinite, 0.0, f"{round(nonfinite * n)} of {n} images"),
        ("randomized", float(randomized), 0.0, "5 forward passes of one batch"),
        ("probabilities", float(probabilities), 0.0, "outputs in [0, 1] summing to 1"),
        ("classes", float(abs(outputs - classes)), 0.0, f"{outputs} outputs, {classes} classes"),
        ("dynamic", float(dynamic), 0.0, "backward calls inside the forward pass"),
    ]


def is_randomized(model: nn.Module, input_shape: tuple[int, int, int], classes: int) -> bool:
    """AutoAttack's own determinism check (5 forward passes of one batch differ) on 4
    seeded uniform images in eval mode: whether a defense needs AutoAttack's rand version.
    Cheap enough to run on every defense before any work."""
    x = torch.rand((4, *input_shape), generator=torch.Generator().manual_seed(0))
    y = torch.arange(4) % classes
    from pyautoattack import checks

    return _autoattack_check(checks.check_randomized, model.eval(), x, y, len(x))[0]


def transfer_check(
    target: nn.Module,
    source: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    setting: Setting,
    eps_255: float,
    seed: int,
) -> tuple:
    """('transfer', value, limit, detail): how many points PGD crafted on `source` beats
    white-box PGD on `target` by (its white-box accuracy minus its accuracy on the
    transferred examples), same images and random starts. Positive beyond the margin is
    the gradient-masking sign: the white-box attack did not find what a surrogate's did."""
    from bench.attacks.gradient import run_seeded

    pgd = perturbation("pgd")
    eps = [eps_255 / 255]
    crafted = run_seeded(lambda a, b: pgd.perturb(source, a, b, eps, setting), x, y, seed)[0]
    white = run_seeded(lambda a, b: pgd.perturb(target, a, b, eps, setting), x, y, seed)[0]
    with torch.no_grad():
        transfer = float((target(crafted).argmax(1) == y).float().mean()) * 100
        white_box = float((target(white).argmax(1) == y).float().mean()) * 100
    detail = (
        f"PGD at {eps_255:g}/255 on {len(x)} images: transferred {transfer:.1f}, white-box {white_box:.1f}"
    )
    return ("transfer", white_box - transfer, TRANSFER_MARGIN, detail)


def check_rows(subject: Subject, results: list[tuple], timestamp: str) -> list[dict]:
    """Records rows of checkpoint checks (records.CHECK_COLUMNS) for an eval Subject."""
    info = subject.defense.info
    return [
        {
            "run": subject.run,
            "dataset": info.dataset,
            "seed": subject.seed,
            "members": subject.members,
            "checkpoint_sha256": info.checkpoint_sha256,
            "check": check,
            "value": float(value),
            "limit": float(limit),
            "detail": detail,
            "timestamp": timestamp,
        }
        for check, value, limit, detail in results
    ]


def batch(data: EvalData, n: int = CHECK_BATCH, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` images of the evaluation's clean subset, as one batch."""
    x, y = next(iter(data.batches(Cell("clean"), n, device)))
    return x, y
