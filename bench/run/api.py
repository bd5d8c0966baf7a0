"""The Python API: evaluate any adapter's defense with a suite's protocol, as the command line
would (`evaluate_defense`), or with a protocol of your own (`evaluate_protocol`)."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from bench.core.environment import check_device
from bench.core.numbers import SEED_LIMIT
from bench.eval.adapters import Defense
from bench.eval.defenses import DefenseSpec
from bench.eval.engine import evaluate
from bench.eval.identity import check_run_name
from bench.eval.protocol import EvalConfig, Subject
from bench.eval.testdata import EvalData
from bench.records.load import load_records
from bench.records.store import RecordStore
from bench.run.options import DEFENSE_STAGES, RunOptions
from bench.run.pipeline import run
from models import UserError


def evaluate_defense(
    defense: Defense,
    results_dir: str | os.PathLike = "results",
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    suite: str = "paper",
    **options: Any,
) -> pd.DataFrame:
    """Evaluate any adapter's defense on its data set, exactly as `run_bench.py --defense
    ...` does, and return its current records: the suite's protocol (default: the paper's
    attacks and radii, AutoAttack on its subset, PGD-50, uniform noise, the noise groups),
    its sanity checks and stability units, then the reports. `options` are
    bench.run.options.RunOptions fields (device="cuda", n_test=1000, stages=..., ...).
    Resumable: finished cells are kept. A protocol of your own: `evaluate_protocol`."""
    _check_folders(results_dir, data_dir)
    _check_defense(defense, "evaluate_defense")
    settings = {"stages": DEFENSE_STAGES, "progress": progress, **options}
    code = run(
        RunOptions(
            suite=suite,
            results_dir=str(results_dir),
            data_dir=None if data_dir is None else str(data_dir),
            defenses=(DefenseSpec.of(defense),),
            **settings,
        )
    )
    if code != 0:
        raise UserError(
            f"the evaluation of {defense.info.name} did not finish: its errors are in the log above"
        )
    return _records_of(defense, results_dir)


def evaluate_protocol(
    defense: Defense,
    config: EvalConfig,
    results_dir: str | os.PathLike = "results",
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """The cells of `config`, a protocol of your own, on any adapter's defense (no checks,
    no stability units, no reports; `seed` seeds the random starts), and its current
    records. Resumable: finished cells are kept."""
    _check_folders(results_dir, data_dir)
    _check_recordable(defense, seed)
    if not isinstance(config, EvalConfig):
        raise UserError(f"evaluate_protocol takes an EvalConfig, got {type(config).__name__}")
    check_device(config.device)
    data = EvalData(defense.info.dataset, data_dir, config)
    data.check_sizes()
    subject = Subject(defense, defense.info.name, defense.info.name, seed)
    _, _, errors = evaluate(subject, config, RecordStore(results_dir), data, progress)
    if errors:
        raise UserError(f"{len(errors)} cell(s) failed the audit, first: {errors[0]}")
    return _records_of(defense, results_dir)


def _check_folders(results_dir: object, data_dir: object) -> None:
    for name, value in (("results_dir", results_dir), ("data_dir", data_dir)):
        if not isinstance(value, str | os.PathLike) and not (name == "data_dir" and value is None):
            raise UserError(f"{name} must be a folder's path, got {type(value).__name__}")


def _check_defense(defense: object, where: str) -> None:
    if not isinstance(defense, Defense):
        raise UserError(f"{where} takes a Defense (bench.eval.adapters), got {type(defense).__name__}")


def _check_recordable(defense: Defense, seed: object) -> None:
    """What the command line refuses, refused here too, before any work: a defense whose
    name --name would not take (a zoo checkpoint keeps its model's name), a seed out of range."""
    _check_defense(defense, "evaluate_protocol")
    check_run_name(defense.info.name, "evaluate_protocol", zoo=defense.info.ours)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise UserError(
            f"evaluate_protocol: seed (the records' seed of this checkpoint) must be an integer in "
            f"[0, 2**32), got {seed!r}"
        )


def _records_of(defense: Defense, results_dir: str | os.PathLike) -> pd.DataFrame:
    frame = load_records(results_dir)
    info = defense.info
    return frame[(frame["run"] == info.name) & (frame["checkpoint_sha256"] == info.checkpoint_sha256)]
