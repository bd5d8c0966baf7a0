"""One benchmark run, driven from here: plan the tasks (bench.run.plan), hand them to an
executor (bench.run.executors), record what comes back, write the reports. `run_bench.py`
turns its arguments into `RunOptions` (bench.run.options).

The driver is the only writer of `records.sqlite`: workers return rows, never write them
(SQLite must not be written from several hosts over a network file system). Before each
task it decides, from the records and the checkpoints' meta.json, what is left to do
(`work_for`); a dry run asks the same question (bench.run.estimate), so the two agree.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from bench.attacks.perturbations import ATTACK, NOISE, PERTURBATIONS, perturbation
from bench.core.environment import resolve_device, retain_freed_memory
from bench.core.files import LOCKS, check_writable, remove_orphans, run_lock
from bench.data.cifar import data_root
from bench.data.datasets import dataset_info
from bench.data.noise import NOISE_GROUPS
from bench.data.splits import (
    data_folders,
    generation_folder,
    images_digest,
    load_noise,
    load_test,
    load_train,
)
from bench.eval.adapters import DefenseInfo
from bench.eval.defenses import STATE_DICT, DefenseSpec, built, check_name
from bench.eval.engine import (
    AuditFailed,
    CellsDone,
    EvalConfig,
    EvalData,
    cell_key,
    cells_todo,
    protocol_cells,
)
from bench.eval.sanity import plain_counterpart
from bench.eval.stability import StabilityDone, Unit, blocks, stage_units, units_todo
from bench.records.aggregate import metric_name, with_pooled_noise
from bench.records.checkpoints import META_FILE, ensemble_digest, read_meta, zoo_checkpoint_dir
from bench.records.store import CELL_COLUMNS, UNKNOWN_DATA, RecordStore, recover, utc_now
from bench.reports.figures import FigureConfig, check_landscape_index
from bench.reports.leaderboard import check_metric
from bench.reports.measured import NoRecordsError
from bench.reports.writer import write_figures, write_reports, write_sanity
from bench.run.estimate import DataSizes, is_present, plan_header, render_plan, training_images
from bench.run.executors import DONE, Crashed, Executor, Raised, make_executor
from bench.run.options import STAGES, RunOptions
from bench.run.plan import (
    DEFENSE,
    ENSEMBLE,
    MEASURE,
    TRAIN,
    Job,
    Task,
    eval_config,
    plan_jobs,
    plan_tasks,
    stability_config,
    task_resources,
    train_config,
)
from bench.run.suites import Suite, suite
from bench.run.work import MODEL_CHECKS, ChecksDone, Trained, Work, checkpoint_files, place_files, relative
from bench.train.loop import TrainConfig, finished_run
from models import UserError, create_model, list_models, model_entry

log = logging.getLogger(__name__)
RESULT_FOLDERS = ("checkpoints", "tables", "figures", "leaderboard", LOCKS)  # what a run writes below the results dir
REPORT_FOLDERS = ("tables", "leaderboard")  # the folders the report stage writes (the figures stage: "figures")
MAX_ATTEMPTS = 3  # a task whose worker dies is tried again, up to this many times in all
__all__ = ["STAGES", "RunOptions", "plan_jobs", "run"]


@dataclass
class Outcome:
    failed_runs: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    cells_run: int = 0
    stability_run: int = 0  # stability units recorded
    errors: list[str] = field(default_factory=list)


def run(options: RunOptions) -> int:
    """Run the stages; returns the exit code (1 when a cell failed its audit or a task
    could not be finished). Every mistake in the options or the environment is found
    before anything is trained."""
    spec = suite(options.suite)
    if not options.dry_run:  # a dry run writes nothing, and says how to recover
        recover(options.results_dir)
    jobs = plan_jobs(spec, options)
    if set(options.stages) <= {"report", "figures"} and not options.dry_run:  # no training, no evaluation
        return _report(options, figures_only="report" not in options.stages)
    device = _device(spec, options)
    for job in jobs:
        eval_config(job, spec, options, device)
    _check_models(jobs)
    check_metric(options.rank_by, planned_metrics(jobs, spec, options) | recorded_metrics(options))
    tasks = plan_tasks(jobs, spec, options, device)
    defenses = resolve_defenses(tasks, options.dry_run)
    header = plan_header(spec, options, device, tasks)
    if not options.dry_run:
        log.info("%s", header)
    _check_training_sizes(tasks, spec, options, device)
    checked = [t for t in tasks if t.kind in (TRAIN, MEASURE)]
    log.info("checking the builds of %d planned checkpoints against the results dir", len(checked))
    trained_on = TrainingDigests(options.data_dir)
    for task in checked:  # a checkpoint of another recipe or model build: one line before any work
        config = train_config(task.job, task.seed, spec, options, device)
        trained_on.compare(finished_run(config, options.results_dir), config)
    if options.dry_run:
        store = RecordStore(options.results_dir, readonly=True)
        check_builds(store, defenses, record=False)
        driver = Driver(options, spec, device, store, dry=True, defenses=defenses)
        sys.stdout.write(render_plan(driver, tasks, options) + "\n")
        return 0
    check_writable(options.results_dir, "results", "--results-dir")
    check_writable(Path(options.results_dir) / LOCKS, "the run's locks", "--results-dir")
    for folder in REPORT_FOLDERS if "report" in options.stages else ():
        check_writable(Path(options.results_dir) / folder, "the report", "--results-dir")  # before the work, not after it
    if "figures" in options.stages:
        check_writable(Path(options.results_dir) / "figures", "the figures", "--results-dir")
    for dataset in sorted({j.dataset for j in jobs}):
        log.info("data: loading the %s test set from %s", dataset, data_root(options.data_dir))
        test = load_test(dataset, options.data_dir)  # missing data: fail before anything is trained
        if {"report", "figures"} & set(options.stages):  # Fig. 2's image: found missing now, not after the work
            check_landscape_index(options.landscape[0], len(test), dataset)
        if "eval" in options.stages:
            folder = generation_folder(dataset, options.data_dir, options.noise_source)
            if folder is not None:  # a read-only data dir is fine otherwise
                check_writable(folder, "generated noise groups", "--data-dir")
                log.info("data: the %s noise groups (generated once into %s)", dataset, folder)
            for group in NOISE_GROUPS:  # generated once, not per worker; every file's type and shape checked now
                load_noise(dataset, group, options.data_dir, options.noise_source, test=test)
    log.info("records: opening %s", Path(options.results_dir) / "records.sqlite")
    store = RecordStore(options.results_dir)  # fails now if the store is corrupt or read-only
    check_builds(store, defenses, record=True)
    remove_orphans(options.results_dir, RESULT_FOLDERS)
    remove_orphans(data_root(options.data_dir), data_folders())
    if device == "cpu":
        retain_freed_memory()
    driver = Driver(options, spec, device, store, defenses=defenses)
    began = time.perf_counter()
    if tasks:
        executor = make_executor(options.executor, _workers(options, len(tasks)), options.ray_address,
                                 task_resources(spec, device), device)  # fmt: skip
        try:
            driver.execute(tasks, executor)
        finally:
            executor.close()
    if "report" in options.stages:
        _report(options, after_work=True)
    elif "figures" in options.stages:
        _report(options, after_work=True, figures_only=True)
    elif "check" in options.stages:  # the gates alone: the sanity table
        _report(options, after_work=True, sanity_only=True)
    outcome = driver.outcome
    log.info(
        "done in %.0f s: %d cells evaluated, %d cached; %d stability units measured, %d cached; %d failed runs; "
        "%d checkpoints missing",
        time.perf_counter() - began,
        outcome.cells_run,
        sum(driver.cached.values()),
        outcome.stability_run,
        sum(driver.stability_cached.values()),
        len(outcome.failed_runs),
        len(outcome.missing),
    )
    for error in outcome.errors:
        log.error("error: %s", error)
    return 1 if outcome.errors else 0


def _check_training_sizes(tasks: list[Task], spec: Suite, options: RunOptions, device: str) -> None:
    """One error line for a --n-train above a data set's training images: the run would
    train on all of them under a tag that names more (n1180591620717411303424)."""
    totals: dict[str, int] = {}  # training_images reads the whole training set: once per data set
    for task in (t for t in tasks if t.kind == TRAIN and "train" in options.stages):
        n_train = train_config(task.job, task.seed, spec, options, device).n_train
        if n_train is None:
            continue
        dataset = task.job.dataset
        total = totals[dataset] = totals.get(dataset) or training_images(dataset, options.data_dir, None)
        if n_train > total:
            if options.n_train is not None:
                asked, fix = f"--n-train {n_train}", "give at most that many, or leave --n-train out to train on all"
            else:  # the registry names more images than the data dir holds
                asked, fix = f"the {spec.name} suite's {n_train}", f"give --n-train {total} or fewer"
            raise UserError(f"{asked} is more than the {total:,} training images of {task.job.dataset}: {fix}")


class TrainingDigests:
    """The digest of the training images a checkpoint would be trained on now, per data
    set and --n-train, to say when a finished checkpoint was trained on other files: its
    cells stand for those (REPORT.md names both digests); the checkpoint is kept, since
    training again is the user's choice (delete its folder)."""

    def __init__(self, data_dir: str | None):
        self.data_dir, self._digests = data_dir, {}

    def compare(self, meta: dict | None, config: TrainConfig) -> None:
        recorded = (meta or {}).get("data", {}).get("sha256")
        if recorded is None or meta.get("status") != "finished" or not is_present(dataset_info(config.dataset), self.data_dir):
            return
        key = (config.dataset, config.n_train)
        if key not in self._digests:
            train = load_train(config.dataset, self.data_dir)
            self._digests[key] = images_digest(train.images[: config.n_train], train.labels[: config.n_train])
        if self._digests[key] != recorded:
            log.warning("%s %s seed %d was trained on images %s…, and the data dir's training images are now %s…: "
                        "its cells stand for the images it was trained on; delete its folder to train it on these",
                        config.tag, config.dataset, config.seed, recorded[:12], self._digests[key][:12])  # fmt: skip


def _workers(options: RunOptions, tasks: int) -> int | None:
    """--workers, never above the tasks there are: an idle worker still loads torch."""
    if options.workers is None or options.workers <= tasks:
        return options.workers
    log.info("--workers %d for %d tasks: %d workers", options.workers, tasks, max(tasks, 1))
    return max(tasks, 1)


@dataclass(frozen=True)
class Resolved:
    """A defense as the driver built it once, before any work: its facts, whether it has
    the zoo's residual blocks (the stability stage's per-block units), and for a dry run
    the module its throughput is probed on."""

    info: DefenseInfo
    blockwise: bool
    model: nn.Module | None = None


def resolve_defenses(tasks: list[Task], dry: bool) -> dict[str, Resolved]:
    """Build every defense task's defense once (a module that does not import, a factory
    that raises, weights that do not fit: one error line now); a dry run downloads nothing."""
    resolved = {}
    for task in (t for t in tasks if t.kind == DEFENSE):
        source = task.job.defense
        if dry and isinstance(source, DefenseSpec):
            source = replace(source, fetch=False)
        log.info("defense %s: building it (%s) to check it before any work", task.run, _described(source))
        try:
            defense = built(source)
        except UserError as err:
            if dry and "never downloads" in str(err):
                raise UserError(f"{err} (a dry run downloads nothing: run without --dry-run to fetch it)") from None
            raise
        info = replace(defense.info, name=task.run)
        check_name(info.name, f"defense {info.name}")
        resolved[task.name] = Resolved(info, bool(blocks(defense.model)), defense.model if dry else None)
    return resolved


def _described(source) -> str:
    if isinstance(source, DefenseSpec):
        return f"{source.source} {source.target}" + (f" with {source.weights}" if source.weights else "")
    return f"{source.info.source}, {source.info.checkpoint}"


def check_builds(store: RecordStore, defenses: dict[str, Resolved], record: bool) -> None:
    """One error line when the records measured a defense's weights built otherwise (another
    factory, architecture or normalisation: its cells would be found cached); with `record`,
    the builds of new defenses are recorded."""
    for resolved in defenses.values():
        info = resolved.info
        before = store.defense_build(info.name, info.dataset, info.checkpoint_sha256)
        if before is not None and before != info.build:
            raise UserError(
                f"defense {info.name} on {info.dataset}: the records measured these weights "
                f"({info.checkpoint_sha256[:12]}) built as {before}, now built as {info.build}: give this build "
                "another --name, or use another --results-dir"
            )
        if record and before is None:
            store.add_defense({"run": info.name, "dataset": info.dataset, "checkpoint_sha256": info.checkpoint_sha256,
                               "source": info.source, "build": info.build, "timestamp": utc_now()})  # fmt: skip


@dataclass
class Running:
    task: Task
    work: Work
    locks: ExitStack
    began: float
    cells: int = 0


class Driver:
    """Decides each task's work, hands it to an executor and records what comes back.
    With `dry`, it only decides: nothing is written and no run is recorded."""

    def __init__(self, options: RunOptions, spec: Suite, device: str, store: RecordStore, dry: bool = False,
                 defenses: dict[str, Resolved] | None = None):  # fmt: skip
        self.options, self.spec, self.device, self.store, self.dry = options, spec, device, store, dry
        self.defenses = defenses or {}  # task name -> the defense as built once, before any work
        self.outcome = Outcome()
        self._data: dict[tuple, EvalData | DataSizes] = {}
        self._contexts: dict[str, dict] = {}  # task name -> the KEY columns of its checkpoint
        self.cached: dict[str, int] = {}  # task name -> its cells found in the records
        self.stability_cached: dict[str, int] = {}  # task name -> its stability units found in the records
        self._host = socket.gethostname()
        self._run_id = uuid.uuid4().hex  # workers' test sets are read again in each run (the files may have changed)
        self._ship = options.ray_address is not None  # workers may not see our results dir
        # CPU results depend on the thread count (reduction order): every worker uses this
        # process's, so that records never depend on the executor; a GPU task its CPUs'
        self._threads = torch.get_num_threads() if device == "cpu" else task_resources(spec, device).cpus

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
            config = train_config(task.job, task.seed, self.spec, options, self.device)
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
        config = eval_config(task.job, self.spec, options, self.device, ensemble)
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
                    stability_config=stability_config(self.spec, options), defense=task.job.defense if defense else None,
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
        checks = set(self.spec.checks)
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
        todo = units_todo(context, units, data, stability_config(self.spec, self.options), config, self.store)
        self.stability_cached[task.name] -= len(todo)
        return todo

    def _transfer_source(self, task: Task) -> tuple[str, int] | None:
        """The finished ResNet of the same architecture, data set, seed and recipe as the
        task's interpolated model (the source of the transfer check), or None."""
        job, seed = task.job, task.seed
        plain = plain_counterpart(job.model)
        if plain is None:
            return None
        tag = train_config(replace(job, model=plain, lambda_init=None), seed, self.spec, self.options, self.device).tag
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
            state.cells += added
            self.outcome.cells_run += added
        elif isinstance(message, AuditFailed):
            self.outcome.errors.append(message.error)
        elif isinstance(message, ChecksDone):
            self.store.add_checks(message.rows)
            log.info("%s", message.summary)
        elif isinstance(message, StabilityDone):
            self.outcome.stability_run += self.store.add_stability(message.rows, message.values) > 0
            log.info("%s", message.summary)
        elif isinstance(message, Trained):
            place_files(self.options.results_dir, message.files)
            meta, config = message.meta, state.work.train
            self._trained(meta, config.tag, config.dataset, config.seed)

    def _trained(self, meta: dict, tag: str, dataset: str, seed: int) -> None:
        self.store.add_run(run_row(meta, tag, dataset, seed))
        if meta["status"] == "failed":
            self.outcome.failed_runs.add(f"{tag} {dataset} seed {seed}")

    def _finish(self, state: Running) -> None:
        work = state.work
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


def _report(options: RunOptions, after_work: bool = False, sanity_only: bool = False, figures_only: bool = False) -> int:
    """Write the reports and figures (or the sanity table, or the figures alone); the
    report stage alone is an error without records, after the other stages (whose runs
    may all have failed) a warning."""
    began = time.perf_counter()
    remove_orphans(options.results_dir, RESULT_FOLDERS)  # a report killed before its renames left .tmp files
    try:
        if sanity_only:
            written = write_sanity(options.results_dir, options.preset, options.steps)
        elif figures_only:
            written = write_figures(options.results_dir, options.preset, options.steps, options.data_dir, _figures(options))
        else:
            written = write_reports(
                options.results_dir, options.preset, options.rank_by, options.steps, options.data_dir, _figures(options)
            )
    except NoRecordsError as err:
        if not after_work:
            raise
        log.warning("no reports: %s", err)
        return 0
    what = "sanity table" if sanity_only else "figures" if figures_only else "reports"
    log.info(
        "%s: %d files under %s in %.1f s; see %s",
        what,
        len(written),
        options.results_dir,
        time.perf_counter() - began,
        written[-1].parent if (sanity_only or figures_only) and written else Path(options.results_dir) / "REPORT.md",
    )
    return 0


def _figures(options: RunOptions) -> FigureConfig:
    index, points, radius = options.landscape
    return FigureConfig(landscape_index=index, landscape_points=points, landscape_radius=radius)


def planned_metrics(jobs: list[Job], spec: Suite, options: RunOptions) -> set[str]:
    """Every metric the jobs' cells give (reports may rank by any of them)."""
    metrics = {"noise"}
    for job in jobs:
        for ensemble in (False, True) if job.ensemble_radii else (False,):
            cells = protocol_cells(eval_config(job, spec, options, "cpu", ensemble))
            metrics |= {metric_name(c.perturbation, c.eps_255) for c in cells}
            metrics |= {metric_name("worst", c.eps_255) for c in cells if perturbation(c.perturbation).kind == ATTACK}
    return metrics


def recorded_metrics(options: RunOptions) -> set[str]:
    cells = RecordStore(options.results_dir, readonly=True).perturbations(options.preset)
    noise = any(perturbation(p).kind == NOISE for p, _ in cells if p in PERTURBATIONS)
    return {metric_name(p, e) for p, e in cells} | ({"noise"} if noise else set())


def _check_models(jobs: list[Job]) -> None:
    """Build each model with an overridden λ initialisation once, on the meta device (no
    memory, no time), so that a range its rule refuses is an error before any training."""
    for name, init in sorted({(j.model, j.lambda_init) for j in jobs if j.lambda_init is not None}):
        try:
            with torch.device("meta"):
                create_model(name, lambda_init=init)
        except UserError as err:
            raise UserError(f"--lambda-init {init[0]:g},{init[1]:g} does not fit {err}") from None


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
    parts.append(f"noise {pct(mine[mine['perturbation'].isin(NOISE_GROUPS) & (mine['severity'] == 0)])}")
    for kind in dict.fromkeys(c.perturbation for c in protocol_cells(config) if perturbation(c.perturbation).kind == ATTACK):
        rows = mine[mine["perturbation"] == kind].sort_values("eps_255")
        if len(rows):
            radii = "/".join(f"{e:g}" for e in rows["eps_255"])
            parts.append(f"{kind}@{radii}/255 " + "/".join(f"{100 * a:.1f}" for a in rows["accuracy"]))
    who = "ensemble of " + str(context["members"]) if context["members"] > 1 else f"seed {context['seed']}"
    return f"{context['run']} {data.dataset} {who}: " + " | ".join(parts)



def _device(spec: Suite, options: RunOptions) -> str:
    """The device the run uses; a suite that needs a GPU refuses a machine without one at
    once (an estimate of its cost here would probe every model first: --dry-run does)."""
    if options.dry_run and options.assume_tflops is not None and options.device != "auto":
        return options.device  # an estimate from FLOPs for a device that need not be here
    device = resolve_device(options.device)
    if spec.needs_gpu and options.device == "auto" and device == "cpu" and not options.dry_run:
        raise UserError(
            f"suite {spec.name!r} needs a GPU and none is visible: `--dry-run --device cpu` estimates "
            "its cost on this CPU; pass --device cpu to run it here anyway"
        )
    return device
