#!/usr/bin/env python
"""What the report stage, the selection, the claims and the dry run cost on the paper
plan's number of records, at 1/4, 1/2 and all of it.

The store is filled as the paper suite would leave it: every job of its plan (every model,
data set, λ initialisation), 5 seeds and Table 6's ensembles, every cell of the protocol at
the suite's test sizes (10,000 images, AutoAttack and PGD-50 on 1,000) with per-example
bits, the runs, the sanity checks and every stability unit on 200 images. Values are
synthetic (each cell's bits drawn at a plausible accuracy) and pass the store's value
checks; each checkpoint folder holds a meta.json and an empty weights.pt (the dry run only
asks that it be there; Fig. 2, the one figure that loads weights, is timed on rehearsal
checkpoints instead, docs/PERFORMANCE.md). A fraction keeps the first jobs of the plan,
each whole.

Each phase runs in a process of its own, so its wall time and peak memory (max RSS) are
its own:
- `selection`: read the records and reduce them (bench.reports.measured);
- `report`: the report stage without figures (tables, claims and their bootstraps,
  REPORT.md, the leaderboard and its RobustBench entries), as `--stage report --no-figures`;
- `figures`: the figures drawn from records (Fig. 2 skipped: no weights);
- `dry-run`: `python run_bench.py --suite paper --dry-run --device cpu` on the store.

    python benchmarks/bench_scale.py                       # 1/4, 1/2, 1 (minutes)
    python benchmarks/bench_scale.py --fractions 0.25
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.eval.engine import cell_key  # noqa: E402
from bench.eval.protocol import protocol_cells  # noqa: E402
from bench.eval.stability import blocks, params_of, stage_units, unit_eps  # noqa: E402
from bench.records.checkpoints import (  # noqa: E402
    META_FILE,
    WEIGHTS_FILE,
    ensemble_digest,
    model_kwargs,
    zoo_checkpoint_dir,
)
from bench.records.schema import (
    GROWTH,  # noqa: E402
    utc_now,  # noqa: E402
)
from bench.records.store import RecordStore  # noqa: E402
from bench.run.driver import run_row  # noqa: E402
from bench.run.options import RunOptions  # noqa: E402
from bench.run.plan import ENSEMBLE, MEASURE, TRAIN, eval_config, plan_jobs, plan_tasks, stability_config  # noqa: E402
from bench.run.suites import SUITES  # noqa: E402
from bench.train.loop import _coefficients, model_options  # noqa: E402
from bench.train.recipes import recipe_for  # noqa: E402
from models import (  # noqa: E402
    create_model,
    model_entry,
    plain_counterpart,  # noqa: E402
)

PHASES = ("selection", "report", "figures", "dry-run")
CHECKS = ("zero-gradients", "nonfinite-gradients", "randomized", "probabilities", "classes", "dynamic")
REPO = Path(__file__).resolve().parents[1]


def _hex(rng: np.random.Generator) -> str:
    return rng.bytes(32).hex()


class _Models:
    """Each model built once on the CPU as training builds it: its options, blocks and coefficients' count."""

    def __init__(self):
        self._built: dict[tuple, tuple] = {}

    def __call__(self, name: str, dataset: str, lambda_init) -> tuple[dict, list[bool], int]:
        """(meta.json's model_kwargs and lambda_storage, each block's damped flag, coefficients)."""
        key = (name, dataset, lambda_init)
        if key not in self._built:
            net = create_model(name, **model_options(name, dataset, "paper", lambda_init))
            chain = blocks(net)
            kwargs = {"model_kwargs": model_kwargs(net.info), "lambda_storage": net.info.lambda_storage}
            self._built[key] = (kwargs, [bool(b.skip.damped) for b in chain], len(_coefficients(net)))
        return self._built[key]


def fill(results: Path, fraction: float, seed: int = 0) -> dict:
    """The paper plan's records for its first `fraction` of jobs; returns what was written."""
    rng = np.random.default_rng(seed)
    suite = SUITES["paper"]
    options = RunOptions(suite="paper", results_dir=str(results), device="cpu")
    jobs = plan_jobs(suite, options)
    jobs = jobs[: max(1, math.ceil(fraction * len(jobs)))]
    tasks = plan_tasks(jobs, suite, options, "cpu")
    store, models, stable = RecordStore(results), _Models(), stability_config(suite, options)
    digests: dict[tuple, str] = {}
    counts = {"jobs": len(jobs), "checkpoints": 0, "cells": 0, "checks": 0, "stability units": 0}
    test_digest, clean_source = _hex(rng), "released"
    for task in (t for t in tasks if t.kind == TRAIN):
        digests[task.run_tag, task.job.dataset, task.seed] = _checkpoint(results, task, models, rng)
        counts["checkpoints"] += 1
    for task in (t for t in tasks if t.kind in (MEASURE, ENSEMBLE)):
        ensemble = task.kind == ENSEMBLE
        config = eval_config(task.job, suite, options, "cpu", ensemble)
        members = [digests[task.run_tag, task.job.dataset, s] for s in task.seeds]
        digest = ensemble_digest(members) if ensemble else members[0]
        if ensemble:
            store.add_ensemble(
                digest, task.run_tag, task.job.dataset, dict(zip(task.seeds, members, strict=True))
            )
        entry = model_entry(task.job.name)
        low, high = task.job.lambda_init or entry.damped_lambda_init or (None, None)
        context = {
            "model": task.job.name,
            "run": task.run_tag,
            "family": entry.family,
            "dataset": task.job.dataset,
            "seed": task.seed,
            "members": len(task.seeds),
            "preset": "paper",
            "checkpoint_sha256": digest,
            "lambda_low": low,
            "lambda_high": high,
        }
        rows, bits = [], []
        accuracy = rng.uniform(0.55, 0.95)
        for cell in protocol_cells(config):
            n = config.n_test_of(cell.perturbation) or 10_000
            correct = rng.random(n) < accuracy * (0.9**cell.eps_255)
            source = "generated" if cell.severity else clean_source
            key = cell_key(cell, source, config, n, test_digest)
            rows.append(
                {
                    **context,
                    **dict(
                        zip(
                            (
                                "data_source",
                                "perturbation",
                                "eps_255",
                                "severity",
                                "n",
                                "params",
                                "data_sha256",
                            ),
                            key,
                            strict=True,
                        )
                    ),
                    "correct": int(correct.sum()),
                    "accuracy": float(correct.mean()),
                    "torch_version": "2.14.1",
                    "torchattacks_version": "3.5.1",
                    "device": "cuda (NVIDIA H200)",
                    "batch_size": 512,
                    "seconds": 1.0,
                    "timestamp": utc_now(),
                }
            )
            bits.append(correct)
        counts["cells"] += store.add_cells(rows, bits)
        checks = [*CHECKS, *(("transfer",) if plain_counterpart(task.job.name) and not ensemble else ())]
        store.add_checks(
            [
                {
                    "run": task.run_tag,
                    "dataset": task.job.dataset,
                    "seed": task.seed,
                    "members": len(task.seeds),
                    "checkpoint_sha256": digest,
                    "check": c,
                    "value": 0.0,
                    "limit": 0.0,
                    "detail": "",
                    "timestamp": utc_now(),
                }
                for c in checks
            ]
        )
        counts["checks"] += len(checks)
        _, damped, _ = models(task.job.name, task.job.dataset, task.job.lambda_init)
        for unit in stage_units(len(task.seeds)):
            counts["stability units"] += _stability(
                store, context, unit, damped, stable, config, test_digest, rng
            )
    return counts


def _checkpoint(results: Path, task, models: _Models, rng: np.random.Generator) -> str:
    """A finished checkpoint's meta.json (no weights) and its run row; returns its digest."""
    job = task.job
    built, _, coefficients = models(job.name, job.dataset, job.lambda_init)
    recipe = recipe_for(model_entry(job.name).family, job.dataset)
    meta = {
        "model": job.name,
        "dataset": job.dataset,
        "seed": task.seed,
        "sha256": _hex(rng),
        **built,
        "tag": task.run_tag,
        "preset": "paper",
        "length": "full",
        "n_train": None,
        "status": "finished",
        "reason": "",
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(recipe).items()},
        "epochs_done": recipe.epochs,
        "test_accuracy": 0.93,
        "wall_seconds": 3600.0,
        "interpolation_coefficients": [round(float(c), 6) for c in rng.uniform(0, 0.3, coefficients)],
        "data": {"source": "released", "images": 50_000, "sha256": _hex(rng)},
    }
    folder = zoo_checkpoint_dir(results, job.dataset, task.run_tag, task.seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).write_text(json.dumps(meta))
    (folder / WEIGHTS_FILE).touch()  # there, as the dry run asks; never loaded here
    RecordStore(results).add_run(run_row(meta, task.run_tag, job.dataset, task.seed))
    return meta["sha256"]


def _stability(store, context, unit, damped, stable, config, digest, rng) -> int:
    n = stable.n
    if unit.quantity == GROWTH:
        rows = [(b, int(d)) for b, d in enumerate([False, *damped, False])]
    elif unit.quantity == "input_gradient":
        rows = [(-1, 0)]
    else:
        rows = [(b + 1, int(d)) for b, d in enumerate(damped)]
    values = [rng.uniform(0.5, 2.0, n).astype(np.float32) for _ in rows]
    records = [
        {
            **context,
            "data_source": "released",
            "quantity": unit.quantity,
            "perturbation": unit.perturbation,
            "eps_255": unit_eps(unit, stable),
            "block": b,
            "damped": d,
            "n": n,
            "params": params_of(unit, stable, config),
            "data_sha256": digest,
            "mean": float(np.mean(v)),
            "median": float(np.median(v)),
            "torch_version": "2.14.1",
            "device": "cuda (NVIDIA H200)",
            "seconds": 1.0,
            "timestamp": utc_now(),
        }
        for (b, d), v in zip(rows, values, strict=True)
    ]
    return int(store.add_stability(records, values) > 0)


def phase(name: str, results: Path) -> None:
    """One phase, in this process (the parent times it)."""
    logging.basicConfig(level=logging.WARNING)
    if name == "selection":
        from bench.reports.measured import measured

        measured(results)
    elif name in ("report", "figures"):
        import run_bench

        stage = "report" if name == "report" else "figures"
        extra = ["--no-figures"] if name == "report" else []
        code = run_bench.main(
            ["--stage", stage, "--results-dir", str(results), "--data-dir", str(results / "data"), *extra]
        )
        if code:
            raise SystemExit(code)
    else:
        import run_bench

        code = run_bench.main(
            [
                "--suite",
                "paper",
                "--dry-run",
                "--device",
                "cpu",
                "--results-dir",
                str(results),
                "--data-dir",
                str(results / "data"),
            ]
        )
        if code:
            raise SystemExit(code)


def timed(name: str, results: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one phase in a fresh process."""
    began = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "--phase", name, "--results", str(results)],
        stdout=subprocess.DEVNULL,
        cwd=REPO,
    )
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"phase {name} failed (exit {os.waitstatus_to_exitcode(status)})")
    return time.perf_counter() - began, usage.ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.25,0.5,1")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        phase(args.phase, Path(args.results))
        return 0
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            results = Path(tmp) / "results"
            began = time.perf_counter()
            counts = fill(results, fraction)
            filled = time.perf_counter() - began
            size = (results / "records.sqlite").stat().st_size / 2**20
            times = {name: timed(name, results) for name in PHASES}
            rows.append((fraction, counts, size, filled, times))
            print(
                f"fraction {fraction:g}: {counts}, store {size:.0f} MiB (filled in {filled:.0f} s); "
                + "; ".join(f"{n} {s:.1f} s {m:.2f} GiB" for n, (s, m) in times.items()),
                flush=True,
            )
    print("\n| plan | jobs | checkpoints | cells | stability units | store | " + " | ".join(PHASES) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(PHASES))
    for fraction, counts, size, _, times in rows:
        print(
            f"| {fraction:g} | {counts['jobs']} | {counts['checkpoints']} | {counts['cells']:,} | {counts['stability units']:,} "
            f"| {size:.0f} MiB | " + " | ".join(f"{s:.1f} s, {m:.2f} GiB" for s, m in times.values()) + " |"
        )
    if len(rows) > 1:
        (f0, c0, _, _, t0), (f1, c1, _, _, t1) = rows[0], rows[-1]
        growth = {n: t1[n][0] / t0[n][0] for n in PHASES}
        print(
            f"\ngrowth from {f0:g} to {f1:g} of the plan ({c1['cells'] / c0['cells']:.1f}x the cells): "
            + ", ".join(f"{n} x{g:.1f}" for n, g in growth.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
