"""What is left to do for a task of the plan (bench.run.plan): the checkpoint's state, the
cells, checks and stability units the records lack, the transfer check's source. The
driver asks it before each task and the dry run's estimate asks it too, so the two agree
on what is cached. Nothing here writes: what a decision saw that the records should keep
(runs seen, an ensemble's members) travels in the `Decision`, for the driver to write."""

from __future__ import annotations

import logging
import socket
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from bench.eval.adapters import DefenseInfo
from bench.eval.defenses import STATE_DICT
from bench.eval.engine import cells_todo
from bench.eval.landscape import image_source, images_of
from bench.eval.protocol import Cell, protocol_cells
from bench.eval.stability import Unit, stage_units, units_todo
from bench.eval.testdata import EvalData, test_data
from bench.records.checkpoints import META_FILE, ensemble_digest, read_meta, zoo_checkpoint_dir
from bench.records.schema import utc_now
from bench.records.store import RecordStore
from bench.run.options import RunOptions
from bench.run.plan import DEFENSE, ENSEMBLE, MEASURE, TRAIN, Task, task_resources
from bench.run.suites import Suite
from bench.run.work import MODEL_CHECKS, Work, checkpoint_files, relative
from bench.train.loop import finished_run
from models import create_model, list_models, model_entry, plain_counterpart

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolved:
    """A defense as the driver built it once, before any work: its facts, whether it has
    the zoo's residual blocks (the stability stage's per-block units), and for a dry run
    the module its throughput is probed on."""

    info: DefenseInfo
    blockwise: bool
    model: nn.Module | None = None
    randomized: bool = (
        False  # its forward passes differ: AutoAttack's rand version too (EvalConfig.randomized_extra)
    )


@dataclass
class Decision:
    """What a task still needs (`work`, None when nothing is left or nothing can be done),
    and what deciding it saw."""

    work: Work | None = None
    runs: list[dict] = field(default_factory=list)  # records rows of the training runs seen (run_row)
    ensemble: tuple | None = None  # (digest, run tag, dataset, seed -> member sha256) of an ensemble measured
    missing: list[str] = field(default_factory=list)  # checkpoints not there, or unfinished
    failed: list[str] = field(default_factory=list)  # checkpoints whose training failed
    cached: int = 0  # the task's cells found in the records
    stability_cached: int = 0  # its stability units found there
    context: dict | None = None  # the KEY columns of the checkpoint it measures


class ToDo:
    """Answers, for each task, what is left to do, from the records, the checkpoints'
    meta.json and the test data (one view per data set, bench.eval.testdata)."""

    def __init__(
        self,
        options: RunOptions,
        suite: Suite,
        device: str,
        store: RecordStore,
        dry: bool = False,
        defenses: dict[str, Resolved] | None = None,
        run_id: str | None = None,
    ):
        self.options, self.suite, self.device, self.store, self.dry = options, suite, device, store, dry
        self.base = work_base(options, suite, device, run_id)  # the Work fields every task shares
        self.defenses = defenses or {}  # task name -> the defense as built once, before any work
        self._ship = options.ray_address is not None  # workers may not see our results dir

    def data(self, task: Task) -> EvalData:
        """The test set as the task's cells will see it."""
        return test_data(task.job.dataset, self.options.data_dir, task.eval, self.base["run_id"], self.dry)

    def cells(self, task: Task) -> list[Cell]:
        """The cells the task asks for: its protocol's, and on a randomized defense the
        rand version's (EvalConfig.randomized_extra)."""
        return protocol_cells(task.eval, task.kind == DEFENSE and self.defenses[task.name].randomized)

    def decide(self, task: Task) -> Decision:
        if task.kind == TRAIN:
            meta = finished_run(task.checkpoint, self.options.results_dir)
            if meta is None:
                return Decision(Work(task, **self.base))
            config = task.checkpoint
            if self.dry:
                return Decision()
            log.info("%s %s seed %d: %s already", config.run_tag, config.dataset, config.seed, meta["status"])
            failed = (
                [f"{config.run_tag} {config.dataset} seed {config.seed}"]
                if meta["status"] == "failed"
                else []
            )
            return Decision(runs=[run_row(meta, config.run_tag, config.dataset, config.seed)], failed=failed)
        decision = Decision()
        if task.kind == DEFENSE:
            members: dict = {0: None}
            digest = self.defenses[task.name].info.checkpoint_sha256
        else:
            metas = {s: self._finished(task, s, decision) for s in task.seeds}
            members = {s: m for s, m in metas.items() if m is not None}
            if not members or (task.kind == ENSEMBLE and len(members) < 2):
                return decision
            digests = [m["sha256"] for m in members.values()]
            digest = ensemble_digest(digests) if task.kind == ENSEMBLE else digests[0]
        if task.kind == ENSEMBLE:
            decision.ensemble = (
                digest,
                task.run_tag,
                task.job.dataset,
                {s: m["sha256"] for s, m in members.items()},
            )
        decision.context = context = {
            "run": task.run_tag,
            "dataset": task.job.dataset,
            "seed": task.seed,
            "members": len(members),
            "preset": task.eval.preset,
            "checkpoint_sha256": digest,
        }
        stages = self.options.stages
        todo, asked = [], self.cells(task)
        if "eval" in stages:
            todo = cells_todo(context, task.eval, self.data(task), self.store, asked)
            decision.cached = len(asked) - len(todo)
        checks, transfer = self._checks_todo(task, context) if "check" in stages else ((), None)
        stability_units = self._stability_todo(task, context, decision) if "stability" in stages else []
        landscapes = self._landscapes_todo(task, context) if "stability" in stages else []
        if todo or checks or stability_units or landscapes:
            decision.work = self._work(
                task, members, digest, todo, checks, transfer, stability_units, landscapes
            )
        return decision

    def _work(
        self,
        task: Task,
        members: dict,
        digest: str,
        todo: list,
        checks: tuple,
        transfer: tuple[str, int] | None,
        stability_units: list,
        landscapes: list,
    ) -> Work:
        options, defense = self.options, task.kind == DEFENSE
        folders = (
            []
            if defense
            else [zoo_checkpoint_dir(options.results_dir, task.job.dataset, task.run_tag, s) for s in members]
        )
        if transfer is not None:
            folders.append(zoo_checkpoint_dir(options.results_dir, task.job.dataset, *transfer))
        files = {relative(options.results_dir, f): checkpoint_files(f) for f in folders} if self._ship else {}
        return Work(
            task,
            seeds=tuple(members),
            cells=tuple(todo),
            checks=checks,
            transfer_from=transfer and transfer[0],
            transfer_seed=transfer and transfer[1],
            files=files,
            stability=tuple(stability_units),
            landscapes=tuple(landscapes),
            defense_sha256=digest if defense else "",
            **self.base,
        )

    def _finished(self, task: Task, seed: int, decision: Decision) -> dict | None:
        """The meta.json of a finished checkpoint (its run seen, for the records); None,
        with the reason logged, for a missing, unfinished or failed one."""
        job = task.job
        folder = zoo_checkpoint_dir(self.options.results_dir, job.dataset, task.run_tag, seed)
        what = f"{task.run_tag} {job.dataset} seed {seed}"
        if not (folder / META_FILE).is_file():
            log.warning("%s: no checkpoint in %s (run the train stage); skipped", what, folder)
            decision.missing.append(what)
            return None
        meta = read_meta(folder / META_FILE)  # its recipe and build were checked when the run began
        status = meta.get("status", "finished")
        if status not in ("finished", "failed"):  # "running": its training was interrupted
            log.warning("%s: run is %s; not evaluated", what, status)
            decision.missing.append(what)
            return None
        if task.kind == MEASURE:
            decision.runs.append(run_row(meta, task.run_tag, job.dataset, seed))
        if status == "failed":
            if task.kind == MEASURE:
                log.warning("%s: run failed (%s); not evaluated", what, meta.get("reason", ""))
            decision.failed.append(what)
            return None
        return meta

    def _checks_todo(self, task: Task, context: dict) -> tuple[tuple[str, ...], tuple[str, int] | None]:
        """The checks not yet recorded for the checkpoint, and the transfer source's run and seed."""
        done = self.store.recorded_checks(context)
        checks = set(self.suite.checks)
        wanted = ("model",) if {"gradients", "model"} & checks and not set(MODEL_CHECKS) <= done else ()
        transfer = None
        if task.kind in (MEASURE, DEFENSE) and "transfer" in checks and "transfer" not in done:
            transfer = (
                self._transfer_source(task) if task.kind == MEASURE else self._defense_transfer_source(task)
            )
        return wanted + (("transfer",) if transfer else ()), transfer

    def _stability_todo(self, task: Task, context: dict, decision: Decision) -> list[Unit]:
        """The stability units not yet recorded for the checkpoint."""
        blockwise = task.kind != DEFENSE or self.defenses[task.name].blockwise
        units = stage_units(context["members"], blockwise)
        todo = units_todo(context, units, self.data(task), task.stability, task.eval, self.store)
        decision.stability_cached = len(units) - len(todo)
        return todo

    def _landscapes_todo(self, task: Task, context: dict) -> list[tuple[str, int]]:
        """Fig. 2's images not yet recorded for the checkpoint on this grid and these files."""
        data, grid = self.data(task), task.landscape
        if grid is None:  # a model Fig. 2 does not show
            return []
        done = self.store.landscapes_done(context)
        return [
            (group, row)
            for group, row in images_of(data, grid)
            if (group, row, image_source(data, group)[1], grid.radius, grid.points, grid.seed) not in done
        ]

    def _transfer_source(self, task: Task) -> tuple[str, int] | None:
        """The finished ResNet of the same architecture, data set, seed and recipe as the
        task's interpolated model (the source of the transfer check), or None."""
        job, seed = task.job, task.seed
        plain = plain_counterpart(job.name)
        if plain is None:
            return None
        tag = replace(
            task.checkpoint, model=plain, lambda_init=None
        ).run_tag  # the same recipe, length and subset
        meta = zoo_checkpoint_dir(self.options.results_dir, job.dataset, tag, seed) / META_FILE
        if not meta.is_file() or read_meta(meta).get("status") != "finished":
            log.info(
                "%s %s seed %d: no finished %s to transfer from; transfer check skipped",
                job.name,
                job.dataset,
                seed,
                tag,
            )
            return None
        return tag, seed

    def _defense_transfer_source(self, task: Task) -> tuple[str, int] | None:
        """The plain ResNet a defense's transfer check attacks from: a finished checkpoint
        of the same data set in the results dir whose model has the residual skip (of the
        defense's own architecture when it is a registered interpolated one), the first in
        registry, tag and seed order; None, said in the log, when there is none."""
        dataset, options = task.job.dataset, self.options
        source = task.job.defense
        arch = source.target if source is not None and source.source == STATE_DICT else ""
        wanted = plain_counterpart(arch) if arch else None
        order = {name: i for i, name in enumerate(list_models())}
        found = []
        for path in (Path(options.results_dir) / "checkpoints" / dataset).glob(f"*/seed*/{META_FILE}"):
            meta = read_meta(path)
            model = meta["model"]
            if (
                meta.get("status", "finished") == "finished"
                and model in order
                and model_entry(model).rule == "residual"
                and wanted in (None, model)
                and path.parent.name[4:].isdigit()
            ):
                found.append((order[model], path.parent.parent.name, int(path.parent.name[4:])))
        if not found:
            log.info(
                "%s %s: no finished %s in %s to transfer from; transfer check skipped (train one, e.g. "
                "--models %s --datasets %s --stage train)",
                task.run_tag,
                dataset,
                wanted or "ResNet",
                Path(options.results_dir) / "checkpoints" / dataset,
                wanted or "resnet110",
                dataset,
            )
            return None
        _, tag, seed = min(found)
        log.info("%s %s: the transfer check attacks from %s seed %d", task.run_tag, dataset, tag, seed)
        return tag, seed


def work_base(options: RunOptions, suite: Suite, device: str, run_id: str | None = None) -> dict:
    """The Work fields every task of a run shares."""
    return {
        # CPU results depend on the thread count (reduction order): every worker uses this
        # process's, so that records never depend on the executor; a GPU task its CPUs'
        "threads": torch.get_num_threads() if device == "cpu" else task_resources(suite, device).cpus,
        "results_dir": str(options.results_dir),
        "data_dir": None if options.data_dir is None else str(options.data_dir),
        "progress": options.progress,
        "driver_host": socket.gethostname(),
        "run_id": run_id
        or uuid.uuid4().hex,  # test sets are read again in each run (the files may have changed)
    }


def run_row(meta: dict, tag: str, dataset: str, seed: int) -> dict:
    """The records' row of a training run, from its meta.json."""
    with torch.device("meta"):  # only the λ initialisation is read: no weights are made
        model = create_model(meta["model"], **meta["model_kwargs"])
    low, high = model.info.damped_lambda_init or (None, None)
    return {
        "model": meta["model"],
        "run": tag,
        "dataset": dataset,
        "seed": seed,
        "lambda_low": low,
        "lambda_high": high,
        "status": meta.get("status", "finished"),
        "reason": meta.get("reason", ""),
        "test_accuracy": meta.get("test_accuracy"),
        "checkpoint_sha256": meta["sha256"],
        "timestamp": utc_now(),
    }
