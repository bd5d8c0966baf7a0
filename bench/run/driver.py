"""The driver: turns tasks into work for the executor, skips what the records hold, and
alone writes what workers send back (cells, checks, stability units, runs), holding each
run's lock while its work is in flight; a worker that dies is tried again."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bench.attacks.perturbations import ATTACK, perturbation, pooled_noise
from bench.core.files import LOCKS, run_lock
from bench.eval.defenses import STATE_DICT
from bench.eval.engine import AuditFailed, CellsDone, EvalData, cell_key, cells_todo
from bench.eval.protocol import EvalConfig, protocol_cells
from bench.eval.sanity import plain_counterpart
from bench.eval.stability import StabilityDone, Unit, stage_units, units_todo
from bench.records.aggregate import with_pooled_noise
from bench.records.checkpoints import META_FILE, ensemble_digest, read_meta, zoo_checkpoint_dir
from bench.records.schema import CELL_COLUMNS, UNKNOWN_DATA, utc_now
from bench.records.store import RecordStore
from bench.run.checks import Resolved
from bench.run.estimate import DataSizes
from bench.run.executors import DONE, Crashed, Executor, Raised
from bench.run.options import RunOptions
from bench.run.plan import (
    DEFENSE,
    ENSEMBLE,
    MEASURE,
    TRAIN,
    Task,
    eval_config,
    stability_config,
    task_resources,
    train_config,
)
from bench.run.suites import Suite
from bench.run.work import MODEL_CHECKS, ChecksDone, Trained, Work, checkpoint_files, place_files, relative
from bench.train.loop import finished_run
from models import create_model, list_models, model_entry

log = logging.getLogger(__name__)


STAGE_NAMES = ("train", "eval", "stability", "check", "report")  # the stages whose seconds the driver adds up
MAX_ATTEMPTS = 3  # a task whose worker dies is tried again, up to this many times in all


@dataclass
class Outcome:
    failed_runs: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    cells_run: int = 0
    stability_run: int = 0  # stability units recorded
    errors: list[str] = field(default_factory=list)


@dataclass
class Running:
    task: Task
    work: Work
    locks: ExitStack
    began: float
    cells: int = 0
    measured: float = 0.0  # seconds of its cells and stability units, as recorded


class Driver:
    """Decides each task's work, hands it to an executor and records what comes back.
    With `dry`, it only decides: nothing is written and no run is recorded."""

    def __init__(self, options: RunOptions, suite: Suite, device: str, store: RecordStore, dry: bool = False,
                 defenses: dict[str, Resolved] | None = None):  # fmt: skip
        self.options, self.suite, self.device, self.store, self.dry = options, suite, device, store, dry
        self.defenses = defenses or {}  # task name -> the defense as built once, before any work
        self.outcome = Outcome()
        self._data: dict[tuple, EvalData | DataSizes] = {}
        self._contexts: dict[str, dict] = {}  # task name -> the KEY columns of its checkpoint
        self.cached: dict[str, int] = {}  # task name -> its cells found in the records
        self.stability_cached: dict[str, int] = {}  # task name -> its stability units found in the records
        # seconds per stage of this run: train (its tasks' wall), eval (the cells' own seconds),
        # stability (its units'), check (the rest of a measuring task: checks, loading), report
        self.stage_seconds: Counter[str] = Counter(dict.fromkeys(STAGE_NAMES, 0.0))
        self._host = socket.gethostname()
        self._run_id = uuid.uuid4().hex  # workers' test sets are read again in each run (the files may have changed)
        self._ship = options.ray_address is not None  # workers may not see our results dir
        # CPU results depend on the thread count (reduction order): every worker uses this
        # process's, so that records never depend on the executor; a GPU task its CPUs'
        self._threads = torch.get_num_threads() if device == "cpu" else task_resources(suite, device).cpus

    # --- what is left to do -------------------------------------------------------------

    def data(self, dataset: str, config: EvalConfig) -> EvalData | DataSizes:
        """The test set as the cells will see it (its sizes alone in a dry run on a data
        dir that lacks it: a dry run writes and downloads nothing)."""
        key = (dataset, config.n_test, config.subsets, config.noise_source)
        if key not in self._data:
            sizes = DataSizes(dataset, self.options.data_dir, config)
            self._data[key] = sizes if self.dry and not sizes.present else EvalData(dataset, self.options.data_dir, config, not self.dry)
        return self._data[key]

    def work_for(self, task: Task) -> Work | None:
        """The work `task` still needs, or None when nothing is left (or nothing can be
        done: a checkpoint missing or failed)."""
        options = self.options
        base = {
            "threads": self._threads,
            "results_dir": str(options.results_dir),
            "data_dir": None if options.data_dir is None else str(options.data_dir),
            "progress": options.progress,
            "driver_host": self._host,
            "run_id": self._run_id,
        }
        if task.kind == TRAIN:
            config = train_config(task.job, task.seed, self.suite, options, self.device)
            meta = finished_run(config, options.results_dir)
            if meta is None:
                return Work(TRAIN, train=config, **base)
            if not self.dry:
                log.info("%s %s seed %d: %s already", config.tag, config.dataset, config.seed, meta["status"])
                self._trained(meta, config.tag, config.dataset, config.seed)
            return None
        ensemble = task.kind == ENSEMBLE
        if task.kind == DEFENSE:
            members: dict = {0: None}
            digest = self.defenses[task.name].info.checkpoint_sha256
        else:
            metas = {s: self._finished(task, s) for s in task.seeds}
            members = {s: m for s, m in metas.items() if m is not None}
            if not members or (ensemble and len(members) < 2):
                return None
            digests = [m["sha256"] for m in members.values()]
            digest = ensemble_digest(digests) if ensemble else digests[0]
        if ensemble and not self.dry:
            self.store.add_ensemble(digest, task.run, task.job.dataset, {s: m["sha256"] for s, m in members.items()})
        config = eval_config(task.job, self.suite, options, self.device, ensemble)
        seed = task.seed
        context = {"run": task.run, "dataset": task.job.dataset, "seed": seed, "members": len(members),
                   "preset": config.preset, "checkpoint_sha256": digest}  # fmt: skip
        self._contexts[task.name] = context
        asked = protocol_cells(config)
        todo = cells_todo(context, config, self.data(task.job.dataset, config), self.store, asked) if "eval" in options.stages else []
        self.cached[task.name] = len(asked) - len(todo) if "eval" in options.stages else 0  # a retry asks again
        checks, transfer = self._checks_todo(task, context) if "check" in options.stages else ((), None)
        stable = self._stability_todo(task, context, config) if "stability" in options.stages else []
        if not todo and not checks and not stable:
            return None
        defense = task.kind == DEFENSE
        folders = [] if defense else [zoo_checkpoint_dir(options.results_dir, task.job.dataset, task.run, s) for s in members]
        if transfer is not None:
            folders.append(zoo_checkpoint_dir(options.results_dir, task.job.dataset, *transfer))
        files = {relative(options.results_dir, f): checkpoint_files(f) for f in folders} if self._ship else {}
        return Work(task.kind, model=task.job.model, run=task.run, dataset=task.job.dataset, seeds=tuple(members),
                    config=config, cells=tuple(todo), checks=checks, transfer_from=transfer and transfer[0],
                    transfer_seed=transfer and transfer[1], files=files, stability=tuple(stable),
                    stability_config=stability_config(self.suite, options), defense=task.job.defense if defense else None,
                    defense_sha256=digest if defense else "", **base)  # fmt: skip

    def _finished(self, task: Task, seed: int) -> dict | None:
        """The meta.json of a finished checkpoint (recorded as a run seen); None, with the
        reason logged, for a missing, unfinished or failed one."""
        job = task.job
        folder = zoo_checkpoint_dir(self.options.results_dir, job.dataset, task.run, seed)
        what = f"{task.run} {job.dataset} seed {seed}"
        if not (folder / META_FILE).is_file():
            log.warning("%s: no checkpoint in %s (run the train stage); skipped", what, folder)
            self.outcome.missing.add(what)
            return None
        meta = read_meta(folder / META_FILE)  # its recipe and build were checked when the run began
        status = meta.get("status", "finished")
        if status not in ("finished", "failed"):  # "running": its training was interrupted
            log.warning("%s: run is %s; not evaluated", what, status)
            self.outcome.missing.add(what)
            return None
        if task.kind == MEASURE and not self.dry:
            self.store.add_run(run_row(meta, task.run, job.dataset, seed))
        if status == "failed":
            if task.kind == MEASURE:
                log.warning("%s: run failed (%s); not evaluated", what, meta.get("reason", ""))
            self.outcome.failed_runs.add(what)
            return None
        return meta

    def _checks_todo(self, task: Task, context: dict) -> tuple[tuple[str, ...], tuple[str, int] | None]:
        """The checks not yet recorded for the checkpoint, and the transfer source's run
        and seed."""
        done = self.store.recorded_checks(context)
        checks = set(self.suite.checks)
        wanted = ("model",) if {"gradients", "model"} & checks and not set(MODEL_CHECKS) <= done else ()
        transfer = None
        if task.kind in (MEASURE, DEFENSE) and "transfer" in checks and "transfer" not in done:
            transfer = self._transfer_source(task) if task.kind == MEASURE else self._defense_transfer_source(task)
        return wanted + (("transfer",) if transfer else ()), transfer

    def _stability_todo(self, task: Task, context: dict, config: EvalConfig) -> list[Unit]:
        """The stability units not yet recorded for the checkpoint."""
        data = self.data(task.job.dataset, config)
        blockwise = task.kind != DEFENSE or self.defenses[task.name].blockwise
        units = stage_units(context["members"], blockwise)
        self.stability_cached[task.name] = len(units)
        todo = units_todo(context, units, data, stability_config(self.suite, self.options), config, self.store)
        self.stability_cached[task.name] -= len(todo)
        return todo

    def _transfer_source(self, task: Task) -> tuple[str, int] | None:
        """The finished ResNet of the same architecture, data set, seed and recipe as the
        task's interpolated model (the source of the transfer check), or None."""
        job, seed = task.job, task.seed
        plain = plain_counterpart(job.model)
        if plain is None:
            return None
        tag = train_config(replace(job, model=plain, lambda_init=None), seed, self.suite, self.options, self.device).tag
        meta = zoo_checkpoint_dir(self.options.results_dir, job.dataset, tag, seed) / META_FILE
        if not meta.is_file() or read_meta(meta).get("status") != "finished":
            log.info("%s %s seed %d: no finished %s to transfer from; transfer check skipped", job.model, job.dataset, seed, tag)
            return None
        return tag, seed

    def _defense_transfer_source(self, task: Task) -> tuple[str, int] | None:
        """The plain ResNet a defense's transfer check attacks from: a finished checkpoint
        of the same data set in the results dir whose model has the residual skip (of the
        defense's own architecture when it is a registered interpolated one), the first in
        registry, tag and seed order; None, said in the log, when there is none."""
        dataset, options = task.job.dataset, self.options
        source = task.job.defense
        arch = source.target if getattr(source, "source", "") == STATE_DICT else ""
        wanted = plain_counterpart(arch) if arch else None
        order = {name: i for i, name in enumerate(list_models())}
        found = []
        for path in (Path(options.results_dir) / "checkpoints" / dataset).glob(f"*/seed*/{META_FILE}"):
            meta = read_meta(path)
            model = meta["model"]
            if meta.get("status", "finished") == "finished" and model in order and model_entry(model).rule == "residual" \
                    and wanted in (None, model) and path.parent.name[4:].isdigit():  # fmt: skip
                found.append((order[model], path.parent.parent.name, int(path.parent.name[4:])))
        if not found:
            log.info("%s %s: no finished %s in %s to transfer from; transfer check skipped (train one, e.g. "
                     "--models %s --datasets %s --stage train)", task.run, dataset, wanted or "ResNet",
                     Path(options.results_dir) / "checkpoints" / dataset, wanted or "resnet110", dataset)  # fmt: skip
            return None
        _, tag, seed = min(found)
        log.info("%s %s: the transfer check attacks from %s seed %d", task.run, dataset, tag, seed)
        return tag, seed

    # --- running ------------------------------------------------------------------------

    def execute(self, tasks: list[Task], executor: Executor) -> None:
        """Run `tasks` on `executor`, each when the tasks it waits for are done, as many
        at once as the executor has slots; a task another process holds (the same run
        started twice on one results dir) waits until nothing else is left."""
        pending, finished, deferred = list(tasks), set(), []
        running: dict[str, Running] = {}
        attempts: Counter[str] = Counter()
        while pending or running or deferred:
            for task in [t for t in pending if set(t.after) <= finished]:
                if len(running) >= executor.slots:
                    break
                pending.remove(task)
                self._start(task, executor, running, finished, deferred, blocking=False)
            if not running:
                if pending and not deferred and not any(set(t.after) <= finished for t in pending):
                    raise RuntimeError(f"tasks wait for tasks outside the plan: {[t.name for t in pending]}")
                if deferred:
                    self._start(deferred.pop(0), executor, running, finished, deferred, blocking=True)
                continue
            name, event = executor.next_event()
            if name not in running:  # a late message of a task given up on
                continue
            if event == DONE or isinstance(event, Crashed | Raised):
                done = running.pop(name)
                done.locks.close()
                if isinstance(event, Raised):
                    raise event.error
                if isinstance(event, Crashed):
                    attempts[name] += 1
                    if attempts[name] < MAX_ATTEMPTS:
                        log.warning("%s: %s; trying again (attempt %d of %d)", name, event.reason, attempts[name] + 1, MAX_ATTEMPTS)
                        pending.insert(0, done.task)
                        continue
                    self.outcome.errors.append(f"{name}: {event.reason}; gave up after {MAX_ATTEMPTS} attempts")
                else:
                    self._finish(done)
                finished.add(name)
            else:
                self._record(running[name], event)

    def _start(self, task, executor, running, finished, deferred, blocking: bool) -> None:
        locks = ExitStack()
        who = "ensemble" if task.kind == ENSEMBLE else f"seed{task.seed}"
        stage = "train" if task.kind == TRAIN else "eval"
        path = Path(self.options.results_dir) / LOCKS / task.job.dataset / task.run / f"{who}.{stage}.lock"
        if not locks.enter_context(run_lock(path, blocking=blocking)):
            locks.close()
            log.info("%s %s %s %s: busy in another process; coming back to it later", task.run, task.job.dataset, who, stage)
            deferred.append(task)
            return
        work = self.work_for(task)
        if work is None:
            locks.close()
            finished.add(task.name)
            return
        executor.submit(task.name, work)
        running[task.name] = Running(task, work, locks, time.perf_counter())

    def _record(self, state: Running, message) -> None:
        if isinstance(message, CellsDone):
            added = self.store.add_cells(message.rows, message.correct)  # 0 where another process was first
            self._clock(state, "eval", sum(row["seconds"] for row in message.rows))
            state.cells += added
            self.outcome.cells_run += added
        elif isinstance(message, AuditFailed):
            self.outcome.errors.append(message.error)
        elif isinstance(message, ChecksDone):
            self.store.add_checks(message.rows)
            log.info("%s", message.summary)
        elif isinstance(message, StabilityDone):
            self.outcome.stability_run += self.store.add_stability(message.rows, message.values) > 0
            self._clock(state, "stability", max((row["seconds"] for row in message.rows), default=0.0))  # the unit's, on each row
            log.info("%s", message.summary)
        elif isinstance(message, Trained):
            place_files(self.options.results_dir, message.files)
            meta, config = message.meta, state.work.train
            self._trained(meta, config.tag, config.dataset, config.seed)

    def _trained(self, meta: dict, tag: str, dataset: str, seed: int) -> None:
        self.store.add_run(run_row(meta, tag, dataset, seed))
        if meta["status"] == "failed":
            self.outcome.failed_runs.add(f"{tag} {dataset} seed {seed}")

    def _clock(self, state: Running, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] += seconds
        state.measured += seconds

    def _finish(self, state: Running) -> None:
        work = state.work
        elapsed = time.perf_counter() - state.began
        self.stage_seconds["train" if work.kind == TRAIN else "check"] += max(elapsed - state.measured, 0.0)
        if work.kind == TRAIN or not work.cells:
            return
        data = self.data(work.dataset, work.config)
        line = summary_line(self._contexts[state.task.name], work.config, data, self.store)
        cached = len(protocol_cells(work.config)) - len(work.cells)
        log.info("%s (%d cells run, %d cached, %.0f s)", line, state.cells, cached, time.perf_counter() - state.began)


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


def summary_line(context: dict, config: EvalConfig, data: EvalData | DataSizes, store: RecordStore) -> str:
    """One line: clean, mean noise accuracy, and each attack at each radius, in percent, of
    exactly the cells `config` asks for (no other test size, step count or data source) of
    the checkpoint `context` names."""
    frame = store.cells(context)
    asked = {cell_key(c, data.source(c), config, data.n(c), data.digest(c)) for c in protocol_cells(config)}
    asked |= {(*k[:-1], UNKNOWN_DATA) for k in asked} if config.trust_unknown_data else set()
    frame = frame[[key in asked for key in frame[list(CELL_COLUMNS)].itertuples(index=False, name=None)]]
    # a cell measured again on other data (or once more after its digest was unknown): the last measurement
    frame = frame.sort_values("timestamp", kind="stable").drop_duplicates(["perturbation", "eps_255", "severity"], keep="last")
    mine = with_pooled_noise(frame)

    def pct(rows) -> str:
        return f"{100 * rows['accuracy'].mean():.1f}" if len(rows) else "-"

    parts = [f"clean {pct(mine[mine['perturbation'] == 'clean'])}"]
    parts.append(f"noise {pct(mine[mine['perturbation'].isin(pooled_noise()) & (mine['severity'] == 0)])}")
    for kind in dict.fromkeys(c.perturbation for c in protocol_cells(config) if perturbation(c.perturbation).kind == ATTACK):
        rows = mine[mine["perturbation"] == kind].sort_values("eps_255")
        if len(rows):
            radii = "/".join(f"{e:g}" for e in rows["eps_255"])
            parts.append(f"{kind}@{radii}/255 " + "/".join(f"{100 * a:.1f}" for a in rows["accuracy"]))
    who = "ensemble of " + str(context["members"]) if context["members"] > 1 else f"seed {context['seed']}"
    return f"{context['run']} {data.dataset} {who}: " + " | ".join(parts)
