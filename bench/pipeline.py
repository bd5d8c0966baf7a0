"""One benchmark run: plan jobs from a suite, train the missing checkpoints, evaluate every
missing cell, write the reports. `run_bench.py` turns its arguments into `RunOptions`.

A job is one model (with one λ initialisation) on one data set: its seeds are trained and
evaluated one by one, then, where the suite asks for it, the ensemble of its seeds.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
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

from .data import dataset_spec, load_test
from .environment import resolve_device, retain_freed_memory
from .evaluate import (
    EvalConfig,
    EvalData,
    Subject,
    cell_key,
    cell_sources,
    evaluate,
    protocol_cells,
    unit_passes,
    units,
)
from .noise import NOISE_GROUPS
from .recipes import recipe_for
from .records import DB_FILE, ENSEMBLE_SEED, RecordStore, load_records, utc_now, with_pooled_noise
from .report import check_metric, write_reports
from .suites import Study, Suite, suite
from .train import TrainConfig, train

log = logging.getLogger(__name__)
STAGES = ("train", "eval", "report")


@dataclass(frozen=True)
class RunOptions:
    """What to run; None means "as the suite says"."""

    suite: str = "smoke"
    stages: tuple[str, ...] = STAGES
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
    """Run the stages; returns the exit code (1 when a cell failed its audit)."""
    spec = suite(options.suite)
    check_metric(options.rank_by)
    jobs = plan_jobs(spec, options)
    if set(options.stages) == {"report"} and not options.dry_run:  # records only: no device, no data
        return _report(options)
    device = _device(spec, options, jobs)
    if options.dry_run:
        sys.stdout.write(render_plan(jobs, spec, options, device) + "\n")
        return 0
    if options.n_train is not None and options.n_train < 1:
        raise UserError(f"--n-train must be positive, got {options.n_train}")
    for job in jobs:  # every mistake in the options is found before anything runs
        _eval_config(job, spec, options, device)
    store = RecordStore(options.results_dir)  # fails now if the results dir is not writable
    for dataset in sorted({j.dataset for j in jobs}):
        load_test(dataset, options.data_dir)  # missing data: fail before anything is trained
    if device == "cpu":
        retain_freed_memory()
    outcome = Outcome()
    began = time.perf_counter()
    if "train" in options.stages:
        _train_all(jobs, spec, options, device, outcome)
    if "eval" in options.stages:
        _evaluate_all(jobs, spec, options, device, store, outcome)
    if "report" in options.stages:
        _report(options)
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


def _report(options: RunOptions) -> int:
    began = time.perf_counter()
    written = write_reports(options.results_dir, options.preset, options.rank_by)
    log.info(
        "reports: %d files under %s in %.1f s; see %s",
        len(written),
        options.results_dir,
        time.perf_counter() - began,
        Path(options.results_dir) / "REPORT.md",
    )
    return 0


def plan_jobs(spec: Suite, options: RunOptions) -> list[Job]:
    """The suite's jobs, restricted to `options.models` when given (models in none of its
    studies get the first study's protocol), with the options' overrides applied."""
    wanted = resolve_models(options.models) if options.models else None
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
    return EvalConfig(
        preset=options.preset,
        eps_255=job.radii,
        iterative_eps_255=job.ensemble_radii if ensemble else None,
        steps=options.steps,
        n_test=options.n_test if options.n_test is not None else spec.n_test,
        noise_source=options.noise_source,
        batch_size=options.batch_size,
        device=device,
    )


def _train_all(jobs: list[Job], spec: Suite, options: RunOptions, device: str, outcome: Outcome) -> None:
    for job in jobs:
        for seed in _seeds(spec, options):
            meta = train(
                _train_config(job, seed, spec, options, device),
                options.results_dir,
                options.data_dir,
                options.progress,
            )
            if meta["status"] == "failed":
                outcome.failed_runs.add(f"{meta['tag']} {job.dataset} seed {seed}")


def _evaluate_all(
    jobs, spec: Suite, options: RunOptions, device: str, store: RecordStore, outcome: Outcome
) -> None:
    data: dict[tuple, EvalData] = {}
    for job in jobs:
        members = []
        config = _eval_config(job, spec, options, device)
        key = (job.dataset, config.n_test, config.noise_source)
        data.setdefault(key, EvalData(job.dataset, options.data_dir, config))
        for seed in _seeds(spec, options):
            tag = _train_config(job, seed, spec, options, device).tag
            defense = _trained_defense(tag, job.dataset, seed, options, store, outcome)
            if defense is None:
                continue
            members.append(defense)
            subject = Subject(defense, job.model, tag, seed, 1, _lambda_init(defense.model))
            _evaluate_one(subject, config, store, data[key], options, outcome)
        if job.ensemble_radii and len(members) >= 2:
            ensemble = ensemble_defense(members, name=tag)
            subject = Subject(
                ensemble, job.model, tag, ENSEMBLE_SEED, len(members), _lambda_init(members[0].model)
            )
            ens_config = _eval_config(job, spec, options, device, ensemble=True)
            _evaluate_one(subject, ens_config, store, data[key], options, outcome)


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
    defense = zoo_defense(tag, dataset, seed, options.results_dir) if status == "finished" else None
    model = defense.model if defense is not None else create_model(meta["model"], **meta["model_kwargs"])
    low, high = _lambda_init(model) or (None, None)
    store.add_run(
        {
            "model": meta["model"],
            "run": tag,
            "dataset": dataset,
            "seed": seed,
            "lambda_low": low,
            "lambda_high": high,
            "status": status,
            "reason": meta.get("reason", ""),
            "test_accuracy": meta.get("test_accuracy"),
            "checkpoint_sha256": meta["sha256"],
            "timestamp": utc_now(),
        }
    )
    if defense is None:
        log.warning(
            "%s %s seed %d: run failed (%s); not evaluated", tag, dataset, seed, meta.get("reason", "")
        )
        outcome.failed_runs.add(f"{tag} {dataset} seed {seed}")
    return defense


def _evaluate_one(
    subject: Subject, config: EvalConfig, store: RecordStore, data: EvalData, options, outcome
) -> None:
    began = time.perf_counter()
    ran, cached, errors = evaluate(subject, config, store, data, options.progress)
    outcome.cells_run += ran
    outcome.cells_cached += cached
    outcome.errors += errors
    log.info(
        "%s (%d cells run, %d cached, %.0f s)",
        summary_line(subject, config, data, options.results_dir),
        ran,
        cached,
        time.perf_counter() - began,
    )


def summary_line(subject: Subject, config: EvalConfig, data: EvalData, results_dir) -> str:
    """One line: clean, mean noise accuracy, and each attack at each radius, in percent."""
    frame = with_pooled_noise(load_records(results_dir))
    mine = frame[
        (frame["run"] == subject.run)
        & (frame["dataset"] == data.dataset)
        & (frame["seed"] == subject.seed)
        & (frame["checkpoint_sha256"] == subject.defense.info.checkpoint_sha256)
        & (frame["n"].isin([data.n, data.n * 5]))
        & (frame["preset"] == config.preset)
    ]

    def pct(rows) -> str:
        return f"{100 * rows['accuracy'].mean():.1f}" if len(rows) else "-"

    parts = [f"clean {pct(mine[mine['perturbation'] == 'clean'])}"]
    parts.append(f"noise {pct(mine[mine['perturbation'].isin(NOISE_GROUPS) & (mine['severity'] == 0)])}")
    for kind in ("fgsm", "ifgsm", "pgd"):
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
    rows = []
    for job in jobs:
        if job.model not in rates:
            rates[job.model] = probe(job.model, device)
        rows.append(_job_estimate(job, spec, options, device, *rates[job.model]))
    return pd.DataFrame(rows)


def _job_estimate(job, spec, options, device, train_rate, forward_rate, gradient_rate) -> dict:
    n_train_all, n_test_all = dataset_spec(job.dataset).sizes
    seeds = _seeds(spec, options)
    config = _eval_config(job, spec, options, device)
    n = min(config.n_test or n_test_all, n_test_all)
    to_train, todo, cached, seconds_train, seconds_eval, digests = 0, 0, 0, 0.0, 0.0, []
    for seed in seeds:
        train_config = _train_config(job, seed, spec, options, device)
        folder = zoo_checkpoint_dir(options.results_dir, job.dataset, train_config.tag, seed)
        meta = read_meta(folder / META_FILE) if (folder / META_FILE).is_file() else {}
        if meta.get("status") == "failed":
            continue
        if meta.get("status") != "finished":
            family = create_model(job.model).info.family
            epochs = recipe_for(family, job.dataset, options.preset, train_config.length).epochs
            to_train += 1
            images = min(train_config.n_train or n_train_all, n_train_all)
            seconds_train += (epochs - int(meta.get("epochs_done") or 0)) * images / train_rate
        digests.append(meta.get("sha256"))
        cells = _cells_todo(job, train_config.tag, seed, 1, meta.get("sha256"), config, options, n)
        todo, cached = todo + len(cells), cached + len(protocol_cells(config)) - len(cells)
        seconds_eval += _eval_seconds(cells, n, config.steps, forward_rate, gradient_rate)
    if job.ensemble_radii and len(digests) >= 2:
        ens_config = _eval_config(job, spec, options, device, ensemble=True)
        digest = ensemble_digest(digests) if all(digests) else None  # known once all members are
        cells = _cells_todo(
            job, train_config.tag, ENSEMBLE_SEED, len(digests), digest, ens_config, options, n
        )
        todo, cached = todo + len(cells), cached + len(protocol_cells(ens_config)) - len(cells)
        seconds_eval += len(digests) * _eval_seconds(cells, n, ens_config.steps, forward_rate, gradient_rate)
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
    job: Job, run: str, seed: int, members: int, digest, config: EvalConfig, options, n: int
) -> list:
    """The protocol cells of a checkpoint (digest None: not trained yet) not in the records."""
    cells = protocol_cells(config)
    if digest is None or not (Path(options.results_dir) / DB_FILE).is_file():
        return cells
    context = {
        "run": run,
        "dataset": job.dataset,
        "seed": seed,
        "members": members,
        "n": n,
        "preset": config.preset,
        "checkpoint_sha256": digest,
    }
    done = RecordStore(options.results_dir).done(context)
    clean, noisy = cell_sources(job.dataset, options.data_dir, config.noise_source)  # as EvalData will
    return [
        c
        for c in cells
        if cell_key(c, noisy if c.perturbation in NOISE_GROUPS else clean, config) not in done
    ]


def _eval_seconds(cells, n: int, steps: int, forward_rate: float, gradient_rate: float) -> float:
    total = 0.0
    for unit in units(cells):
        forward, gradient = unit_passes(unit, n, steps)
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
