"""The Python API's one call: evaluate any adapter's defense, as the command line would."""

from __future__ import annotations

import os

import pandas as pd

from bench.core.environment import check_device
from bench.eval.adapters import Defense
from bench.eval.engine import evaluate
from bench.eval.protocol import EvalConfig, Subject
from bench.eval.testdata import EvalData
from bench.records.load import load_records
from bench.records.store import RecordStore
from bench.run.options import DEFENSE_STAGES, RunOptions
from bench.run.pipeline import run
from models import UserError


def evaluate_defense(
    defense: Defense,
    config: EvalConfig | None = None,
    results_dir: str | os.PathLike = "results",
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    suite: str = "paper",
    **options,
) -> pd.DataFrame:
    """Evaluate any adapter's defense on its data set and return its current records.

    Without `config`: exactly what `run_bench.py --defense ...` runs, the suite's protocol
    (default: the paper's attacks and radii, AutoAttack on its subset, PGD-50, uniform noise,
    the noise groups), its sanity checks and stability units, then the reports; `options`
    are bench.run.options.RunOptions fields (device="cuda", n_test=1000, stages=..., ...).
    With `config`: that EvalConfig's cells alone (no checks; `seed` seeds their random
    starts), a protocol of your own. Both are resumable: finished cells are kept."""
    if config is None:
        settings = {"stages": DEFENSE_STAGES, "progress": progress, **options}
        code = run(RunOptions(suite=suite, results_dir=str(results_dir), data_dir=None if data_dir is None else str(data_dir),
                              defenses=(defense,), **settings))  # fmt: skip
        if code != 0:
            raise UserError(f"the evaluation of {defense.info.name} did not finish: its errors are in the log above")
    else:
        check_device(config.device)
        data = EvalData(defense.info.dataset, data_dir, config)
        subject = Subject(defense, defense.info.name, defense.info.name, seed)
        _, _, errors = evaluate(subject, config, RecordStore(results_dir), data, progress)
        if errors:
            raise UserError(f"{len(errors)} cell(s) failed the audit, first: {errors[0]}")
    frame = load_records(results_dir)
    info = defense.info
    return frame[(frame["run"] == info.name) & (frame["checkpoint_sha256"] == info.checkpoint_sha256)]
