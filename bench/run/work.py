"""What a worker does with one task (bench.run.plan): train a checkpoint, or measure a seed's
or an ensemble's cells and checks. A worker never writes the records: it yields what it
finished (bench.eval.engine.CellsDone, AuditFailed; ChecksDone; bench.eval.stability.StabilityDone;
Trained), one piece at
a time, and the driver alone writes `records.sqlite`. Checkpoints are the exception:
training writes them into the results dir with the atomic rules of bench.train.loop, and when
the driver's results dir is not the worker's (a cluster without a shared file system),
their files travel in the messages (`Work.files`, `Trained.files`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench.core.files import atomic_write
from bench.eval import model_checks
from bench.eval.adapters import ensemble_defense, zoo_defense
from bench.eval.engine import AuditFailed, CellsDone, measure_cells, prepared
from bench.eval.landscape import LandscapeDone, measure_landscapes
from bench.eval.protocol import Cell, Subject
from bench.eval.stability import StabilityDone, Unit, stability_stage
from bench.eval.testdata import EvalData, test_data
from bench.records.checkpoints import META_FILE, WEIGHTS_FILE, read_meta, zoo_checkpoint_dir
from bench.records.schema import ENSEMBLE_SEED, utc_now
from bench.run.plan import TRAIN, Task
from bench.train.loop import train
from models import UserError

CHECKPOINT_FILES = (WEIGHTS_FILE, META_FILE)
MODEL_CHECKS = ("zero-gradients", "randomized")  # what model_checks.model_checks records
TRANSFER_SEED_OFFSET = 7919  # any offset: the same random starts for the attack and its transfer source


@dataclass(frozen=True)
class Work:
    """One task, with everything a worker on any host needs and nothing it must look up
    in the records: the cells and checks to compute were decided by the driver."""

    task: Task  # what the plan asked: its kind, job, run tag and configs
    threads: int  # torch's CPU threads: a CPU's numbers depend on them, so every worker uses the driver's
    results_dir: str
    data_dir: str | None
    progress: bool
    driver_host: str
    run_id: str = ""  # the driver's run: data read in a worker is kept for that run only
    seeds: tuple[int, ...] = ()  # the checkpoints measured (an ensemble's finished members)
    cells: tuple[Cell, ...] = ()
    checks: tuple[str, ...] = ()  # "model" (MODEL_CHECKS) and "transfer"
    transfer_from: str | None = None  # the plain run whose attack transfers
    transfer_seed: int | None = None  # its seed (None: the subject's)
    # a defense's weights' digest the driver planned for (a file changed since: an error)
    defense_sha256: str = ""
    stability: tuple[Unit, ...] = ()  # the stability stage's units still to measure
    landscapes: tuple[tuple[str, int], ...] = ()  # Fig. 2's images still to measure: (image group, row)
    # results-dir-relative path -> {file name: bytes}: checkpoints to place before the work
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class ChecksDone:
    rows: list[dict]
    summary: str


@dataclass(frozen=True)
class Trained:
    meta: dict
    files: dict[str, dict[str, bytes]]  # empty when the worker shares the driver's results dir


Message = CellsDone | AuditFailed | ChecksDone | StabilityDone | LandscapeDone | Trained


def execute(work: Work) -> Iterator[Message]:
    """Run `work`, yielding each finished piece; exceptions are the task's failure."""
    torch.set_num_threads(work.threads)
    place_files(work.results_dir, work.files)
    task = work.task
    if task.kind == TRAIN:
        config = task.checkpoint
        assert config is not None  # a training task's
        meta = train(config, work.results_dir, work.data_dir, work.progress)
        folder = zoo_checkpoint_dir(work.results_dir, config.dataset, config.run_tag, config.seed)
        remote = socket.gethostname() != work.driver_host
        yield Trained(meta, {relative(work.results_dir, folder): checkpoint_files(folder)} if remote else {})
        return
    if task.job.defense is not None:
        members = [task.job.defense.build()]
        if members[0].info.checkpoint_sha256 != work.defense_sha256:
            raise UserError(
                f"defense {work.task.run_tag}: {members[0].info.checkpoint} changed since the run began (its sha256 "
                "is another): run again to evaluate the file as it is now"
            )
    else:
        members = [
            zoo_defense(work.task.run_tag, work.task.job.dataset, s, work.results_dir) for s in work.seeds
        ]
    defense = members[0] if len(members) == 1 else ensemble_defense(members, name=work.task.run_tag)
    init = lambda_init_of(members[0].model)  # an ensemble's: its members'
    subject = Subject(defense, work.task.job.name, work.task.run_tag, _seed(work), len(work.seeds), init)
    if work.cells:
        yield from measure_cells(subject, work.task.eval, eval_data(work), work.cells, work.progress)
    with users_forward(subject, work.task.job.dataset, "its sanity checks"):
        if work.checks:
            yield _checks(subject, work)
    with users_forward(subject, work.task.job.dataset, "the stability stage"):
        if work.stability:
            data = eval_data(work)
            yield from stability_stage(subject, work.task.eval, data, work.task.stability, work.stability)
    with users_forward(subject, work.task.job.dataset, "Fig. 2's landscapes"):
        if work.landscapes and work.task.landscape is not None:
            yield from measure_landscapes(
                subject, work.task.eval, eval_data(work), work.task.landscape, work.landscapes
            )


@contextlib.contextmanager
def users_forward(subject: Subject, dataset: str, stage: str) -> Iterator[None]:
    """A defense of the user's that fails in `stage` is one error line (what it measured
    before is recorded and kept); a failure of the zoo's networks keeps its traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if subject.defense.info.ours:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"defense {subject.run} on {dataset} failed in {stage} ({type(err).__name__}: {reason}); "
            "what it finished before is kept in the records: fix its forward and run again"
        ) from None


def _seed(work: Work) -> int:
    return work.seeds[0] if len(work.seeds) == 1 else ENSEMBLE_SEED


def eval_data(work: Work) -> EvalData:
    """The work's test data: the run's one view of it in this process (bench.eval.testdata)."""
    return test_data(work.task.job.dataset, work.data_dir, work.task.eval, work.run_id)


def _checks(subject: Subject, work: Work) -> ChecksDone:
    """bench.eval.model_checks' checkpoint checks the driver asked for."""
    config = work.task.eval
    model = prepared(subject.defense.model, config)
    x, y = model_checks.batch(eval_data(work), device=config.device)
    results = []
    if "model" in work.checks:
        results += model_checks.model_checks(model, x, y, subject.defense.info.num_classes)
    if "transfer" in work.checks and work.transfer_from is not None:
        source_seed = subject.seed if work.transfer_seed is None else work.transfer_seed
        source = prepared(
            zoo_defense(work.transfer_from, work.task.job.dataset, source_seed, work.results_dir).model,
            config,
        )
        seed = subject.seed + TRANSFER_SEED_OFFSET
        check, value, limit, detail = model_checks.transfer_check(model, source, x, y, config, 2.0, seed)
        if work.task.job.defense is not None:  # not its own ResNet: the source is named
            detail += f" (from {work.transfer_from} seed {source_seed})"
        results.append((check, value, limit, detail))
    failed = [c for c, value, limit, _ in results if value > limit]
    who = f"ensemble of {subject.members}" if subject.members > 1 else f"seed {subject.seed}"
    summary = f"{subject.run} {work.task.job.dataset} {who}: {len(results)} checks, "
    summary += "failed: " + ", ".join(failed) if failed else "all pass"
    return ChecksDone(model_checks.check_rows(subject, results, utc_now()), summary)


def lambda_init_of(model: nn.Module) -> tuple[float, float] | None:
    """The λ initialisation recorded with a model's cells (None for plain and residual)."""
    info = getattr(model, "info", None)
    return None if info is None else info.damped_lambda_init


# --- checkpoints for results dirs that are not shared ---------------------------------------


def relative(results_dir: str, folder: Path) -> str:
    return Path(folder).relative_to(results_dir).as_posix()


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in CHECKPOINT_FILES}


def place_files(results_dir: str, files: dict[str, dict[str, bytes]]) -> None:
    """Write checkpoints that travelled with a message, unless the same one is there:
    weights first, then meta.json (the reader's commit point), each atomically."""
    for where, contents in files.items():
        folder = Path(results_dir) / where
        if (folder / META_FILE).is_file() and (folder / META_FILE).read_bytes() == contents[META_FILE]:
            continue
        for name in CHECKPOINT_FILES:
            atomic_write(folder / name, lambda f, data=contents[name]: f.write(data))
        read_meta(folder / META_FILE)  # fails loudly on a garbled transfer
