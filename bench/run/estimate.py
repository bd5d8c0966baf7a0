"""What a plan will cost: per task, the checkpoints to train and the cells to run (decided
by bench.run.todo, as the driver's are, so a dry run and the run agree on what is cached), their
seconds from each model's throughput, and the wall time on N workers.

Throughput, per model, from the first source that has it:
1. `--assume-tflops T`: the model's FLOPs at T achieved TFLOP/s (for a device not here);
2. recorded: the runs of this model on this device (meta.json's epochs x images / wall
   seconds; the records' seconds of clean, noise and iterative-attack cells);
3. a probe: a few batches of each kind of pass on the device, after a warm-up; the median.
"""

from __future__ import annotations

import heapq
from collections import Counter

import pandas as pd
from tabulate import tabulate

from bench.attacks.perturbations import perturbation
from bench.data.datasets import dataset_info
from bench.data.splits import FIRST, TrainingSets
from bench.eval.landscape import image_count, image_passes
from bench.eval.protocol import cell_groups, group_passes, protocol_cells
from bench.eval.stability import n_images, stage_units
from bench.eval.stability import unit_passes as stability_passes
from bench.records.checkpoints import META_FILE, read_meta, zoo_checkpoint_dir
from bench.run.options import RunOptions
from bench.run.plan import DEFENSE, ENSEMBLE, MEASURE, TRAIN, Task, autoattacks
from bench.run.rates import Rates, defense_rates, forward_flops, model_rates
from bench.run.suites import Suite
from bench.run.todo import ToDo
from bench.train.recipes import recipe_for, training_test_images
from models import model_entry

WORKER_COUNTS = (1, 4, 16)  # the wall times a plan shows, besides the run's own --workers


def estimate(todo: ToDo, tasks: list[Task], rates: dict[str, Rates] | None = None) -> pd.DataFrame:
    """One row per task: what it trains or measures (as `todo`, a dry bench.run.todo.ToDo,
    decides, under its options), and its seconds; `rates` (model -> Rates) is filled with
    the throughput used."""
    options, rates = todo.options, {} if rates is None else rates
    sets = TrainingSets(options.data_dir)  # each training set read once, not once per training task
    rows = []
    zoo = {t.job.name: dataset_info(t.job.dataset).input_shape for t in tasks if t.kind != DEFENSE}
    for model in sorted(zoo, key=lambda m: forward_flops(m, zoo[m])) if options.assume_tflops is None else ():
        # the smallest first: a large model's probe may be replaced by its FLOPs at their rate
        if model not in rates:
            rates[model] = model_rates(model, todo.device, options.results_dir, None, zoo[model])
    for task in tasks:
        if task.job.name not in rates:
            shape = dataset_info(task.job.dataset).input_shape
            if task.kind == DEFENSE:
                resolved = todo.defenses[task.name]
                if resolved.model is None:
                    raise ValueError(
                        f"{task.name}: a defense's rates are probed in a dry run, which keeps it built"
                    )
                rates[task.job.name] = defense_rates(
                    resolved.model, resolved.info.num_classes, todo.device, options.assume_tflops, shape
                )
            else:
                rates[task.job.name] = model_rates(
                    task.job.name, todo.device, options.results_dir, options.assume_tflops, shape
                )
        if task.kind == TRAIN:
            cost = _train_cost(todo, task, rates[task.job.name], sets)
        else:
            cost = (_defense_cost if task.kind == DEFENSE else _measure_cost)(
                todo, task, tasks, rates[task.job.name]
            )
        rows.append({"task": task.name, "model": task.job.name, **cost})
    return pd.DataFrame(
        rows,
        columns=[
            "task",
            "model",
            "to train",
            "cells to run",
            "cached",
            "train",
            "eval",
            "seconds",
            "stability to run",
            "stability cached",
            "stability",
        ],
    )


def _train_cost(todo: ToDo, task: Task, rates: Rates, sets: TrainingSets) -> dict:
    config = task.checkpoint
    meta = _meta(todo, task, task.seed)
    if meta.get("status") in ("finished", "failed"):
        return _cost(0, 0, 0, 0.0, 0.0)
    epochs = recipe_for(
        model_entry(task.job.name).family, task.job.dataset, config.preset, config.length
    ).epochs
    images = sets.per_epoch(task.job.dataset, config.n_train)
    tested = todo.data(task).n_test
    tested = min(tested, training_test_images(config.length) or tested)  # a rehearsal's log tests on a few
    per_epoch = images / rates.train + tested / rates.forward  # and the training log's pass over the test set
    return _cost(1, 0, 0, (epochs - int(meta.get("epochs_done") or 0)) * per_epoch, 0.0)


def _measure_cost(todo: ToDo, task: Task, tasks: list[Task], rates: Rates) -> dict:
    statuses = {s: _meta(todo, task, s).get("status") for s in task.seeds}
    planned = {t.seeds[0] for t in tasks if t.kind == TRAIN and t.job == task.job}
    members = [
        s for s in task.seeds if statuses[s] == "finished" or (statuses[s] != "failed" and s in planned)
    ]
    ensemble, stages = task.kind == ENSEMBLE, todo.options.stages
    if not members or (ensemble and len(members) < 2):
        return _cost(0, 0, 0, 0.0, 0.0)
    if all(statuses[s] == "finished" for s in members):  # what the run will find: the same decision
        work = todo.decide(task).work
        todo_cells = list(work.cells) if work is not None else []
        stage = list(work.stability) if work is not None and "stability" in stages else []
        n_landscapes = len(work.landscapes) if work is not None else 0
    else:  # checkpoints still to come: all of their cells and units
        todo_cells = protocol_cells(task.eval) if "eval" in stages else []
        stage = stage_units(len(members)) if "stability" in stages else []
        n_landscapes = image_count(task.landscape) if "stability" in stages and task.landscape else 0
    return _work_cost(
        todo, task, len(members), todo_cells, stage, len(stage_units(len(members))), rates, n_landscapes
    )


def _defense_cost(todo: ToDo, task: Task, tasks: list[Task], rates: Rates) -> dict:
    work = todo.decide(task).work
    units_all = len(stage_units(1, todo.defenses[task.name].blockwise))
    return _work_cost(
        todo,
        task,
        1,
        list(work.cells) if work else [],
        list(work.stability) if work else [],
        units_all,
        rates,
    )


def _work_cost(
    todo: ToDo,
    task: Task,
    members: int,
    cells: list,
    stage: list,
    units_all: int,
    rates: Rates,
    n_landscapes: int = 0,
) -> dict:
    """The seconds of `cells` on `members` networks, of the stability units `stage` and of
    `n_landscapes` of Fig. 2 (the stability stage's too)."""
    config, data, stages = task.eval, todo.data(task), todo.options.stages
    seconds = 0.0
    for group in cell_groups(cells):
        forward, gradient = group_passes(group, data.n(group[0]), config)
        seconds += members * (forward / rates.forward + gradient / rates.gradient)
    cached = len(todo.cells(task)) - len(cells) if "eval" in stages else 0
    cells_seconds = seconds
    for unit in stage:
        forward, gradient = stability_passes(unit, n_images(data, task.stability), task.stability, config)
        seconds += forward / rates.forward + gradient / rates.gradient
    if n_landscapes and task.landscape is not None:
        forward, gradient = image_passes(task.landscape)
        seconds += n_landscapes * (forward / rates.forward + gradient / rates.gradient)
    stable_cached = units_all - len(stage) if "stability" in stages else 0
    return {
        **_cost(0, len(cells), cached, 0.0, seconds),
        "stability to run": len(stage),
        "stability cached": stable_cached,
        "stability": seconds - cells_seconds,
    }


def _meta(todo: ToDo, task: Task, seed: int) -> dict:
    folder = zoo_checkpoint_dir(todo.options.results_dir, task.job.dataset, task.run_tag, seed)
    return read_meta(folder / META_FILE) if (folder / META_FILE).is_file() else {}


def _cost(to_train: int, todo: int, cached: int, train: float, evaluation: float) -> dict:
    return {
        "to train": to_train,
        "cells to run": todo,
        "cached": cached,
        "train": train,
        "eval": evaluation,
        "seconds": train + evaluation,
        "stability to run": 0,
        "stability cached": 0,
        "stability": 0.0,
    }


def wall_time(tasks: list[Task], seconds: dict[str, float], workers: int) -> float:
    """Seconds until the last task ends when `workers` run the tasks as the driver does:
    each, in plan order, as soon as a worker is free and the tasks it waits for are done."""
    pending, ends, running, now = list(tasks), dict[str, float](), list[tuple[float, str]](), 0.0
    while pending or running:
        for task in [t for t in pending if all(a in ends and ends[a] <= now for a in t.after)]:
            if len(running) >= workers:
                break
            pending.remove(task)
            heapq.heappush(running, (now + seconds[task.name], task.name))
        if not running:  # waiting on a task outside the plan cannot happen: the plan is closed
            break
        now, name = heapq.heappop(running)
        ends[name] = now
    return now


def render_plan(todo: ToDo, tasks: list[Task]) -> str:
    options, rates = todo.options, dict[str, Rates]()
    frame = estimate(todo, tasks, rates)
    jobs = []
    for task in tasks:
        if task.job not in jobs:
            jobs.append(task.job)
    rows = []
    for job in jobs:
        job_rows = frame[[t.job == job for t in tasks]]
        ensemble = next((t for t in tasks if t.job == job and t.kind == ENSEMBLE), None)
        rows.append(
            {
                "run": next(
                    t.run_tag for t in tasks if t.job == job
                ),  # as the checkpoints and records name it
                "dataset": job.dataset,
                "seeds": len({t.seed for t in tasks if t.job == job and t.kind != ENSEMBLE}),
                "ensemble": _ensemble_cells(ensemble) if ensemble else "",
                "to train": int(job_rows["to train"].sum()),
                "cells to run": int(job_rows["cells to run"].sum()),
                "cached": int(job_rows["cached"].sum()),
                "train": duration(job_rows["train"].sum()),
                "eval": duration(job_rows["eval"].sum()),
                "total": duration(job_rows["seconds"].sum()),
            }
        )
    seconds = dict(zip(frame["task"], frame["seconds"], strict=True))
    counts = sorted({*WORKER_COUNTS, *([options.workers] if options.workers else [])})
    walls = ", ".join(
        f"{n} worker{'s' if n > 1 else ''} {duration(wall_time(tasks, seconds, n))}" for n in counts
    )
    totals = frame[
        [
            "to train",
            "cells to run",
            "cached",
            "train",
            "eval",
            "seconds",
            "stability to run",
            "stability cached",
        ]
    ].sum()
    return "\n".join(
        [
            plan_header(todo.suite, options, todo.device, tasks),
            tabulate(pd.DataFrame(rows), headers="keys", tablefmt="github", showindex=False),
            f"total: {int(totals['to train'])} checkpoints to train, {int(totals['cells to run'])} cells to run, "
            f"{int(totals['cached'])} cached; "
            + (
                f"{int(totals['stability to run'])} stability units to run, {int(totals['stability cached'])} cached; "
                if "stability" in options.stages
                else ""
            )
            + f"estimated {duration(totals['train'])} training + "
            f"{duration(totals['eval'])} evaluation = {duration(totals['seconds'])} of work on {todo.device}",
            f"wall time (an estimate): {walls}",
            "throughput: " + "; ".join(f"{m}: {r.source}" for m, r in rates.items()),
        ]
    )


def _ensemble_cells(task: Task) -> str:
    """An ensemble's cells, its large-eps gate's named: an ensemble row can pass its gate
    only if they are measured on the ensemble itself (a member's are never copied)."""
    cells = protocol_cells(task.eval)
    gates: dict[str, list[str]] = {}
    for cell in cells:
        if perturbation(cell.perturbation).chance_from_255 is not None:
            gates.setdefault(cell.perturbation, []).append(f"{cell.eps_255:g}")
    on = {name: task.eval.n_test_of(name) for name in gates}  # the AutoAttack subset (planned so)
    named = "; ".join(
        f"{perturbation(name).label} at {', '.join(radii)}/255 on "
        + ("every test image" if on[name] is None else f"{on[name]} images")
        for name, radii in gates.items()
    )
    return f"{len(cells)} cells" + (f" ({named})" if named else "")


def plan_header(suite: Suite, options: RunOptions, device: str, tasks: list[Task]) -> str:
    """The plan's first line, which the run logs and `--dry-run` prints: suite, preset,
    device, tasks and the test subsets."""
    kinds = Counter(t.kind for t in tasks)
    jobs = {t.job for t in tasks}
    config = tasks[0].eval if tasks else None  # the first task's: a seed's, whose subsets every job shares
    n_test = config.n_test if config else None
    first = "the first " if config is not None and config.subset_rule == FIRST else ""  # RobustBench's rule
    tested = (
        "" if config is None else "; all test images" if n_test is None else f"; {first}{n_test} test images"
    )
    own = dict(suite.subsets)
    if options.n_autoattack is not None:  # the user's own size: never labelled as the suite's, capped
        own |= dict.fromkeys(autoattacks(suite), options.n_autoattack)
    smaller = (
        [f"{name} on {_capped(n, own.get(name, n), n_test)}" for name, n in config.subsets] if config else []
    )
    stability = next((t.stability for t in tasks if t.stability is not None), None)
    if "stability" in options.stages and stability is not None:
        smaller.append(f"stability on {_capped(stability.n, stability.n, n_test)}")
    return (
        f"plan: suite {suite.name} ({suite.description}), preset {options.preset}, device {device}; "
        f"{_count(len(jobs), 'job')}, {_count(len(tasks), 'task')} ({kinds[TRAIN]} to train, {kinds[MEASURE]} to "
        f"evaluate, {_count(kinds[ENSEMBLE], 'ensemble')}"
        + (f", {_count(kinds[DEFENSE], 'defense')}" if kinds[DEFENSE] else "")
        + f"){tested}"
        + "".join(f", {s}" for s in smaller)
    )


def _capped(n: int, suite_n: int, n_test: int | None) -> str:
    """A subset's size as run: a suite's subset above the test images is capped at them
    (one given above them is refused), and the header says so."""
    if n_test is None or max(n, suite_n) <= n_test:
        return f"{n}"
    return f"{n_test} (the suite's {suite_n}, capped at the {n_test} test images)" if n >= n_test else f"{n}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"
