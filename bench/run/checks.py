"""Everything a run checks before any work: the models, the metric to rank by, each
defense built once, checkpoint builds and training images, --n-train, every folder the
run writes and every file it reads. A mistake is one line before anything is trained."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from bench.attacks.gradient import LINF
from bench.attacks.perturbations import ATTACK, NOISE, PERTURBATIONS, metric_name, perturbation
from bench.core.files import check_file_target, check_no_links, check_writable
from bench.core.processes import LOCKS
from bench.data.cifar import data_root
from bench.data.datasets import check_file_places, dataset_info, is_present
from bench.data.noise import NOISE_GROUPS
from bench.data.noise_files import check_released, generation_folder, load_noise, noise_source
from bench.data.splits import TrainingSets, images_digest, load_test
from bench.eval.defenses import DefenseSpec
from bench.eval.identity import check_name
from bench.eval.landscape import check_landscape_index
from bench.eval.model_checks import is_randomized
from bench.eval.protocol import protocol_cells
from bench.eval.stability import blocks
from bench.records.schema import DB_FILE, utc_now
from bench.records.sql import check_store_path
from bench.records.store import RecordStore
from bench.reports.writer import FIGURE_FOLDERS, REPORT_FOLDERS, SANITY_FILES, WRITTEN_FILES
from bench.run.options import RunOptions
from bench.run.plan import DEFENSE, TRAIN, Job, Task
from bench.run.report_cache import MANIFEST
from bench.run.suites import Suite
from bench.run.todo import Resolved
from bench.train.recipes import TrainConfig
from models import UserError, create_model

log = logging.getLogger(__name__)


REPORT_FILES = (*WRITTEN_FILES, MANIFEST)  # the writer's, and the report cache's manifest


def check_no_planted_links(options: RunOptions) -> None:
    """One error line, before anything is written, for a symbolic link planted where the
    run writes (its results dir's files and folders, the data dir's generated groups) that
    points elsewhere: logs, locks, the store and reports stay inside their folders."""
    names = (DB_FILE, f"{DB_FILE}-journal", *REPORT_FILES, *SANITY_FILES)
    check_no_links(options.results_dir, (*REPORT_FOLDERS, *FIGURE_FOLDERS, "checkpoints", LOCKS), names)
    check_no_links(data_root(options.data_dir), ("generated",))


def check_training_sizes(tasks: list[Task], suite: Suite, options: RunOptions, sets: TrainingSets) -> None:
    """One error line for a --n-train above a data set's training images: the run would
    train on all of them under a tag that names more (n1180591620717411303424)."""
    for task in (t for t in tasks if t.kind == TRAIN and "train" in options.stages):
        n_train = task.checkpoint.n_train
        if n_train is None:
            continue
        total = sets.size(task.job.dataset)
        if n_train > total:
            if options.n_train is not None:
                asked, fix = (
                    f"--n-train {n_train}",
                    "give at most that many, or leave --n-train out to train on all",
                )
            else:  # the registry names more images than the data dir holds
                asked, fix = f"the {suite.name} suite's {n_train}", f"give --n-train {total} or fewer"
            raise UserError(
                f"{asked} is more than the {total:,} training images of {task.job.dataset}: {fix}"
            )


class TrainingDigests:
    """The digest of the training images a checkpoint would be trained on now, per data
    set and --n-train, to say when a finished checkpoint was trained on other files: its
    cells stand for those (REPORT.md names both digests); the checkpoint is kept, since
    training again is the user's choice (delete its folder)."""

    def __init__(self, sets: TrainingSets):
        self.sets = sets
        self._digests: dict[tuple[str, int | None], str] = {}  # (data set, --n-train) -> the images' digest

    def compare(self, meta: dict | None, config: TrainConfig) -> None:
        meta = meta or {}
        recorded = meta.get("data", {}).get("sha256")
        if recorded is None or meta.get("status") != "finished" or not self.sets.present(config.dataset):
            return
        key = (config.dataset, config.n_train)
        if key not in self._digests:
            train = self.sets.images(config.dataset)
            self._digests[key] = images_digest(train.images[: config.n_train], train.labels[: config.n_train])
        if self._digests[key] != recorded:
            log.warning(
                "%s %s seed %d was trained on images %s…, and the data dir's training images are now %s…: "
                "its cells stand for the images it was trained on; delete its folder to train it on these",
                config.run_tag,
                config.dataset,
                config.seed,
                recorded[:12],
                self._digests[key][:12],
            )


def resolve_defenses(tasks: list[Task], dry: bool, keep_built: bool = False) -> dict[str, Resolved]:
    """Build every defense task's defense once (a module that does not import, a factory
    that raises, weights that do not fit: one error line now); a dry run downloads nothing.
    `keep_built`: keep the modules, for the estimate's probe (a worker builds its own)."""
    resolved = {}
    for task in (t for t in tasks if t.kind == DEFENSE):
        source = task.job.defense
        assert source is not None  # a defense task's job
        if dry:
            source = replace(source, fetch=False)
        log.info("defense %s: building it (%s) to check it before any work", task.run_tag, _described(source))
        try:
            defense = source.build()
        except UserError as err:
            if dry and "never downloads" in str(err):
                raise UserError(
                    f"{err} (a dry run downloads nothing: run without --dry-run to fetch it)"
                ) from None
            raise
        check_name(task.job.name, f"defense {task.job.name}")
        info = replace(defense.info, name=task.run_tag)
        try:
            randomized = bool(task.eval.randomized_extra) and is_randomized(
                defense.model, dataset_info(info.dataset).input_shape, info.num_classes
            )
        except Exception as err:  # the user's forward, on inputs it had not seen
            raise UserError(
                f"defense {task.run_tag} failed in AutoAttack's determinism check on 4 uniform images "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}): "
                "fix its forward for [0, 1] inputs of the data set's shape"
            ) from None
        if randomized:
            log.info(
                "defense %s: its forward passes differ (AutoAttack's check): AutoAttack's rand version "
                "is measured too (%s)",
                task.run_tag,
                ", ".join(name for name, _ in task.eval.randomized_extra),
            )
        resolved[task.name] = Resolved(
            info, bool(blocks(defense.model)), defense.model if keep_built else None, randomized
        )
    return resolved


def _described(source: DefenseSpec) -> str:
    if source.built is not None:
        return f"{source.built.info.source}, {source.built.info.checkpoint}"
    return f"{source.source} {source.target}" + (f" with {source.weights}" if source.weights else "")


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
            store.add_defense(
                {
                    "run": info.name,
                    "dataset": info.dataset,
                    "checkpoint_sha256": info.checkpoint_sha256,
                    "source": info.source,
                    "build": info.build,
                    "timestamp": utc_now(),
                }
            )


def planned_metrics(tasks: list[Task]) -> set[str]:
    """Every metric the tasks' cells give (reports may rank by any of them)."""
    metrics = {"noise"}
    for config in {t.eval for t in tasks}:
        cells = protocol_cells(config, randomized=True)  # a randomized defense's too
        metrics |= {metric_name(c.perturbation, c.eps_255) for c in cells}
        metrics |= {
            metric_name("worst", c.eps_255)
            for c in cells
            if perturbation(c.perturbation).kind == ATTACK and perturbation(c.perturbation).norm == LINF
        }
    return metrics


def recorded_metrics(options: RunOptions) -> set[str]:
    cells = RecordStore(options.results_dir, readonly=True).perturbations(options.preset)
    noise = any(perturbation(p).kind == NOISE for p, _ in cells if p in PERTURBATIONS)
    return {metric_name(p, e) for p, e in cells} | ({"noise"} if noise else set())


def check_models(jobs: list[Job]) -> None:
    """Build each model with an overridden λ initialisation once, on the meta device (no
    memory, no time), so that a range its rule refuses is an error before any training."""
    for name, init in sorted({(j.name, j.lambda_init) for j in jobs if j.lambda_init is not None}):
        try:
            with torch.device("meta"):
                create_model(name, lambda_init=init)
        except UserError as err:
            raise UserError(f"--lambda-init {init[0]:g},{init[1]:g} does not fit {err}") from None


def check_report_targets(options: RunOptions, dry: bool = False) -> None:
    """Every path the run's report stages will write, checked before any work (a folder
    where REPORT.md or a table goes, a file where tables/ goes): one line, and nothing of
    the run written, not a refusal after the evaluation was recorded. A dry run checks
    the same paths without proving the folders writable (that writes a probe file)."""
    results, stages = Path(options.results_dir), set(options.stages)
    files = (
        (*REPORT_FILES, *SANITY_FILES) if "report" in stages else SANITY_FILES if "check" in stages else ()
    )
    folders = {**REPORT_FOLDERS, **(FIGURE_FOLDERS if options.figures else {})} if "report" in stages else {}
    folders |= FIGURE_FOLDERS if "figures" in stages else {}
    for name in files:
        check_file_target(results / name)
    for name, depth in folders.items():
        folder, what = results / name, "the figures" if name in FIGURE_FOLDERS else "the report"
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # a file where the folder goes
            raise UserError(
                f"cannot write {what} to {folder}: {blocker} is a file, not a folder; move it aside or "
                "choose another --results-dir"
            )
        if not dry:
            check_writable(folder, what, "--results-dir")
        for path in sorted(folder.glob("/".join("*" * (depth + 1)))):
            if path.is_dir():
                raise UserError(
                    f"cannot write {what} to {folder}: {path} is a folder, and only the report's "
                    "files go there; move it aside and run again"
                )


def check_outputs_and_data(options: RunOptions, tasks: list[Task]) -> None:
    """Every folder the run writes and every file it reads, checked before any work: a
    read-only results dir or a missing noise file is one line now, not after hours. What
    writes nothing comes first, so that a refused run leaves the results dir as it was."""
    check_report_targets(options, dry=True)
    check_store_path(Path(options.results_dir) / DB_FILE)
    check_writable(options.results_dir, "results", "--results-dir", create=False)
    check_data(options, tasks)
    check_writable(options.results_dir, "results", "--results-dir")
    check_writable(Path(options.results_dir) / LOCKS, "the run's locks", "--results-dir")
    check_report_targets(options)


def check_data(options: RunOptions, tasks: list[Task], dry: bool = False) -> None:
    """The data checks of the run, which a dry run makes too (writing and downloading
    nothing: a data set not there yet, and noise groups still to generate, are assumed
    as the release has them): each test set's files, shapes and size against --n-test
    and the subsets, Fig. 2's image, and every noise file the tasks read (the released
    corruptions a RobustBench protocol needs: present, or one line naming the archive)."""
    for dataset in sorted({t.job.dataset for t in tasks}):
        configs = {t.eval for t in tasks if t.job.dataset == dataset}
        # a protocol reading corruptions beyond the paper's groups reads every group from the
        # released tar, which is never downloaded unasked: its files are there, or one line
        released_only = tuple(
            dict.fromkeys(
                g for c in configs if set(c.noise_groups) - set(NOISE_GROUPS) for g in c.noise_groups
            )
        )
        info, root = dataset_info(dataset), data_root(options.data_dir)
        if "eval" in options.stages and released_only:
            check_released(dataset, options.data_dir, released_only)
        if dry:
            check_file_places(info, root)
            if not is_present(info, options.data_dir):
                log.info(
                    "data: %s is not in %s yet: the run downloads it; its release's sizes are assumed",
                    dataset,
                    root,
                )
                continue
        log.info("data: loading the %s test set from %s", dataset, root)
        test = load_test(dataset, options.data_dir)  # missing data: fail before anything is trained
        check_test_size(options, dataset, len(test))
        # Fig. 2's image: found missing now, not after the work
        if {"report", "figures"} & set(options.stages):
            check_landscape_index(options.landscape[0], len(test), dataset)
        if "eval" not in options.stages:
            continue
        if dry:  # the released files as the run reads them; generated ones are the run's to make
            for config in configs:
                if (
                    noise_source(dataset, options.data_dir, config.noise_source) == "released"
                    and info.noise_release
                ):
                    for group in config.noise_groups:
                        load_noise(dataset, group, options.data_dir, "released", test=test)
            continue
        for config in configs:
            folder = generation_folder(dataset, options.data_dir, config.noise_source)
            if folder is not None and set(config.noise_groups) & set(
                NOISE_GROUPS
            ):  # a read-only data dir is fine otherwise
                check_writable(folder, "generated noise groups", "--data-dir")
                log.info("data: the %s noise groups (generated once into %s)", dataset, folder)
        for config in configs:  # generated once, not per worker; every file's type and shape checked now
            for group in config.noise_groups:
                load_noise(dataset, group, options.data_dir, config.noise_source, test=test)


def check_test_size(options: RunOptions, dataset: str, images: int) -> None:
    """The test subsets' rule (EvalConfig, bench.run.plan.stability_config) against the test set itself:
    --n-test, or a subset given without it, above the test images there are is refused; a
    suite's own sizes are capped at them."""
    for name in ("n_test", "n_autoattack", "n_stability"):
        value = getattr(options, name)
        if name != "n_test" and options.n_test is not None:
            continue  # checked against --n-test already
        if value is not None and value > images:
            raise UserError(
                f"--{name.replace('_', '-')} {value} is more than the {images:,} test images of {dataset} "
                f"in {data_root(options.data_dir)}: give at most {images:,}"
                + (", or leave --n-test out to test on all" if name == "n_test" else "")
            )
