"""The driver: turns tasks into work for the executor, skips what the records hold, and
alone writes what workers send back (cells, checks, stability units, runs), holding each
run's lock while its work is in flight; a worker that dies is tried again."""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.attacks.gradient import L2
from bench.attacks.perturbations import ATTACK, perturbation, pooled_noise
from bench.core.processes import LOCKS, run_lock
from bench.eval.engine import AuditFailed, CellsDone, cell_key
from bench.eval.landscape import LandscapeDone
from bench.eval.protocol import Cell, EvalConfig
from bench.eval.stability import StabilityDone
from bench.eval.testdata import EvalData
from bench.records.aggregate import with_pooled_noise
from bench.records.schema import CELL_COLUMNS
from bench.records.store import RecordStore
from bench.run.executors import DONE, Crashed, Executor, Raised
from bench.run.options import RunOptions
from bench.run.plan import ENSEMBLE, TRAIN, Task
from bench.run.suites import Suite
from bench.run.todo import Resolved, ToDo, run_row
from bench.run.work import ChecksDone, Trained, Work, place_files

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
    """Hands each task's work (decided by bench.run.todo) to an executor and records what
    comes back: the only writer of the records."""

    def __init__(
        self,
        options: RunOptions,
        suite: Suite,
        device: str,
        store: RecordStore,
        defenses: dict[str, Resolved] | None = None,
    ):
        self.options, self.store = options, store
        self.outcome = Outcome()
        self._contexts: dict[str, dict] = {}  # task name -> the KEY columns of its checkpoint
        self.cached: dict[str, int] = {}  # task name -> its cells found in the records
        self.stability_cached: dict[str, int] = {}  # task name -> its stability units found in the records
        # seconds per stage of this run: train (its tasks' wall), eval (the cells' own seconds),
        # stability (its units'), check (the rest of a measuring task: checks, loading), report
        self.stage_seconds: dict[str, float] = dict.fromkeys(STAGE_NAMES, 0.0)
        self.todo = ToDo(options, suite, device, store, defenses=defenses)

    # --- what is left to do: bench.run.todo decides, the driver writes what it saw --------

    def _decided(self, task: Task) -> Work | None:
        decision = self.todo.decide(task)
        for row in decision.runs:
            self.store.add_run(row)
        if decision.ensemble is not None:
            self.store.add_ensemble(*decision.ensemble)
        self.outcome.missing.update(decision.missing)
        self.outcome.failed_runs.update(decision.failed)
        if decision.context is not None:
            self._contexts[task.name] = decision.context
            self.cached[task.name] = decision.cached  # a retry asks again
            self.stability_cached[task.name] = decision.stability_cached
        return decision.work

    # --- running ------------------------------------------------------------------------

    def execute(self, tasks: list[Task], executor: Executor) -> None:
        """Run `tasks` on `executor`, each when the tasks it waits for are done, as many
        at once as the executor has slots; a task another process holds (the same run
        started twice on one results dir) waits until nothing else is left."""
        pending, finished, deferred = list(tasks), set[str](), list[Task]()
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
                        log.warning(
                            "%s: %s; trying again (attempt %d of %d)",
                            name,
                            event.reason,
                            attempts[name] + 1,
                            MAX_ATTEMPTS,
                        )
                        pending.insert(0, done.task)
                        continue
                    self.outcome.errors.append(
                        f"{name}: {event.reason}; gave up after {MAX_ATTEMPTS} attempts"
                    )
                else:
                    self._finish(done)
                finished.add(name)
            else:
                self._record(running[name], event)

    def _start(
        self,
        task: Task,
        executor: Executor,
        running: dict[str, Running],
        finished: set[str],
        deferred: list[Task],
        blocking: bool,
    ) -> None:
        locks = ExitStack()
        who = "ensemble" if task.kind == ENSEMBLE else f"seed{task.seed}"
        stage = "train" if task.kind == TRAIN else "eval"
        path = (
            Path(self.options.results_dir) / LOCKS / task.job.dataset / task.run_tag / f"{who}.{stage}.lock"
        )
        if not locks.enter_context(run_lock(path, blocking=blocking)):
            locks.close()
            log.info(
                "%s %s %s %s: busy in another process; coming back to it later",
                task.run_tag,
                task.job.dataset,
                who,
                stage,
            )
            deferred.append(task)
            return
        work = self._decided(task)
        if work is None:
            locks.close()
            finished.add(task.name)
            return
        executor.submit(task.name, work)
        running[task.name] = Running(task, work, locks, time.perf_counter())

    def _record(self, state: Running, message: object) -> None:
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
            # the unit's, on each row
            self._clock(state, "stability", max((row["seconds"] for row in message.rows), default=0.0))
            log.info("%s", message.summary)
        elif isinstance(message, LandscapeDone):
            self.store.add_landscape(message.row, message.loss, message.classes)
            self._clock(state, "stability", message.row["seconds"])
            log.info("%s", message.summary)
        elif isinstance(message, Trained):
            place_files(self.options.results_dir, message.files)
            meta, config = message.meta, state.work.task.checkpoint
            self.store.add_run(run_row(meta, config.run_tag, config.dataset, config.seed))
            if meta["status"] == "failed":
                self.outcome.failed_runs.add(f"{config.run_tag} {config.dataset} seed {config.seed}")

    def _clock(self, state: Running, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] += seconds
        state.measured += seconds

    def _finish(self, state: Running) -> None:
        work = state.work
        elapsed = time.perf_counter() - state.began
        kind = work.task.kind
        self.stage_seconds["train" if kind == TRAIN else "check"] += max(elapsed - state.measured, 0.0)
        if kind == TRAIN or not work.cells:
            return
        data = self.todo.data(state.task)
        asked = self.todo.cells(state.task)
        line = summary_line(self._contexts[state.task.name], work.task.eval, data, self.store, asked)
        cached = len(asked) - len(work.cells)
        log.info(
            "%s (%d cells run, %d cached, %.0f s)",
            line,
            state.cells,
            cached,
            time.perf_counter() - state.began,
        )


def summary_line(
    context: dict, config: EvalConfig, data: EvalData, store: RecordStore, asked: list[Cell]
) -> str:
    """One line: clean, mean noise accuracy, and each attack at each radius, in percent, of
    exactly the cells `asked` (of `config`: no other test size, step count or data source) of
    the checkpoint `context` names."""
    frame = store.cells(context)
    keys = {cell_key(c, data.source(c), config, data.n(c), data.digest(c)) for c in asked}
    mask = [key in keys for key in frame[list(CELL_COLUMNS)].itertuples(index=False, name=None)]
    frame = frame[pd.Series(mask, index=frame.index, dtype=bool)]  # a list would select columns when empty
    # a cell measured again on other data: the last measurement
    frame = frame.sort_values("timestamp", kind="stable").drop_duplicates(
        ["perturbation", "eps_255", "severity"], keep="last"
    )
    cells = with_pooled_noise(frame)

    def pct(rows: pd.DataFrame) -> str:
        return f"{100 * rows['accuracy'].mean():.1f}" if len(rows) else "-"

    parts = [f"clean {pct(cells[cells['perturbation'] == 'clean'])}"]
    files = cells[cells["perturbation"].isin(config.noise_groups) & (cells["severity"] == 0)]
    mean = "noise" if set(config.noise_groups) == set(pooled_noise()) else "corruptions"  # RobustBench's 15
    parts.append(f"{mean} {pct(files)}")
    for kind in dict.fromkeys(c.perturbation for c in asked if perturbation(c.perturbation).kind == ATTACK):
        rows, attack = cells[cells["perturbation"] == kind].sort_values("eps_255"), perturbation(kind)
        if len(rows):
            radii = "/".join(f"{attack.shown_radius(e):g}" for e in rows["eps_255"])
            unit = "" if attack.norm == L2 else "/255"  # an L2 radius in pixel units
            parts.append(f"{kind}@{radii}{unit} " + "/".join(f"{100 * a:.1f}" for a in rows["accuracy"]))
    who = "ensemble of " + str(context["members"]) if context["members"] > 1 else f"seed {context['seed']}"
    return f"{context['run']} {data.dataset} {who}: " + " | ".join(parts)
