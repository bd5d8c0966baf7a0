"""One benchmark run: plan jobs from a suite, train the missing checkpoints, evaluate every
missing cell, write the reports. `run_bench.py` turns its arguments into `RunOptions`.

A job is one model (with one λ initialisation) on one data set: its seeds are trained and
evaluated one by one, then, where the suite asks for it, the ensemble of its seeds.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from tabulate import tabulate
from torch import nn
from torch.nn import functional as F

from models import UserError, create_model, resolve_models
from models.adapters import (
    META_FILE,
    Defense,
    ensemble_defense,
    ensemble_digest,
    read_meta,
    zoo_checkpoint_dir,
    zoo_defense,
)
from models.checkpoints import check_writable, remove_orphans, run_lock

from . import sanity
from .aggregate import metric_name, with_pooled_noise
from .cifar import data_root
from .data import cell_sources, dataset_spec, generation_folder, load_test
from .environment import resolve_device, retain_freed_memory
from .evaluate import (
    Cell,
    EvalConfig,
    EvalData,
    Subject,
    cell_context,
    cell_key,
    evaluate,
    prepared,
    protocol_cells,
    unit_passes,
    units,
)
from .figures import FigureConfig
from .noise import NOISE_GROUPS
from .perturbations import ATTACK, NOISE, PERTURBATIONS, perturbation
from .recipes import recipe_for
from .records import CELL_COLUMNS, ENSEMBLE_SEED, RecordStore, check_results_dir, utc_now
from .report import NoRecordsError, check_metric, write_figures, write_reports, write_sanity
from .sanity import plain_counterpart
from .suites import Study, Suite, suite
from .train import TrainConfig, train

log = logging.getLogger(__name__)
STAGES = ("train", "eval", "check", "report", "figures")
SEED_LIMIT = 2**32  # seeds are 32-bit: every generator and the records take them as they are


@dataclass(frozen=True)
class RunOptions:
    """What to run; None means "as the suite says"."""

    suite: str = "smoke"
    stages: tuple[str, ...] = STAGES[:4]  # the report draws the figures too
    models: str | None = None  # names, globs, groups
    datasets: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    preset: str = "paper"
    length: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    lambda_init: tuple[float, float] | None = None  # replaces every study's initialisations
    radii: tuple[float, ...] | None = None  # in 1/255; replaces every study's radii
    steps: int = 20
    noise_source: str = "auto"
    batch_size: int | None = None
    device: str = "auto"  # auto: a GPU when there is one
    bf16: bool = False
    channels_last: bool = True
    compile: bool = False
    results_dir: str = "results"
    data_dir: str | None = None
    progress: bool = True
    dry_run: bool = False
    rank_by: str = "pgd@2"  # the leaderboard's order
    landscape: tuple[int, int, float] = (0, 21, 8.0)  # Fig. 2: test image, grid points, radius in 1/255

    def __post_init__(self):
        """Every value mistake is one error line here, before anything is loaded or run."""
        unknown = [s for s in self.stages if s not in STAGES]
        if not self.stages or unknown:
            raise UserError(f"unknown stage {(unknown or [''])[0]!r} in --stage; choose from {', '.join(STAGES)}")
        if self.seeds is not None:
            if not self.seeds or not all(isinstance(s, int) and 0 <= s < SEED_LIMIT for s in self.seeds):
                raise UserError(f"--seeds takes integers in [0, 2**32), got {list(self.seeds)}")
            twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            if twice:
                raise UserError(f"--seeds repeats {', '.join(map(str, twice))}: give each seed once")
        if self.lambda_init is not None:
            low, high = self.lambda_init
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise UserError(f"--lambda-init a,b needs finite numbers with a <= b, got {low:g},{high:g}")
        for name in ("n_train", "n_test", "batch_size", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise UserError(
                f"device {self.device!r} is not usable here (the benchmark runs on cpu, cuda, cuda:N or mps); "
                "use --device cpu"
            )
        check_results_dir(self.results_dir)
        data_root(self.data_dir)
        check_metric(self.rank_by)
        index, points, radius = self.landscape
        if index < 0 or points < 2 or not (math.isfinite(radius) and radius > 0):
            raise UserError(
                f"the landscape needs --landscape-index >= 0, --landscape-points >= 2 and a positive finite "
                f"--landscape-radius, got {index}, {points}, {radius:g}"
            )


@dataclass(frozen=True)
class Job:
    model: str
    dataset: str
    lambda_init: tuple[float, float] | None
    radii: tuple[float, ...]
    ensemble_radii: tuple[float, ...] = ()


@dataclass
class Outcome:
    failed_runs: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    cells_run: int = 0
    cells_cached: int = 0
    errors: list[str] = field(default_factory=list)


def run(options: RunOptions) -> int:
    """Run the stages; returns the exit code (1 when a cell failed its audit). Every
    mistake in the options or the environment is found before anything is trained."""
    spec = suite(options.suite)
    jobs = plan_jobs(spec, options)
    if set(options.stages) <= {"report", "figures"} and not options.dry_run:  # no training, no evaluation
        return _report(options, figures_only="report" not in options.stages)
    device = _device(spec, options, jobs)
    for job in jobs:
        _eval_config(job, spec, options, device)
    _check_models(jobs)
    check_metric(options.rank_by, planned_metrics(jobs, spec, options) | recorded_metrics(options))
    if options.dry_run:
        sys.stdout.write(render_plan(jobs, spec, options, device) + "\n")
        return 0
    check_writable(options.results_dir, "results", "--results-dir")
    for dataset in sorted({j.dataset for j in jobs}):
        load_test(dataset, options.data_dir)  # missing data: fail before anything is trained
        folder = generation_folder(dataset, options.data_dir, options.noise_source)
        if "eval" in options.stages and folder is not None:  # a read-only data dir is fine otherwise
            check_writable(folder, "generated noise groups", "--data-dir")
    store = RecordStore(options.results_dir)  # fails now if the store is corrupt or read-only
    for root in (options.results_dir, data_root(options.data_dir)):
        remove_orphans(root)
    if device == "cpu":
        retain_freed_memory()
    outcome = Outcome()
    began = time.perf_counter()
    if "train" in options.stages:
        _train_all(jobs, spec, options, device, store, outcome)
    if {"eval", "check"} & set(options.stages):
        _measure_all(jobs, spec, options, device, store, outcome)
    if "report" in options.stages:
        _report(options, after_work=True)
    elif "figures" in options.stages:
        _report(options, after_work=True, figures_only=True)
    elif "check" in options.stages:  # the gates alone: the sanity table
        _report(options, after_work=True, sanity_only=True)
    log.info(
        "done in %.0f s: %d cells evaluated, %d cached; %d failed runs; %d checkpoints missing",
        time.perf_counter() - began,
        outcome.cells_run,
        outcome.cells_cached,
        len(outcome.failed_runs),
        len(outcome.missing),
    )
    for error in outcome.errors:
        log.error("error: %s", error)
    return 1 if outcome.errors else 0


def _report(options: RunOptions, after_work: bool = False, sanity_only: bool = False, figures_only: bool = False) -> int:
    """Write the reports and figures (or the sanity table, or the figures alone); the
    report stage alone is an error without records, after the other stages (whose runs
    may all have failed) a warning."""
    began = time.perf_counter()
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
            cells = protocol_cells(_eval_config(job, spec, options, "cpu", ensemble))
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


def plan_jobs(spec: Suite, options: RunOptions) -> list[Job]:
    """The suite's jobs, restricted to `options.models` when given (models in none of its
    studies get the first study's protocol), with the options' overrides applied."""
    wanted = resolve_models(options.models) if options.models is not None else None
    jobs: dict[tuple, Job] = {}
    covered: set[str] = set()
    for study in spec.studies:
        names = resolve_models(study.models)
        names = [n for n in names if wanted is None or n in wanted]
        covered.update(names)
        _add_jobs(jobs, names, study, options)
    if wanted:
        _add_jobs(jobs, [n for n in wanted if n not in covered], spec.studies[0], options)
    for dataset in {j.dataset for j in jobs.values()}:
        dataset_spec(dataset)
    return list(jobs.values())


def _add_jobs(jobs: dict[tuple, Job], names: list[str], study: Study, options: RunOptions) -> None:
    inits = (options.lambda_init,) if options.lambda_init else study.lambda_inits
    radii = options.radii or study.radii
    ensemble = (options.radii or study.ensemble_radii) if study.ensemble_radii else ()
    for name in names:
        for dataset in options.datasets or study.datasets:
            for init in inits:
                key = (name, dataset, init)
                old = jobs.get(key, Job(name, dataset, init, ()))
                jobs[key] = Job(
                    name,
                    dataset,
                    init,
                    tuple(sorted({*old.radii, *radii})),
                    tuple(sorted({*old.ensemble_radii, *ensemble})),
                )


def _train_config(job: Job, seed: int, spec: Suite, options: RunOptions, device: str) -> TrainConfig:
    return TrainConfig(
        job.model,
        job.dataset,
        seed,
        options.preset,
        options.length or spec.length,
        job.lambda_init,
        options.n_train if options.n_train is not None else spec.n_train,
        device,
        options.channels_last,
        options.bf16,
        options.compile,
    )


def _seeds(spec: Suite, options: RunOptions) -> tuple[int, ...]:
    return options.seeds if options.seeds is not None else spec.seeds


def _eval_config(
    job: Job, spec: Suite, options: RunOptions, device: str, ensemble: bool = False
) -> EvalConfig:
    attack_radii = job.ensemble_radii if ensemble else job.radii
    extra = []  # the suite's further perturbations; ensembles only at their attack radii
    for name, radii in spec.extra:
        radii = attack_radii if radii is None else tuple(e for e in radii if not ensemble or e in attack_radii)
        extra += [(name, radii)] if radii else []
    return EvalConfig(
        preset=options.preset,
        eps_255=job.radii,
        iterative_eps_255=attack_radii if ensemble else None,
        steps=options.steps,
        n_test=options.n_test if options.n_test is not None else spec.n_test,
        noise_source=options.noise_source,
        batch_size=options.batch_size,
        device=device,
        extra=tuple(extra),
        subsets=spec.subsets,
    )


def _with_locks(tasks: list[tuple[Path, Callable[[], None]]]) -> None:
    """Run each (lock file, task) under its lock. A task whose lock another process holds
    (the same run started twice on one results dir) waits until the others are done; by
    then that process has usually done it, and the task finds its work finished."""
    deferred = []
    for lock, task in tasks:
        with run_lock(lock, blocking=False) as held:
            if held:
                task()
        if not held:
            what = f"{lock.parent.name} {lock.parent.parent.name} {lock.stem.replace('.', ' ')}"
            log.info("%s: busy in another process; coming back to it later", what)
            deferred.append((lock, task))
    for lock, task in deferred:
        with run_lock(lock):
            task()


def _lock(options: RunOptions, dataset: str, run: str, who: str, stage: str) -> Path:
    return Path(options.results_dir) / ".locks" / dataset / run / f"{who}.{stage}.lock"


def _train_all(
    jobs: list[Job], spec: Suite, options: RunOptions, device: str, store: RecordStore, outcome: Outcome
) -> None:
    def task(config: TrainConfig) -> Callable[[], None]:
        def train_one() -> None:
            meta = train(config, options.results_dir, options.data_dir, options.progress)
            store.add_run(_run_row(meta, config.tag, config.dataset, config.seed))
            if meta["status"] == "failed":
                outcome.failed_runs.add(f"{meta['tag']} {config.dataset} seed {config.seed}")

        return train_one

    configs = [_train_config(job, seed, spec, options, device) for job in jobs for seed in _seeds(spec, options)]
    _with_locks([(_lock(options, c.dataset, c.tag, f"seed{c.seed}", "train"), task(c)) for c in configs])


def _measure_all(
    jobs, spec: Suite, options: RunOptions, device: str, store: RecordStore, outcome: Outcome
) -> None:
    """The eval and check stages: each trained seed of each job, then their ensemble."""
    data: dict[tuple, EvalData] = {}
    for job in jobs:
        config = _eval_config(job, spec, options, device)
        key = (job.dataset, config.n_test, config.noise_source)
        data.setdefault(key, EvalData(job.dataset, options.data_dir, config))
        members: dict[int, Defense] = {}
        tasks = []
        for seed in _seeds(spec, options):
            tag = _train_config(job, seed, spec, options, device).tag
            defense = _trained_defense(tag, job.dataset, seed, options, store, outcome)
            if defense is None:
                continue
            members[seed] = defense
            subject = Subject(defense, job.model, tag, seed, 1, _lambda_init(defense.model))
            plain = _plain_defense(job, seed, spec, options, device) if "transfer" in spec.checks else None
            lock = _lock(options, job.dataset, tag, f"seed{seed}", "eval")
            tasks.append((lock, _measurement(subject, config, store, data[key], options, outcome, spec, plain)))
        if job.ensemble_radii and len(members) >= 2:
            ensemble = ensemble_defense(list(members.values()), name=tag)
            digest = ensemble.info.checkpoint_sha256
            store.add_ensemble(digest, tag, job.dataset, {s: d.info.checkpoint_sha256 for s, d in members.items()})
            first = next(iter(members.values()))
            subject = Subject(ensemble, job.model, tag, ENSEMBLE_SEED, len(members), _lambda_init(first.model))
            ens_config = _eval_config(job, spec, options, device, ensemble=True)
            lock = _lock(options, job.dataset, tag, "ensemble", "eval")
            tasks.append((lock, _measurement(subject, ens_config, store, data[key], options, outcome, spec, None)))
        _with_locks(tasks)


def _plain_defense(job: Job, seed: int, spec: Suite, options: RunOptions, device: str) -> Defense | None:
    """The finished ResNet of the same architecture, data set, seed and recipe as `job`'s
    interpolated model (the source of the transfer check), or None."""
    plain = plain_counterpart(job.model)
    if plain is None:
        return None
    tag = _train_config(replace(job, model=plain, lambda_init=None), seed, spec, options, device).tag
    meta = zoo_checkpoint_dir(options.results_dir, job.dataset, tag, seed) / META_FILE
    if not meta.is_file() or read_meta(meta).get("status") != "finished":
        log.info("%s %s seed %d: no finished %s to transfer from; transfer check skipped", job.model, job.dataset, seed, tag)
        return None
    return zoo_defense(tag, job.dataset, seed, options.results_dir)


def _trained_defense(tag, dataset, seed, options, store, outcome) -> Defense | None:
    folder = zoo_checkpoint_dir(options.results_dir, dataset, tag, seed)
    if not (folder / META_FILE).is_file():
        log.warning(
            "%s %s seed %d: no checkpoint in %s (run the train stage); skipped", tag, dataset, seed, folder
        )
        outcome.missing.add(f"{tag} {dataset} seed {seed}")
        return None
    meta = read_meta(folder / META_FILE)
    status = meta.get("status", "finished")
    if status not in ("finished", "failed"):  # "running": its training was interrupted
        log.warning("%s %s seed %d: run is %s; not evaluated", tag, dataset, seed, status)
        outcome.missing.add(f"{tag} {dataset} seed {seed}")
        return None
    store.add_run(_run_row(meta, tag, dataset, seed))
    if status == "failed":
        log.warning(
            "%s %s seed %d: run failed (%s); not evaluated", tag, dataset, seed, meta.get("reason", "")
        )
        outcome.failed_runs.add(f"{tag} {dataset} seed {seed}")
        return None
    return zoo_defense(tag, dataset, seed, options.results_dir)


def _run_row(meta: dict, tag: str, dataset: str, seed: int) -> dict:
    """The records' row of a training run, from its meta.json."""
    with torch.device("meta"):  # only the λ initialisation is read: no weights are made
        model = create_model(meta["model"], **meta["model_kwargs"])
    low, high = _lambda_init(model) or (None, None)
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


def _measurement(
    subject: Subject, config: EvalConfig, store: RecordStore, data: EvalData, options, outcome, spec, plain
) -> Callable[[], None]:
    def measure() -> None:
        began = time.perf_counter()
        if "eval" in options.stages:
            ran, cached, errors = evaluate(subject, config, store, data, options.progress)
            outcome.cells_run += ran
            outcome.cells_cached += cached
            outcome.errors += errors
            log.info(
                "%s (%d cells run, %d cached, %.0f s)",
                summary_line(subject, config, data, store),
                ran,
                cached,
                time.perf_counter() - began,
            )
        if "check" in options.stages:
            _check(subject, config, store, data, spec.checks, plain)

    return measure


def _check(subject: Subject, config: EvalConfig, store: RecordStore, data: EvalData, checks, plain) -> None:
    """The checkpoint checks of bench.sanity not yet recorded for `subject`."""
    done = store.recorded_checks(cell_context(subject, config))
    wanted = {"gradients", "model"} & set(checks)
    model = prepared(subject.defense.model, config)
    x, y = sanity.batch(data, device=config.device)
    results = []
    if wanted and not {"zero-gradients", "randomized"} <= done:
        results += sanity.model_checks(model, x, y, subject.defense.info.num_classes)
    if plain is not None and "transfer" not in done:
        source = prepared(plain.model, config)
        seed = subject.seed + 7919  # any seed: the same random starts for both attacks
        results.append(sanity.transfer_check(model, source, x, y, config, 2.0, seed))
    if results:
        store.add_checks(sanity.check_rows(subject, results, utc_now()))
        failed = [c for c, value, limit, _ in results if value > limit]
        who = f"ensemble of {subject.members}" if subject.members > 1 else f"seed {subject.seed}"
        log.info("%s %s %s: %d checks, %s", subject.run, data.dataset, who, len(results),
                 "failed: " + ", ".join(failed) if failed else "all pass")  # fmt: skip


def summary_line(subject: Subject, config: EvalConfig, data: EvalData, store: RecordStore) -> str:
    """One line: clean, mean noise accuracy, and each attack at each radius, in percent, of
    exactly the cells `config` asks for (no other test size, step count or data source)."""
    frame = store.cells(cell_context(subject, config))
    asked = {cell_key(c, data.source(c), config, data.n(c)) for c in protocol_cells(config)}
    frame = frame[[key in asked for key in frame[list(CELL_COLUMNS)].itertuples(index=False, name=None)]]
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
    who = "ensemble of " + str(subject.members) if subject.members > 1 else f"seed {subject.seed}"
    return f"{subject.run} {data.dataset} {who}: " + " | ".join(parts)


def _lambda_init(model: nn.Module) -> tuple[float, float] | None:
    info = getattr(model, "info", None)
    if info is None or info.rule in ("residual", "plain"):
        return None
    return tuple(info.lambda_init)


# --- device choice, plans and estimates -------------------------------------------------------


def _device(spec: Suite, options: RunOptions, jobs: list[Job]) -> str:
    device = resolve_device(options.device)
    if spec.needs_gpu and options.device == "auto" and device == "cpu" and not options.dry_run:
        hours = estimate(jobs, spec, options, "cpu")["total"].sum() / 3600
        raise UserError(
            f"suite {spec.name!r} needs a GPU and none is visible; on this CPU it would take about "
            f"{hours:,.0f} h (see --dry-run): pass --device cpu to run it here anyway"
        )
    return device


def estimate(jobs: list[Job], spec: Suite, options: RunOptions, device: str) -> pd.DataFrame:
    """Per job: checkpoints to train, cells to run and cached, and the seconds they should
    take, from a quick throughput probe of each model on `device`."""
    rates: dict[str, tuple[float, float, float]] = {}  # the head's size hardly matters: per model
    store = RecordStore(options.results_dir, readonly=True)
    rows = []
    for job in jobs:
        if job.model not in rates:
            rates[job.model] = probe(job.model, device)
        rows.append(_job_estimate(job, spec, options, device, store, *rates[job.model]))
    return pd.DataFrame(rows)


def _job_estimate(job, spec, options, device, store, train_rate, forward_rate, gradient_rate) -> dict:
    n_train_all, n_test_all = dataset_spec(job.dataset).sizes
    seeds = _seeds(spec, options)
    config = _eval_config(job, spec, options, device)
    to_train, todo, cached, seconds_train, seconds_eval, digests = 0, 0, 0, 0.0, 0.0, []
    for seed in seeds:
        train_config = _train_config(job, seed, spec, options, device)
        folder = zoo_checkpoint_dir(options.results_dir, job.dataset, train_config.tag, seed)
        meta = read_meta(folder / META_FILE) if (folder / META_FILE).is_file() else {}
        if meta.get("status") == "failed":
            continue
        if meta.get("status") != "finished":
            with torch.device("meta"):
                family = create_model(job.model).info.family
            epochs = recipe_for(family, job.dataset, options.preset, train_config.length).epochs
            to_train += 1
            images = min(train_config.n_train or n_train_all, n_train_all)
            seconds_train += (epochs - int(meta.get("epochs_done") or 0)) * images / train_rate
        digests.append(meta.get("sha256"))
        cells = _cells_todo(job, train_config.tag, seed, 1, meta.get("sha256"), config, options, n_test_all, store)
        todo, cached = todo + len(cells), cached + len(protocol_cells(config)) - len(cells)
        seconds_eval += _eval_seconds(cells, config, n_test_all, forward_rate, gradient_rate)
    if job.ensemble_radii and len(digests) >= 2:
        ens_config = _eval_config(job, spec, options, device, ensemble=True)
        digest = ensemble_digest(digests) if all(digests) else None  # known once all members are
        cells = _cells_todo(
            job, train_config.tag, ENSEMBLE_SEED, len(digests), digest, ens_config, options, n_test_all, store
        )
        todo, cached = todo + len(cells), cached + len(protocol_cells(ens_config)) - len(cells)
        seconds_eval += len(digests) * _eval_seconds(cells, ens_config, n_test_all, forward_rate, gradient_rate)
    init = f" λ~U[{job.lambda_init[0]:g}, {job.lambda_init[1]:g}]" if job.lambda_init else ""
    return {
        "model": job.model + init,
        "dataset": job.dataset,
        "seeds": len(seeds),
        "ensemble": "yes" if job.ensemble_radii else "",
        "to train": to_train,
        "cells to run": todo,
        "cached": cached,
        "train": seconds_train,
        "eval": seconds_eval,
        "total": seconds_train + seconds_eval,
    }


def _cells_todo(
    job: Job, run: str, seed: int, members: int, digest, config: EvalConfig, options, n_all: int, store: RecordStore
) -> list:
    """The protocol cells of a checkpoint (digest None: not trained yet) not in the records."""
    cells = protocol_cells(config)
    if digest is None:
        return cells
    context = {"run": run, "dataset": job.dataset, "seed": seed, "members": members}
    done = store.done({**context, "preset": config.preset, "checkpoint_sha256": digest})
    clean, noisy = cell_sources(job.dataset, options.data_dir, config.noise_source)  # as EvalData will
    return [
        c
        for c in cells
        if cell_key(c, noisy if perturbation(c.perturbation).kind == NOISE else clean, config, _n(config, c, n_all))
        not in done
    ]


def _n(config: EvalConfig, cell: Cell, n_all: int) -> int:
    """How many test images `cell` will be measured on (as EvalData.n says, without data)."""
    return min(config.n_test_of(cell.perturbation) or n_all, n_all)


def _eval_seconds(cells, config: EvalConfig, n_all: int, forward_rate: float, gradient_rate: float) -> float:
    total = 0.0
    for unit in units(cells):
        forward, gradient = unit_passes(unit, _n(config, unit[0], n_all), config)
        total += forward / forward_rate + gradient / gradient_rate
    return total


def probe(model_name: str, device: str, batch: int = 16, repeats: int = 2) -> tuple[float, float, float]:
    """Images/s of a training step, a forward pass and an input-gradient pass of an
    untrained `model_name` on `device`: one warm-up batch, then the best of `repeats`."""
    model = create_model(model_name).to(device, memory_format=torch.channels_last)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def rate(step) -> float:
        best = float("inf")
        for i in range(repeats + 1):
            began = time.perf_counter()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - began) if i else best  # i = 0 warms up
        return batch / best

    def train_step():
        F.cross_entropy(model.train()(x), y).backward()

    def forward():
        with torch.no_grad():
            model.eval()(x)

    def gradient():
        x_in = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model.eval()(x_in), y), x_in)

    return rate(train_step), rate(forward), rate(gradient)


def render_plan(jobs: list[Job], spec: Suite, options: RunOptions, device: str) -> str:
    frame = estimate(jobs, spec, options, device)
    shown = frame.copy()
    for column in ("train", "eval", "total"):
        shown[column] = shown[column].map(_duration)
    totals = frame[["to train", "cells to run", "cached", "train", "eval", "total"]].sum()
    lines = [
        f"plan: suite {spec.name} ({spec.description}), preset {options.preset}, device {device}",
        tabulate(shown, headers="keys", tablefmt="github", showindex=False),
        f"total: {int(totals['to train'])} checkpoints to train, {int(totals['cells to run'])} cells to run, "
        f"{int(totals['cached'])} cached; estimated {_duration(totals['train'])} training + "
        f"{_duration(totals['eval'])} evaluation = {_duration(totals['total'])} on {device} "
        "(from a one-batch throughput probe: a rough figure)",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"
