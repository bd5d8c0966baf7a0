"""`--rehearse`: a suite's whole plan (every model at its real depth and width, every data
set, study and stage) shrunk only in data and length, so that a plan that would take
GPU-days shows in minutes whether every part of it works.

What shrinks, and why each size (`REHEARSAL`):
- training: 2 epochs (the schedule's milestone is crossed) on the first 64 training images,
  one step each, and a training log that tests on 32 images;
- seeds: one per job, two where the job's study evaluates an ensemble of its seeds;
- evaluation: 4 class-balanced test images for every perturbation, 2 for AutoAttack and
  PGD-50, 2 for the stability stage, every attack at its full step count;
- Fig. 2: a 5 x 5 grid instead of 21 x 21.
A rehearsal writes to a results folder of its own, `<results dir>/rehearsal/`, marked by
`rehearsal.json` (bench.reports.measured): its reports say so on every page, table and
figure, its suite relaxes the gates that need a trained network, and no measurement ever
shares its folder. Its zoo runs are tagged with their length, `rehearsal`, as a smoke run's
are with `smoke`.

Where the suite's data sets are not in the data dir (no CIFAR download yet), the rehearsal
writes stand-ins of the same image size and class count, in the data set's own file
format, in `<data dir>/rehearsal/` (`prepare_data`); a data set that is there is used as
it is (linked into that folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.core.files import atomic_write
from bench.data.cifar import data_root, write_batch
from bench.data.datasets import DatasetInfo, complete, dataset_info, ensure_folder
from bench.data.noise import SEVERITIES
from bench.data.synthetic import draw
from bench.records.sanity import training_gates
from bench.records.schema import DB_FILE
from bench.reports.measured import REHEARSAL_FILE, rehearsal_of
from bench.run.driver import STAGE_NAMES
from bench.run.estimate import WORKER_COUNTS, duration, estimate, wall_time
from bench.run.options import RunOptions
from bench.run.plan import Job, Task, autoattacks
from bench.run.suites import Suite
from bench.run.todo import ToDo
from models import UserError

log = logging.getLogger(__name__)
STANDIN_FOLDER = "rehearsal"  # below the data dir: the stand-ins, and links to the data sets that are there
RESULTS_FOLDER = "rehearsal"  # below the results dir: the rehearsal's own results


@dataclass(frozen=True)
class RehearsalSizes:
    """How far a rehearsal shrinks a suite. Counts are images unless named otherwise."""

    n_train: int = 64  # training subset: one step of the recipe's batch of 128 per epoch
    n_test: int = 4  # class-balanced test subset of every perturbation
    n_autoattack: int = 2  # AutoAttack's (and PGD-50's) subset
    n_stability: int = 2  # the stability stage's subset
    seeds: int = 2  # the most a job gets: ensembles need two members, every other job gets one
    landscape_points: int = 5  # Fig. 2's grid points per axis
    standin_train: int = 320  # stand-in training images (above n_train: the --n-train check has room)
    standin_test: int = 200  # stand-in test images: two per class of CIFAR-100, and noise groups from them


REHEARSAL = RehearsalSizes()


def rehearsal_suite(suite: Suite, sizes: RehearsalSizes = REHEARSAL) -> Suite:
    """`suite`'s plan at rehearsal size: the same studies, models, data sets, stages,
    perturbations and checks; its length, training subset, test subsets and seeds shrunk."""
    subsets = tuple((name, min(n, sizes.n_autoattack)) for name, n in suite.subsets) or tuple(
        (name, sizes.n_autoattack) for name in autoattacks(suite)
    )
    return replace(
        suite,
        description=f"rehearsal of {suite.name}: its whole plan on {sizes.n_test} test images, 2 epochs of "
        f"{sizes.n_train} training images",
        seeds=suite.seeds[: sizes.seeds],
        length="rehearsal",
        n_train=sizes.n_train,
        n_test=sizes.n_test,
        subsets=subsets,
        n_stability=sizes.n_stability,
        needs_gpu=False,  # minutes on a CPU: the point is to find what breaks before the GPU-days
        rehearsal=True,
        relaxed_gates=tuple(training_gates()),
    )


def results_folder(results_dir: str | os.PathLike) -> str:
    """Where a rehearsal of a run into `results_dir` writes: a folder of its own."""
    return str(Path(results_dir) / RESULTS_FOLDER)


def check_results_folder(results_dir: str | os.PathLike, rehearse: bool, measures: bool) -> None:
    """Measurements and a rehearsal never share a results folder: a rehearsal refuses a
    folder of measurements, and a run that measures refuses a rehearsal's (its reports may
    be made again there)."""
    results = Path(results_dir)
    marked = rehearsal_of(results) is not None
    if rehearse and not marked and (results / DB_FILE).exists():
        raise UserError(
            f"{results} holds measurements, not a rehearsal's records: a rehearsal writes to a folder of "
            f"its own; move {results} away, or rehearse with another --results-dir"
        )
    if not rehearse and marked and measures:
        raise UserError(
            f"{results} is a rehearsal's results folder ({REHEARSAL_FILE}): measurements never share it; "
            "choose another --results-dir, or add --rehearse to rehearse again"
        )


def mark_results_folder(results_dir: str | os.PathLike, suite: Suite, rehearsed: str) -> None:
    """Say in the folder that it is a rehearsal's (of suite `rehearsed`), and which gates its suite relaxes."""
    said = {"suite": rehearsed, "relaxed_gates": list(suite.relaxed_gates)}
    atomic_write(Path(results_dir) / REHEARSAL_FILE, json.dumps(said, indent=1) + "\n")


def missing(dataset: str, root: Path) -> bool:
    """Whether `dataset`'s files are neither in `root` nor to be had without a download
    (extracted, in their archive, or made here like the synthetic set)."""
    info = dataset_info(dataset)
    if not info.files or info.make is not None or complete(info, root / info.folder):
        return False
    return not (info.archive and (root / info.archive).is_file())


def prepare_data(
    datasets: list[str], data_dir: str | os.PathLike | None, dry: bool = False, released: tuple[str, ...] = ()
) -> str | None:
    """The data dir a rehearsal of `datasets` reads: the run's own when every data set is
    there; else `<data dir>/rehearsal` with stand-ins for the missing ones (and for the
    released CIFAR-C files `released` names, which only a download would give: each the
    stand-in test images at every severity) and links to the others (a dry run writes
    nothing: it names the folder and what it would hold)."""
    root = data_root(data_dir)
    absent = [d for d in datasets if missing(d, root)]
    if not absent:
        return None if data_dir is None else str(data_dir)
    folder = root / STANDIN_FOLDER
    for dataset in datasets:
        info = dataset_info(dataset)
        if dataset in absent:
            log.info(
                "rehearsal: %s is not in %s; %s stand-ins of its size and class count (%d training, %d test "
                "images of random patterns, in its file format) in %s",
                info.label,
                root,
                "would use" if dry else "using",
                REHEARSAL.standin_train,
                REHEARSAL.standin_test,
                folder / info.folder,
            )
            target = folder / info.folder
            # a link to files that have since gone: never write through it
            if not dry and target.is_symlink():
                target.unlink()
            if not dry and not complete(info, target):
                write_standin(info, target)
            stand_ins = folder / info.noise_folder
            if not dry and released and not all((stand_ins / f"{g}.npy").is_file() for g in released):
                write_released_standin(stand_ins, target, info, released)
        elif not dry:
            _link(info, root, folder)
    return str(folder)


def write_standin(info: DatasetInfo, folder: Path, sizes: RehearsalSizes = REHEARSAL, seed: int = 0) -> None:
    """Stand-in files for `info`: its batch files (each split's images spread over its
    files), labels balanced over its classes, in the CIFAR python format; the images are
    the synthetic set's patterns (their labels carry no meaning past 10 classes)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", sizes.standin_train), ("test", sizes.standin_test)):
        images, _ = draw(count, rng, info.image_size[0])
        labels = rng.permutation(np.arange(count) % info.num_classes)
        names = [name for name, _ in info.files[split]]
        for name, part in zip(names, np.array_split(np.arange(count), len(names)), strict=True):
            write_batch(folder / name, images[part], labels[part], info.label_key)
    meta_name = "batches.meta" if info.label_key == "labels" else "meta"
    label_names = [f"class {i}" for i in range(info.num_classes)]
    meta = {"label_names": label_names} if info.label_key == "labels" else {"fine_label_names": label_names}
    atomic_write(folder / meta_name, lambda f: pickle.dump(meta, f, protocol=2))


def write_released_standin(folder: Path, batches: Path, info: DatasetInfo, groups: tuple[str, ...]) -> None:
    """Stand-ins of the released CIFAR-C files `groups` for the stand-in test set in
    `batches`: its images at every severity, unchanged (a rehearsal checks that the plan
    runs, not what a corruption does), and labels.npy, in the released layout."""
    test = info.load(info, "test", batches.parent)
    folder.mkdir(parents=True, exist_ok=True)
    tiled = np.tile(test.images, (len(SEVERITIES), 1, 1, 1))
    atomic_write(folder / "labels.npy", lambda f: np.save(f, np.tile(test.labels, len(SEVERITIES))))
    for group in groups:
        atomic_write(folder / f"{group}.npy", lambda f: np.save(f, tiled))


def _link(info: DatasetInfo, root: Path, folder: Path) -> None:
    """Link a data set that is there (extracted first when only its archive is) and its
    released noise groups into the rehearsal's folder, in place of the stand-ins an earlier
    rehearsal wrote there before the data set came."""
    if info.files:
        ensure_folder(info, root)
    for name in (info.folder, info.noise_folder):
        source, target = root / name, folder / name
        if not name or not source.exists() or (target.is_symlink() and target.resolve() == source.resolve()):
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # stand-ins: the real files are here now
        target.unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve(), target_is_directory=True)


def rehearsal_options(options: RunOptions, jobs: list[Job], suite: Suite) -> RunOptions:
    """The run's options for its rehearsal: the data dir of `prepare_data` and Fig. 2's
    smaller grid (the suite, bench.run.rehearsal.rehearsal_suite, holds the rest)."""
    datasets = list(dict.fromkeys(job.dataset for job in jobs))
    index, points, radius = options.landscape
    released = suite.noise_groups if suite.released_noise else ()
    return replace(
        options,
        data_dir=prepare_data(datasets, options.data_dir, dry=options.dry_run, released=released),
        landscape=(index, min(points, REHEARSAL.landscape_points), radius),
    )


@dataclass(frozen=True)
class StageSeconds:
    """Seconds of work per stage (NaN: not estimated), and the wall time on 1, 4 and 16 workers."""

    seconds: dict[str, float]
    walls: dict[int, float]

    def total(self) -> float:
        return sum(v for v in self.seconds.values() if v == v)


def stage_estimate(todo: ToDo, tasks: list[Task], rates: dict) -> StageSeconds:
    """The estimate of `tasks` per stage (bench.run.estimate, the dry run's own numbers)."""
    frame = estimate(todo, tasks, rates)
    seconds = {
        "train": frame["train"].sum(),
        "eval": (frame["eval"] - frame["stability"]).sum(),
        "stability": frame["stability"].sum(),
        "check": math.nan,
        "report": math.nan,
    }
    per_task = dict(zip(frame["task"], frame["seconds"], strict=True))
    return StageSeconds(seconds, {n: wall_time(tasks, per_task, n) for n in WORKER_COUNTS})


def estimates(
    todo: ToDo, tasks: list[Task], real: ToDo, real_tasks: list[Task]
) -> tuple[StageSeconds, StageSeconds]:
    """Before any work, on one throughput: the estimate of the rehearsal's own tasks (a
    dry ToDo on its store and run), and that of the run it stands for (`real`: the real
    suite's tasks of the same jobs, on the real results dir: nothing of a rehearsal is
    cached for it)."""
    dry = ToDo(
        todo.options,
        todo.suite,
        todo.device,
        todo.store,
        dry=True,
        defenses=todo.defenses,
        run_id=todo.base["run_id"],
    )
    rates: dict = {}  # probed once, for both
    return stage_estimate(dry, tasks, rates), stage_estimate(real, real_tasks, rates)


def last_line(rehearsed: StageSeconds, real: StageSeconds, measured: dict[str, float]) -> str:
    """What the rehearsal measured per stage next to what the estimate said for the same
    work, then the real run's estimate: a bad estimate shows before the GPU-days."""
    parts = []
    for stage in STAGE_NAMES:
        guess = rehearsed.seconds[stage]
        said = (
            "not estimated"
            if guess != guess
            else f"estimated {duration(guess)}" + (f", x{measured[stage] / guess:.1f}" if guess > 0 else "")
        )
        parts.append(f"{stage} {duration(measured[stage])} ({said})")
    real_parts = ", ".join(f"{s} {duration(real.seconds[s])}" for s in ("train", "eval", "stability"))
    walls = ", ".join(f"{n} worker{'s' if n > 1 else ''} {duration(w)}" for n, w in real.walls.items())
    return (
        f"rehearsal measured: {'; '.join(parts)}. The real run: estimated {duration(real.total())} of work "
        f"({real_parts}; checks and reports not estimated), wall time {walls}"
    )
