"""Stability diagnostics: the paper's mechanism (Sec. 3.4) measured on trained checkpoints.

The paper argues that damping the skip, x_{n+1} = (1 - c_n) x_n + s_n f_n(x_n), shifts the
eigenvalues of each block's Jacobian by -λ_n, so that a perturbation of the input grows less
through depth. Per checkpoint, on a fixed class-balanced subset of test images, this module
measures (every figure per image):

- `growth`: ‖h_n(x + δ) - h_n(x)‖₂ / ‖h_n(x)‖₂ at the stem (the first block's input, level
  0), after every block n (levels 1..N) and at the logits (level N + 1), for each δ of
  DELTAS at one L∞ radius. The *amplification* of an image is its growth after the last
  block over its growth at the stem.
- `spectral_norm`: the largest singular value of ∂g_n/∂x, the Jacobian of block n's map
  g_n at h_{n-1}(x), by power iteration on JᵀJ from a seeded start with Rayleigh-Ritz over
  its iterates (Lanczos; torch.func.vjp, and J v as the vjp of the vjp:
  `jacobian_products`). It approaches σ_max from below; an image stops after at least
  half of `iterations` once its estimate moved by at most `tolerance` twice running.
- `shifted_eigenvalue`: the largest real part of the eigenvalues of ∂g_n/∂x - I, the
  continuous-time reading of Eq. 17 (for In-ResNet, J_f - λ_n I: the branch Jacobian
  shifted by -λ_n), by up to `krylov` steps of Arnoldi (Gram-Schmidt done twice, the same
  stopping rule) from a seeded start: the rightmost Ritz value. Only for blocks whose
  input and output shapes agree.
- `input_gradient`: ‖∇ₓ L(x, y)‖₁ of the cross-entropy of one image, in [0, 1] pixel
  units: what FGSM's sign discards.

The models run in eval mode: batch norm uses its running statistics, so a block map is a
function of one image alone and a batch holds independent problems. Ensembles get the
input gradient only: the mechanism is a property of one network's blocks (their members
are measured as seeds); so do defenses without the zoo's residual blocks. Units: `eps_255` in 1/255; inputs N x 3 x H x W in [0, 1].
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bench.attacks.gradient import fgsm, run_seeded
from bench.attacks.perturbations import params_text, perturbation
from bench.core.environment import device_name
from bench.data.splits import batches
from bench.eval.engine import cell_context, prepared
from bench.eval.krylov import rightmost_eigenvalue, row_norms, spectral_norm
from bench.eval.protocol import Cell, EvalConfig, Subject
from bench.eval.testdata import EvalData
from bench.records.schema import DELTAS, EIGEN, GRADIENT, GROWTH, SPECTRAL, STABILITY_FLOORS, utc_now
from bench.records.store import RecordStore
from models import UserError
from models.skip import SkipRule

QUANTITIES = tuple(STABILITY_FLOORS)  # GROWTH, SPECTRAL, EIGEN, GRADIENT (bench.records.schema)
WHOLE_NETWORK = -1  # the `block` of a figure of the whole network (the input gradient)
DEFAULT_BATCH = 32  # images per pass: the Krylov bases keep up to 40 float64 activations per image


@dataclass(frozen=True)
class StabilityConfig:
    """What the stability stage measures and how; `n` images of a class-balanced subset."""

    n: int = 200  # test images (capped at the test subset of the cells)
    eps_255: float = 2.0  # δ's L∞ radius (Gaussian: its std), in 1/255
    iterations: int = 40  # power-iteration (Lanczos) cap
    tolerance: float = 3e-4  # an image stops once its estimate moved by at most this (relative) twice running
    krylov: int = 30  # Arnoldi steps
    seed: int = 0  # δ's random draws and the start vectors come from (seed, model seed, batch)
    batch_size: int | None = None  # None: DEFAULT_BATCH

    def __post_init__(self) -> None:
        if self.n < 1 or self.iterations < 1 or self.krylov < 1:
            raise UserError(
                f"the stability stage needs positive counts, got n {self.n}, iterations "
                f"{self.iterations}, krylov {self.krylov}"
            )
        if not (math.isfinite(self.eps_255) and 0 < self.eps_255 <= 255) or not 0 < self.tolerance < 1:
            raise UserError(
                f"the stability radius must be in (0, 255] (1/255) and the tolerance in (0, 1), "
                f"got {self.eps_255:g}, {self.tolerance:g}"
            )

    @property
    def batch(self) -> int:
        return self.batch_size or DEFAULT_BATCH


@dataclass(frozen=True)
class Unit:
    """One recorded piece of the stage: a quantity (and, for growth, the δ it follows)."""

    quantity: str
    perturbation: str = ""

    @property
    def name(self) -> str:
        return f"{self.quantity}@{self.perturbation}" if self.perturbation else self.quantity


def stage_units(members: int, blockwise: bool = True) -> list[Unit]:
    """The stage's units for a single network of residual blocks (`blockwise`: any zoo
    model), or an ensemble's or another network's: the input gradient alone."""
    if members > 1 or not blockwise:
        return [Unit(GRADIENT)]
    return [*(Unit(GROWTH, d) for d in DELTAS), Unit(SPECTRAL), Unit(EIGEN), Unit(GRADIENT)]


def unit_params(unit: Unit, config: StabilityConfig, setting: EvalConfig) -> dict:
    """The parameters that identify a unit's measurement (recorded as canonical JSON);
    `setting`: the cells' EvalConfig (PGD's step size and steps)."""
    if unit.quantity == GROWTH:
        own = (
            perturbation(unit.perturbation).params(setting, config.eps_255)
            if unit.perturbation == "pgd"
            else {}
        )
        return {**own, "seed": config.seed}
    if unit.quantity == SPECTRAL:
        return {"iterations": config.iterations, "seed": config.seed, "tolerance": config.tolerance}
    if unit.quantity == EIGEN:
        return {"krylov": config.krylov, "seed": config.seed, "tolerance": config.tolerance}
    return {"loss": "cross-entropy", "norm": "l1"}


def unit_passes(unit: Unit, n: int, config: StabilityConfig, setting: EvalConfig) -> tuple[float, float]:
    """(forward, forward+backward) image passes of a unit on `n` images, for estimates. The
    Krylov units in gradient passes of the whole network per iteration cap, as measured by
    benchmarks/bench_stability.py (a J v, a vjp of a vjp, costs about four of its block's
    backward passes; Gram-Schmidt and early stops included)."""
    if unit.quantity == GROWTH:
        steps = {"fgsm": 1, "pgd": setting.steps}.get(unit.perturbation, 0)
        return 2.0 * n, float(n * steps)
    if unit.quantity == SPECTRAL:
        return 0.0, 8.0 * n * config.iterations
    if unit.quantity == EIGEN:
        return 0.0, 4.0 * n * config.krylov
    return 0.0, float(n)


def unit_eps(unit: Unit, config: StabilityConfig) -> float:
    return config.eps_255 if unit.quantity == GROWTH else 0.0


# --- the network's blocks -------------------------------------------------------------------


def blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of a zoo network in depth order: the modules whose `skip` is a
    SkipRule (both families register them in the order `forward` runs them)."""
    return [m for m in model.modules() if isinstance(getattr(m, "skip", None), SkipRule)]


@contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """Every damped sum of `model` as plain autograd ops (models.skip.SkipRule.fused), for
    torch.func's transforms; restored afterwards."""
    skips = [m for m in model.modules() if isinstance(m, SkipRule)]
    before = [s.fused for s in skips]
    for s in skips:
        s.fused = False
    try:
        yield model
    finally:
        for s, was in zip(skips, before, strict=True):
            s.fused = was


def block_inputs(model: nn.Module, chain: Sequence[nn.Module], x: Tensor) -> list[Tensor]:
    """h_{n-1}(x), the input of every block of `chain`, from one forward pass."""
    seen: list[Tensor] = []
    hooks = [
        b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone())) for b in chain
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# --- the four measurements --------------------------------------------------------------------


def growth(model: nn.Module, chain: Sequence[nn.Module], x: Tensor, x_perturbed: Tensor) -> Tensor:
    """‖h(x') - h(x)‖₂ / ‖h(x)‖₂ per image (rows) at the stem, after each block of `chain`
    and at the logits (columns): N x (len(chain) + 2), float64. One forward pass of the
    clean and the perturbed images together."""
    n = len(x)
    levels: list[Tensor] = []

    def distance(h: Tensor) -> Tensor:
        return row_norms(h[n:] - h[:n]) / row_norms(h[:n])

    hooks = [chain[0].register_forward_pre_hook(lambda m, args: levels.append(distance(args[0])))]
    hooks += [b.register_forward_hook(lambda m, args, out: levels.append(distance(out))) for b in chain]
    try:
        with torch.no_grad():
            logits = model(torch.cat([x, x_perturbed]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([*levels, distance(logits)], dim=1)


def input_gradient_l1(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """‖∇ₓ CE(model(x), y)‖₁ per image, each image's own loss (pixel units)."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad.abs().flatten(1).double().sum(1)


# --- a unit on a set of images ----------------------------------------------------------------


@dataclass(frozen=True)
class UnitFigures:
    """One unit's figures: per row (a level or block), its index, whether the block is
    damped (the rule's positions; 0 for the stem, the logits and the whole network) and
    the per-image values."""

    unit: Unit
    blocks: tuple[int, ...]
    damped: tuple[bool, ...]
    values: np.ndarray  # rows x images, float64
    seconds: float
    iterations: int = 0  # power iterations of the slowest batch (spectral norms)


def measure(
    model: nn.Module,
    unit: Unit,
    x: Tensor,
    y: Tensor,
    config: StabilityConfig,
    setting: EvalConfig,
    model_seed: int,
) -> UnitFigures:
    """`unit` on the images `x` (labels `y`), in batches; `model` prepared (eval, frozen,
    on the device). Random draws depend on (config.seed, model_seed, unit, batch) only."""
    began = time.perf_counter()
    chain = blocks(model)
    if unit.quantity != GRADIENT and not chain:
        raise UserError(
            f"{unit.name} needs a network of residual blocks (a zoo model), not {type(model).__name__}"
        )
    parts, iterations = [], 0
    for index, start in enumerate(range(0, len(x), config.batch)):
        xb, yb = x[start : start + config.batch], y[start : start + config.batch]
        seed = _seed(config.seed, model_seed, QUANTITIES.index(unit.quantity), _delta_code(unit), index)
        values, used = _batch(model, chain, unit, xb, yb, config, setting, seed)
        parts.append(values)
        iterations = max(iterations, used)
    figures = torch.cat(parts, dim=1).numpy()
    rows, damped = _rows(unit, chain)
    return UnitFigures(unit, rows, damped, figures, time.perf_counter() - began, iterations)


def _rows(unit: Unit, chain: Sequence[nn.Module]) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    flags = [s.damped for b in chain if isinstance(s := b.get_submodule("skip"), SkipRule)]  # all of them
    if unit.quantity == GROWTH:
        return tuple(range(len(chain) + 2)), (False, *flags, False)
    if unit.quantity == SPECTRAL:
        return tuple(range(1, len(chain) + 1)), tuple(flags)
    if unit.quantity == EIGEN:
        square = [i + 1 for i, b in enumerate(chain) if _square(b)]
        return tuple(square), tuple(flags[i - 1] for i in square)
    return (WHOLE_NETWORK,), (False,)


def _square(block: nn.Module) -> bool:
    """Whether the block maps its input to a tensor of the same shape (no projection)."""
    return getattr(block, "shortcut", None) is None


def _batch(
    model: nn.Module,
    chain: Sequence[nn.Module],
    unit: Unit,
    x: Tensor,
    y: Tensor,
    config: StabilityConfig,
    setting: EvalConfig,
    seed: int,
) -> tuple[Tensor, int]:
    """The unit's values on one batch: rows x images (float64, CPU), and iterations used."""
    if unit.quantity == GRADIENT:
        return input_gradient_l1(model, x, y).cpu()[None], 0
    if unit.quantity == GROWTH:
        eps = config.eps_255 / 255
        perturbed = run_seeded(
            lambda a, b: _perturbed(model, unit.perturbation, a, b, eps, setting), x, y, seed
        )
        return growth(model, chain, x, perturbed).cpu().T, 0
    generator = torch.Generator().manual_seed(seed)
    rows, used = [], 0
    with unfused(model):
        inputs = block_inputs(model, chain, x)
        for block, h in zip(chain, inputs, strict=True):
            if unit.quantity == EIGEN and not _square(block):
                continue
            start = torch.randn(h.shape, generator=generator, dtype=h.dtype).to(h.device)
            if unit.quantity == SPECTRAL:
                sigma, done = spectral_norm(block, h, start, config.iterations, config.tolerance)
                rows.append(sigma.cpu())
                used = max(used, done)
            else:
                rows.append(rightmost_eigenvalue(block, h, start, config.krylov, config.tolerance)[0].cpu())
    return torch.stack(rows), used


def _perturbed(model: nn.Module, kind: str, x: Tensor, y: Tensor, eps: float, setting: EvalConfig) -> Tensor:
    """x + δ for one of DELTAS (global RNGs seeded by the caller)."""
    if kind == "fgsm":
        return fgsm(model, x, y, [eps])[0]
    if kind == "gaussian":  # CIFAR-C's gaussian_noise formula with std eps
        return torch.clamp(x + eps * torch.randn_like(x), 0, 1)
    return perturbation(kind).perturb(model, x, y, [eps], setting)[0]


def _delta_code(unit: Unit) -> int:
    return DELTAS.index(unit.perturbation) + 1 if unit.perturbation in DELTAS else 0


def _seed(*words: int) -> int:
    state = np.random.SeedSequence([w % 2**32 for w in words]).generate_state(1, np.uint64)[0]
    return int(state >> 1)


# --- the stage: a checkpoint's units, recorded one at a time ---------------------------------------


@dataclass(frozen=True)
class StabilityDone:
    """One finished unit: its records rows (records.STABILITY_COLUMNS), per-image values
    (float32, test-subset order) and a line for the log."""

    rows: list[dict]
    values: list[np.ndarray]
    summary: str


def n_images(data: EvalData, config: StabilityConfig) -> int:
    """The stage's images: its own class-balanced subset, never more than the cells' test
    subset (`data`: bench.eval.testdata.EvalData)."""
    return min(config.n, data.n(Cell("clean")))


def units_todo(
    context: dict,
    units: Sequence[Unit],
    data: EvalData,
    config: StabilityConfig,
    setting: EvalConfig,
    store: RecordStore,
) -> list[Unit]:
    """The units of the checkpoint `context` names (cell_context's keys) that `store` lacks."""
    done = store.stability_done(context)
    source, n, digest = data.source(Cell("clean")), n_images(data, config), data.digest(Cell("clean"))
    # as for cells: a unit counts on the same test images
    return [
        u
        for u in units
        if (source, u.quantity, u.perturbation, unit_eps(u, config), n, params_of(u, config, setting), digest)
        not in done
    ]


def stability_stage(
    subject: Subject, setting: EvalConfig, data: EvalData, config: StabilityConfig, units: Sequence[Unit]
) -> Iterator[StabilityDone]:
    """Measure `units` of `subject` on the stage's images, yielding each unit as it ends."""
    model = prepared(subject.defense.model, setting)
    indices = data.indices(n_images(data, config))
    memory = torch.channels_last if setting.channels_last else torch.contiguous_format
    x, y = next(batches(data.test.images, data.test.labels, len(indices), setting.device, indices))
    x = x.contiguous(memory_format=memory)
    context = {
        **cell_context(subject, setting),
        "data_source": data.source(Cell("clean")),
        "data_sha256": data.digest(Cell("clean")),
    }
    for unit in units:
        found = measure(model, unit, x, y, config, setting, subject.seed)
        values = found.values.astype(np.float32)
        rows = [
            {
                **context,
                "quantity": unit.quantity,
                "perturbation": unit.perturbation,
                "eps_255": unit_eps(unit, config),
                "block": block,
                "damped": int(damped),
                "n": len(indices),
                "params": params_of(unit, config, setting),
                "mean": _finite(np.mean(v)),
                "median": _finite(np.median(v)),
                "torch_version": torch.__version__,
                "device": device_name(setting.device),
                "seconds": round(found.seconds, 3),
                "timestamp": utc_now(),
            }
            for block, damped, v in zip(found.blocks, found.damped, values, strict=True)
        ]
        who = f"ensemble of {subject.members}" if subject.members > 1 else f"seed {subject.seed}"
        line = f"{subject.run} {data.dataset} {who}: stability {unit.name} on {len(indices)} images ({found.seconds:.1f} s"
        line += f", {found.iterations} power iterations)" if unit.quantity == SPECTRAL else ")"
        yield StabilityDone(rows, list(values), line)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def params_of(unit: Unit, config: StabilityConfig, setting: EvalConfig) -> str:
    return params_text(unit_params(unit, config, setting))
