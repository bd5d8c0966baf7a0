"""The evaluation engine: every cell of the protocol for one defense, audited and resumable.

A cell is one perturbation at one radius or severity on the (class-balanced subset of
the) test set: clean; each noise group at severities 1-5; FGSM, IFGSM and PGD at each
radius. Accuracy is the paper's: the fraction of perturbed inputs classified correctly.
Finished cells are read from the record store and never computed again; each cell is
written as soon as it finishes (FGSM's radii together: they share one gradient).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from bench.attacks.gradient import AttackAuditError, audit, run_seeded
from bench.attacks.perturbations import ATTACK, NOISE, params_text, perturbation
from bench.core.environment import device_name
from bench.core.presets import PER_FILE, preset
from bench.eval.adapters import check_logits
from bench.eval.protocol import Cell, EvalConfig, Subject, cell_groups, group_cost, group_name, protocol_cells
from bench.eval.testdata import EvalData
from bench.records.schema import CELL_COLUMNS, ENSEMBLE_SEED, utc_now
from bench.records.store import RecordStore
from models import UserError
from models.layers import Normalize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellsDone:
    """Finished cells of one group (one pass over the data): their records rows and per-example correctness."""

    rows: list[dict]
    correct: list[np.ndarray]


@dataclass(frozen=True)
class AuditFailed:
    """A group whose attack failed the audit: never recorded; `error` names the cell."""

    error: str


def cells_todo(
    context: dict, config: EvalConfig, data: EvalData, store: RecordStore, cells: Sequence[Cell] | None = None
) -> list[Cell]:
    """The cells (default: the protocol's) of the checkpoint `context` names that `store`
    lacks. The run, its dry-run estimate and any executor's driver all ask this; `data`
    gives each cell's source, test-subset size and digest (bench.eval.testdata)."""
    done = store.done(context)
    cells = protocol_cells(config) if cells is None else list(cells)
    todo = []
    for cell in cells:
        if cell_key(cell, data.source(cell), config, data.n(cell), data.digest(cell)) not in done:
            todo.append(cell)
    return todo


def evaluate(
    subject: Subject,
    config: EvalConfig,
    store: RecordStore,
    data: EvalData,
    progress: bool = True,
    cells: Sequence[Cell] | None = None,
) -> tuple[int, int, list[str]]:
    """Compute and record the cells (default: the whole protocol) of `subject` not yet in
    `store`; returns (cells recorded, cells cached, errors). A cell that fails the audit is
    reported, never recorded."""
    asked = protocol_cells(config) if cells is None else list(cells)
    todo = cells_todo(cell_context(subject, config), config, data, store, asked)
    errors, recorded = [], 0
    for outcome in measure_cells(subject, config, data, todo, progress):
        if isinstance(outcome, AuditFailed):
            errors.append(outcome.error)
        else:
            recorded += store.add_cells(outcome.rows, outcome.correct)  # 0 where another process was first
    return recorded, len(asked) - len(todo), errors


def measure_cells(
    subject: Subject, config: EvalConfig, data: EvalData, todo: Sequence[Cell], progress: bool = True
) -> Iterator[CellsDone | AuditFailed]:
    """Compute `todo`, one group of cells at a time (its result yielded as soon as it is
    done, so that a caller can record it before the next starts)."""
    context = cell_context(subject, config)
    model = prepared(subject.defense.model, config)
    if todo:
        probe(model, subject, config, data)
    work = cell_groups(todo)
    cost = sum(group_cost(u, data.n(u[0]), config) for u in work)
    label = f"{subject.run} {data.dataset} {'ens' if subject.members > 1 else f'seed{subject.seed}'}"
    # disable=None: bars on a terminal only, not in logs and pipes
    bar = tqdm(
        total=cost,
        disable=None if progress and todo else True,
        unit="fwd",
        unit_scale=True,
        dynamic_ncols=True,
    )
    finished = 0
    with bar:
        for group in work:
            bar.set_description(f"eval {label} {group_name(group)}")
            began = time.perf_counter()
            try:
                correct = _run_group(model, group, subject, config, data, bar)
            except AttackAuditError as err:  # `err` names the cell
                log.error("error: %s (not recorded)", err)
                yield AuditFailed(str(err))
                continue
            except UserError:
                raise
            except Exception as err:
                # our networks' failure is ours to debug: the traceback
                if subject.defense.info.ours:
                    raise
                reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise UserError(
                    f"defense {subject.run} on {data.dataset} failed in the cell {group_name(group)} "
                    f"({type(err).__name__}: {reason}); the {finished} cells finished before it are "
                    "kept in the records: fix its forward and run again to compute the rest"
                ) from None
            finished += len(group)
            seconds = (time.perf_counter() - began) / len(group)
            rows = [
                _row(context, cell, data, bits, seconds, config)
                for cell, bits in zip(group, correct, strict=True)
            ]
            yield CellsDone(rows, correct)


def probe(model: nn.Module, subject: Subject, config: EvalConfig, data: EvalData) -> None:
    """The first batch of test images at the evaluation's batch size, and the size of its
    last batch, through the model before any cell: a defense that fails on the batches it
    will see, or returns integer or misshapen logits, is one line before anything is
    recorded (the build check saw 2 constant images only)."""
    n = data.n(Cell("clean"))
    size = min(_batch_size(config), n)
    x, _ = next(iter(data.batches(Cell("clean"), size, torch.device(config.device))))
    memory = torch.channels_last if config.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory)
    for rows in dict.fromkeys((len(x), n % size or len(x))):
        check_logits(
            model, subject.defense.info, x[:rows], f"{data.dataset} test images (the evaluation's batch size)"
        )


def cell_context(subject: Subject, config: EvalConfig) -> dict:
    """The KEY columns (and descriptive ones) that every cell of `subject` shares."""
    info = subject.defense.info
    low, high = subject.lambda_init or (None, None)
    return {
        "model": subject.model,
        "run": subject.run,
        "family": info.family,
        "dataset": info.dataset,
        "seed": subject.seed,
        "members": subject.members,
        "preset": config.preset,
        "checkpoint_sha256": info.checkpoint_sha256,
        "lambda_low": low,
        "lambda_high": high,
    }


def cell_key(cell: Cell, source: str, config: EvalConfig, n: int, digest: str | None) -> tuple:
    """A cell's records.CELL_COLUMNS, its parameters as the perturbation records them (with
    the subset rule unless ours and, for a randomized one, EvalConfig.seed unless 0, the command line's) and `digest` the data it reads (None: not known yet, as a dry run before the data is there)."""
    pert = perturbation(cell.perturbation)
    params = {**pert.params(config, cell.eps_255), **config.subset_params}
    if pert.randomized and config.seed:  # its random numbers come from the seed: another seed, another cell
        params = {**params, "seed": config.seed}
    return (source, cell.perturbation, cell.eps_255, cell.severity, n, params_text(params), digest)


def _row(
    context: dict, cell: Cell, data: EvalData, correct: np.ndarray, seconds: float, config: EvalConfig
) -> dict:
    key = cell_key(cell, data.source(cell), config, len(correct), data.digest(cell))
    return {
        **context,
        **dict(zip(CELL_COLUMNS, key, strict=True)),
        "correct": int(correct.sum()),
        "accuracy": float(correct.mean()),
        "torch_version": torch.__version__,
        "torchattacks_version": version("torchattacks"),
        "device": device_name(config.device),
        "batch_size": _batch_size(config),
        "seconds": round(seconds, 3),
        "timestamp": utc_now(),
    }


def _run_group(
    model: nn.Module, group: list[Cell], subject: Subject, config: EvalConfig, data: EvalData, bar: tqdm
) -> list[np.ndarray]:
    """Per-example correctness (bool, test-subset order) for each cell of the group; on a GPU
    out of memory, retried with half the batch size (unless the size was given)."""
    batch_size = _batch_size(config)
    while True:
        try:
            return _correct(model, group, subject, config, data, batch_size, bar)
        except torch.cuda.OutOfMemoryError:
            if config.batch_size is not None or batch_size == 1:
                raise UserError(
                    f"out of GPU memory at batch size {batch_size}: give a smaller --batch-size"
                ) from None
            batch_size //= 2
            torch.cuda.empty_cache()
            log.warning("out of GPU memory: retrying with batch size %d", batch_size)


def _correct(
    model: nn.Module,
    group: list[Cell],
    subject: Subject,
    config: EvalConfig,
    data: EvalData,
    batch_size: int,
    bar: tqdm,
) -> list[np.ndarray]:
    cell, device = group[0], torch.device(config.device)
    pert = perturbation(cell.perturbation)
    memory = torch.channels_last if config.channels_last else torch.contiguous_format
    remap = None
    if pert.kind == NOISE and preset(config.preset).noise_normalisation == PER_FILE:
        remap = _file_normalization(model, *data.file_stats(cell.perturbation))
    eps = [c.eps_255 / 255 for c in group]
    who = f"ensemble of {subject.members}" if subject.members > 1 else f"seed {subject.seed}"
    what = f"{subject.run} {data.dataset} {who} {group_name(group)}"
    out: list[list[Tensor]] = [[] for _ in group]
    for index, (x, y) in enumerate(data.batches(cell, batch_size, device)):
        x = x.contiguous(memory_format=memory)
        if pert.randomized:  # its random numbers depend on (seed, model seed, radius, batch) only
            seed = _batch_seed(config.seed, subject.seed, cell.eps_255, index)
            inputs = run_seeded(lambda a, b: pert.perturb(model, a, b, eps, config), x, y, seed)
        else:
            inputs = pert.perturb(model, x, y, eps, config)
        for slot, (x_in, e) in enumerate(zip(inputs, eps, strict=True)):
            if pert.kind == ATTACK:
                audit(x_in, x, pert.reach(config, e), what, pert.norm)
            out[slot].append(_predict_correct(model, remap(x_in) if remap else x_in, y, what))
        bar.update(group_cost(group, len(y), config))
    return [torch.cat(parts).cpu().numpy() for parts in out]


@torch.no_grad()
def _predict_correct(model: nn.Module, x: Tensor, y: Tensor, what: str) -> Tensor:
    logits = model(x)
    if not torch.isfinite(logits).all():
        raise AttackAuditError(f"{what}: the model returned non-finite logits")
    return logits.argmax(1) == y


def _batch_seed(base: int, model_seed: int, eps_255: float, batch: int) -> int:
    words = [base, model_seed - ENSEMBLE_SEED, round(eps_255 * 1000), batch]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def _file_normalization(model: nn.Module, mean: np.ndarray, std: np.ndarray) -> Callable[[Tensor], Tensor]:
    """The authors' release normalised each CIFAR-C file with its own per-channel mean and
    std instead of the training statistics. Our models normalise inside, so feed them
    x' = (x - m_file) / s_file * s_model + m_model, which the model maps to the release's
    input (x' may leave [0, 1]; fine for noise, which is not attacked)."""
    normalize = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    if normalize is None:
        raise UserError(
            "the release's presets renormalise noise files and need a model with a Normalize layer"
        )
    device = normalize.mean.device
    file_mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    file_std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return lambda x: (x - file_mean) / file_std * normalize.std + normalize.mean


def prepared(model: nn.Module, config: EvalConfig) -> nn.Module:
    """`model` on the config's device and memory layout, in eval mode, frozen."""
    memory = torch.channels_last if config.channels_last else torch.contiguous_format
    # torch's stubs take the device and the layout in separate calls
    return model.to(torch.device(config.device)).to(memory_format=memory).eval().requires_grad_(False)


def _batch_size(config: EvalConfig) -> int:
    if config.batch_size is not None:
        return config.batch_size
    return 512 if config.device.startswith("cuda") else 256
