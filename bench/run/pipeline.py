"""One benchmark run, driven from here: plan the tasks (bench.run.plan), hand them to an
executor (bench.run.executors), record what comes back, write the reports. `run_bench.py`
turns its arguments into `RunOptions` (bench.run.options).

The driver is the only writer of `records.sqlite`: workers return rows, never write them
(SQLite must not be written from several hosts over a network file system). Before each
task it decides, from the records and the checkpoints' meta.json, what is left to do
(bench.run.todo); a dry run asks the same question (bench.run.estimate), so the two agree.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.core.environment import resolve_device, retain_freed_memory
from bench.core.processes import LOCKS, remove_orphans
from bench.data.cifar import data_root
from bench.data.noise_files import data_folders
from bench.data.splits import TrainingSets
from bench.records.checkpoints import check_distinct, zoo_checkpoint_dir
from bench.records.integrity import recover
from bench.records.store import RecordStore, check_results_dir
from bench.reports.leaderboard import check_metric
from bench.reports.measured import NoRecordsError
from bench.reports.writer import write_figures, write_reports, write_sanity
from bench.run import rehearsal, report_cache
from bench.run.checks import (
    TrainingDigests,
    check_builds,
    check_data,
    check_models,
    check_no_planted_links,
    check_outputs_and_data,
    check_report_targets,
    check_training_sizes,
    planned_metrics,
    recorded_metrics,
    resolve_defenses,
)
from bench.run.driver import Driver
from bench.run.estimate import plan_header, render_plan
from bench.run.executors import make_executor
from bench.run.options import STAGES, RunOptions
from bench.run.plan import MEASURE, TRAIN, landscape_config, plan_jobs, plan_tasks, task_resources
from bench.run.rehearsal import rehearsal_options, rehearsal_suite
from bench.run.suites import Suite, find_suite
from bench.run.todo import Resolved, ToDo
from bench.train.loop import finished_run
from models import UserError

log = logging.getLogger(__name__)
# what a run writes below the results dir
RESULT_FOLDERS = ("checkpoints", "tables", "figures", "leaderboard", LOCKS)
__all__ = ["STAGES", "RunOptions", "plan_jobs", "run"]


def run(options: RunOptions) -> int:
    """Run the stages; returns the exit code (1 when a cell failed its audit or a task
    could not be finished). Every mistake in the options or the environment is found
    before anything is trained."""
    check_results_dir(options.results_dir)  # the folders' names, before anything reads or writes them
    data_root(options.data_dir)
    suite = find_suite(options.suite)
    real = replace(options, rehearse=False)  # the run a rehearsal stands for (its last line's estimate)
    if options.rehearse:
        suite = rehearsal_suite(suite)
        options = replace(options, results_dir=rehearsal.results_folder(options.results_dir))
        log.info("rehearsal: its results go to %s, a folder of its own", options.results_dir)
    measures = bool({"train", "eval", "check", "stability"} & set(options.stages))
    rehearsal.check_results_folder(options.results_dir, options.rehearse, measures)
    check_no_planted_links(options)
    if not options.dry_run:  # a dry run writes nothing, and says how to recover
        recover(options.results_dir)
    jobs = plan_jobs(suite, options)
    if options.rehearse:
        options = rehearsal_options(options, jobs, suite)
    if set(options.stages) <= {"report", "figures"} and not options.dry_run:  # no training, no evaluation
        check_metric(options.rank_by, recorded_metrics(options))
        return _report(options, figures_only="report" not in options.stages)
    device = _device(suite, options)
    tasks = plan_tasks(jobs, suite, options, device)  # each task's configs made once, checked as made
    # a rehearsal's jobs are the real run's: their real tasks, planned now, refuse an option before any work
    real_tasks = plan_tasks(jobs, find_suite(real.suite), real, device) if options.rehearse else []
    check_models(jobs)
    check_metric(options.rank_by, planned_metrics(tasks) | recorded_metrics(options))
    defenses = resolve_defenses(tasks, options.dry_run, keep_built=options.dry_run or options.rehearse)
    header = plan_header(suite, options, device, tasks)
    if not options.dry_run:
        log.info("%s", header)
    training_sets = TrainingSets(options.data_dir)  # read once, for the two checks that need them
    check_training_sizes(tasks, suite, options, training_sets)
    checked = [t for t in tasks if t.kind in (TRAIN, MEASURE)]
    log.info("checking the builds of %d planned checkpoints against the results dir", len(checked))
    trained_on = TrainingDigests(training_sets)
    metas = {}
    for task in checked:  # a checkpoint of another recipe or model build: one line before any work
        config = task.checkpoint
        folder = zoo_checkpoint_dir(options.results_dir, config.dataset, config.run_tag, config.seed)
        meta = metas[folder] = finished_run(config, options.results_dir)
        trained_on.compare(meta, config)
    check_distinct({folder: meta for folder, meta in metas.items() if meta is not None})
    del training_sets, trained_on  # the training images are not kept through the work
    if options.dry_run:  # every check of the run's before its work, writing nothing
        check_report_targets(options, dry=True)
        check_data(options, tasks, dry=True)
        store = RecordStore(options.results_dir, readonly=True)
        check_builds(store, defenses, record=False)
        todo = ToDo(options, suite, device, store, dry=True, defenses=defenses)
        sys.stdout.write(render_plan(todo, tasks) + "\n")
        return 0
    check_outputs_and_data(options, tasks)
    if options.rehearse:
        rehearsal.mark_results_folder(options.results_dir, suite, real.suite)
    log.info("records: opening %s", Path(options.results_dir) / "records.sqlite")
    store = RecordStore(options.results_dir)  # fails now if the store is corrupt or read-only
    check_builds(store, defenses, record=True)
    remove_orphans(options.results_dir, RESULT_FOLDERS)
    remove_orphans(data_root(options.data_dir), data_folders())
    if device == "cpu":
        retain_freed_memory()
    driver = Driver(options, suite, device, store, defenses=defenses)
    # before the work: the estimate's view of the rehearsal and of the real run
    estimated = (
        rehearsal.estimates(driver.todo, tasks, _real_todo(real, device, defenses), real_tasks)
        if options.rehearse
        else None
    )
    began = time.perf_counter()
    if tasks:
        executor = make_executor(
            options.executor,
            _workers(options, len(tasks)),
            options.ray_address,
            task_resources(suite, device),
            device,
        )
        try:
            driver.execute(tasks, executor)
        finally:
            executor.close()
    reporting = time.perf_counter()
    if "report" in options.stages:
        _report(options, after_work=True)
    elif "figures" in options.stages:
        _report(options, after_work=True, figures_only=True)
    elif "check" in options.stages:  # the gates alone: the sanity table
        _report(options, after_work=True, sanity_only=True)
    driver.stage_seconds["report"] += time.perf_counter() - reporting
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
    if estimated is not None:
        log.info("%s", rehearsal.last_line(*estimated, driver.stage_seconds))
    return 1 if outcome.errors else 0


def _real_todo(real: RunOptions, device: str, defenses: dict[str, Resolved]) -> ToDo:
    """What the run a rehearsal stands for still needs, in its own results dir (read only),
    with the defenses the rehearsal built."""
    store = RecordStore(real.results_dir, readonly=True)
    return ToDo(real, find_suite(real.suite), device, store, dry=True, defenses=defenses)


def _workers(options: RunOptions, tasks: int) -> int | None:
    """--workers, never above the tasks there are: an idle worker still loads torch."""
    if options.workers is None or options.workers <= tasks:
        return options.workers
    log.info("--workers %d for %d tasks: %d workers", options.workers, tasks, max(tasks, 1))
    return max(tasks, 1)


def _report(
    options: RunOptions, after_work: bool = False, sanity_only: bool = False, figures_only: bool = False
) -> int:
    """Write the reports and figures (or the sanity table, or the figures alone); the
    report stage alone is an error without records, after the other stages (whose runs
    may all have failed) a warning."""
    began = time.perf_counter()
    remove_orphans(options.results_dir, RESULT_FOLDERS)  # a report killed before its renames left .tmp files
    kind = "sanity" if sanity_only else "figures" if figures_only else "report"
    what, shown = {
        "sanity": ("sanity table", "sanity.md"),
        "figures": ("figures", "figures"),
        "report": ("reports", "REPORT.md"),
    }[kind]
    shaped_by = {
        "preset": options.preset,
        "rank_by": options.rank_by,
        "steps": options.steps,
        "landscape": landscape_config(options),
        "draw": options.figures,
    }
    # the records and checkpoints: no data
    inputs = report_cache.inputs_digest(options.results_dir, kind, shaped_by)
    if report_cache.up_to_date(options.results_dir, kind, inputs):  # a cached rerun rewrites nothing
        log.info(
            "%s: up to date (nothing they are made from changed since they were written); see %s",
            what,
            Path(options.results_dir) / shown,
        )
        return 0
    try:
        if sanity_only:
            written = write_sanity(options.results_dir, options.preset, options.steps)
        elif figures_only:
            written = write_figures(
                options.results_dir, options.preset, options.steps, landscape_config(options)
            )
        else:
            written = write_reports(
                options.results_dir,
                options.preset,
                options.rank_by,
                options.steps,
                landscape_config(options),
                draw=options.figures,
            )
    except NoRecordsError as err:
        if not after_work:
            raise
        log.warning("no reports: %s", err)
        return 0
    report_cache.remember(options.results_dir, kind, inputs, written)
    log.info(
        "%s: %d files under %s in %.1f s; see %s",
        what,
        len(written),
        options.results_dir,
        time.perf_counter() - began,
        Path(options.results_dir) / shown,
    )
    return 0


def _device(suite: Suite, options: RunOptions) -> str:
    """The device the run uses; a suite that needs a GPU refuses a machine without one at
    once (an estimate of its cost here would probe every model first: --dry-run does)."""
    if options.dry_run and options.assume_tflops is not None and options.device != "auto":
        return options.device  # an estimate from FLOPs for a device that need not be here
    device = resolve_device(options.device)
    if suite.needs_gpu and options.device == "auto" and device == "cpu" and not options.dry_run:
        raise UserError(
            f"suite {suite.name!r} needs a GPU and none is visible: `--dry-run --device cpu` estimates "
            "its cost on this CPU; pass --device cpu to run it here anyway"
        )
    return device
