"""What is shown, decided once for every report; aggregation, tables, measured, claims,
figures and the leaderboard all read it.

Where an entry (a run or its ensemble, on one data set, under one preset) measured a
perturbation in several ways, `select_measurements` keeps one, by these rules in order:
1. the largest test subset: a smoke-sized rerun never hides a full evaluation (each
   perturbation its own: AutoAttack may run on a subset of the others' images);
2. the largest ensemble (ensembles of different sizes are different defenses);
3. the most faithful data: released files, then unofficial ones; released noise, then
   generated (from official, then unofficial test files); then, per seed, the data
   measured last (its digest: cells measured on files since replaced drop out);
4. the parameters this run asks for (e.g. --steps at the preset's step size), else the
   strongest set the perturbation knows (for IFGSM / PGD: the most steps, then the
   largest step);
5. per seed, the checkpoint measured last (ensembles of the same size, built from
   different seeds, are both current while all their members are).
What the rules leave out is returned too, so that reports can say it.

Per model, the one run a table row shows (`chosen_runs`): the one trained with the
paper's full recipe, then the largest test subset, then the most seeds. Per checkpoint,
the stability units shown (`chosen_units`): those of the test images measured last, then
per unit the one on the most images, then the latest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bench.attacks.perturbations import (
    DEFAULT_STEPS,
    PERTURBATIONS,
    PRESET_ALPHA_255,
    AttackSetting,
    file_groups,
    metric_name,
    params_text,
)
from bench.data.noise import SEVERITIES
from bench.records.aggregate import ENTRY, per_seed, with_pooled_noise
from bench.records.checkpoints import run_tag
from bench.records.schema import KEY

SOURCE_RANK = {"released": 4, "unofficial": 3, "generated": 2, "generated-unofficial": 1}
# the names of the selection rules, as left-out rows carry them
LARGEST_SUBSET, LARGEST_ENSEMBLE, RELEASED_FIRST = (
    "largest test subset",
    "largest ensemble",
    "released data first",
)
ASKED_PARAMETERS, STRONGEST, LATEST_CHECKPOINT = (
    "asked parameters",
    "strongest parameters",
    "latest checkpoint",
)
LATEST_DATA = "latest data"


def select_measurements(frame: pd.DataFrame, steps: int = DEFAULT_STEPS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, left_out): the records' metric-level cells (severity 0, pooled noise
    included) with `metric`, `kind` and `n_test` columns, one measurement per entry and
    metric (see the module docstring); `left_out` holds the others with the `rule` that
    dropped them. `steps`: the IFGSM / PGD step count this run asks for."""
    # the store holds each KEY once; a frame put together by hand may not: its first row wins.
    # `_order`: the order cells were recorded in (the store's rows come in rowid order), which
    # tells apart measurements of the same second
    unique = frame.drop_duplicates(list(KEY))
    cells = with_pooled_noise(unique.assign(_order=np.arange(len(unique))))
    cells = cells[cells["severity"] == 0].copy()
    noise = cells["perturbation"].isin(file_groups())
    cells["metric"] = [
        metric_name(p, e) for p, e in zip(cells["perturbation"], cells["eps_255"], strict=True)
    ]
    cells["kind"] = np.where(cells["members"] > 1, "ensemble", "single")
    cells["n_test"] = np.where(noise, cells["n"] // len(SEVERITIES), cells["n"])
    scores = {
        "part": np.where(noise, "noise", "clean"),
        "source": cells["data_source"].map(SOURCE_RANK).fillna(0),
        "asked": [
            int(params == asked_params(p, preset, eps, steps))
            for p, preset, eps, params in zip(
                cells["perturbation"], cells["preset"], cells["eps_255"], cells["params"], strict=True
            )
        ],
        "strength": _strength_ranks(cells),
        "measured": cells.groupby([*ENTRY, "seed", "checkpoint_sha256"], dropna=False)["timestamp"].transform(
            "max"
        ),
        # what one data digest covers: the test images (clean and attack cells), or one noise file
        "read": np.where(noise, cells["perturbation"], "test images"),
    }
    when = cells["timestamp"].astype(str) + "#" + cells["_order"].map("{:012d}".format)
    scores["data"] = when.groupby(
        [cells[c] for c in [*ENTRY, "seed"]]
        + [pd.Series(scores["read"], index=cells.index), cells["data_sha256"]],
        dropna=False,
    ).transform("max")
    cells = cells.assign(**{f"_{k}": v for k, v in scores.items()})
    rules = (
        (LARGEST_SUBSET, [*ENTRY, "perturbation"], "n_test"),
        (LARGEST_ENSEMBLE, ENTRY, "members"),
        (RELEASED_FIRST, [*ENTRY, "_part"], "_source"),
        (LATEST_DATA, [*ENTRY, "seed", "_read"], "_data"),
        (ASKED_PARAMETERS, [*ENTRY, "metric"], "_asked"),
        (STRONGEST, [*ENTRY, "metric"], "_strength"),
        (LATEST_CHECKPOINT, [*ENTRY, "seed"], "_measured"),
    )
    left = []
    for rule, by, score in rules:
        best = cells.groupby(by, dropna=False)[score].transform("max")
        dropped = cells[score] != best
        left.append(cells[dropped].assign(rule=rule))
        cells = cells[~dropped]
    cells = cells.drop(columns=[*(f"_{k}" for k in scores), "_order"])
    left_out = pd.concat(left, ignore_index=True).drop(columns=[*(f"_{k}" for k in scores), "_order"])
    twice = cells.duplicated([*ENTRY, "seed", "metric"], keep=False)
    if twice.any():  # the rules above leave one cell per entry, seed and metric, or it is a bug
        raise AssertionError(f"measurements still mixed:\n{cells[twice].head()}")
    return cells.reset_index(drop=True), left_out


def asked_params(perturbation: str, preset: str, eps_255: float, steps: int = DEFAULT_STEPS) -> str:
    """The parameters (canonical JSON) a run with `preset` and `steps` gives a cell."""
    pert = PERTURBATIONS.get(perturbation)
    if pert is None or preset not in PRESET_ALPHA_255:
        return ""
    return params_text(pert.params(AttackSetting(preset=preset, steps=steps), eps_255))


def _strength_ranks(cells: pd.DataFrame) -> list[int]:
    """Each cell's parameter set ranked among all of its perturbation's by strength."""
    pairs = sorted(set(zip(cells["perturbation"], cells["params"], strict=True)))

    def strength(pair: tuple[str, str]) -> tuple:
        pert = PERTURBATIONS.get(pair[0])
        return pert.strength(json.loads(pair[1] or "{}")) if pert is not None else ()

    order = {pair: rank for rank, pair in enumerate(sorted(pairs, key=lambda p: (p[0], strength(p), p[1])))}
    return [order[pair] for pair in zip(cells["perturbation"], cells["params"], strict=True)]


def lambda_key(init: Sequence[float | None] | None) -> tuple[float, float] | None:
    """A λ initialisation as a dictionary key: None for none (or NaN), else rounded."""
    low, high = init if init is not None else (None, None)
    if low is None or high is None or math.isnan(low):
        return None
    return round(low, 6), round(high, 6)


def best_groups(aggregated: pd.DataFrame) -> dict:
    """(dataset, model, λ, kind, metric) -> the aggregate of the one run chosen for it by
    `chosen_runs` (its numbers never mix with another run's)."""
    if aggregated.empty:
        return {}
    runs = chosen_runs(aggregated)
    shown = runs[runs["chosen"]]
    keep = set(zip(shown["dataset"], shown["model"], shown["lam"], shown["kind"], shown["run"], strict=True))
    best: dict = {}
    for row in aggregated.itertuples(index=False):
        lam = lambda_key((row.lambda_low, row.lambda_high))
        if (row.dataset, row.model, lam, row.kind, row.run) in keep:
            best[(row.dataset, row.model, lam, row.kind, row.metric)] = {
                "mean": row.mean,
                "std": row.std,
                "n": row.n,
                "run": row.run,
            }
    return best


def chosen_runs(aggregated: pd.DataFrame) -> pd.DataFrame:
    """One row per run of each (dataset, model, λ, kind) with its test size and seeds;
    `chosen` marks the run a table shows: the one trained with the paper's full recipe,
    then the largest test subset, then the most seeds (then the name, to be deterministic)."""
    frame = aggregated.assign(
        lam=[lambda_key(p) for p in zip(aggregated["lambda_low"], aggregated["lambda_high"], strict=True)]
    )
    keys = ["dataset", "model", "lam", "kind"]
    runs = (
        frame.groupby([*keys, "run", "preset"], dropna=False, sort=False)
        .agg(n_test=("n_test", "max"), seeds=("n", "max"))
        .reset_index()
    )
    runs["lam"] = [v if isinstance(v, tuple) else None for v in runs["lam"]]  # groupby made None NaN
    runs["paper_recipe"] = [
        run in paper_recipe_tags(model, preset, lam)
        for run, model, preset, lam in zip(
            runs["run"], runs["model"], runs["preset"], runs["lam"], strict=True
        )
    ]
    runs = runs.sort_values(["paper_recipe", "n_test", "seeds", "run"], kind="stable")
    runs["chosen"] = ~runs.duplicated(keys, keep="last")
    return runs.reset_index(drop=True)


def paper_recipe_tags(model: str, preset: str, lam: tuple[float, float] | None) -> set[str]:
    """The run tags of `model` trained with the paper's full recipe (with or without the
    λ initialisation written into the tag)."""
    tags = {run_tag(model, preset)}
    if lam is not None:
        tags.add(run_tag(model, preset, "full", lam))
    return tags


def seed_metrics(frame: pd.DataFrame, steps: int = DEFAULT_STEPS) -> pd.DataFrame:
    """One row per entry x seed (or ensemble) x metric with `value` (accuracy in %),
    `n_test` and `members`, from the measurements `select_measurements` keeps."""
    return per_seed(select_measurements(frame, steps)[0])


# a stability unit's checkpoint, as reports name it
CHECKPOINT = ["dataset", "run", "model", "seed", "members", "preset"]


def chosen_units(frame: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint the test images measured last (records.data_sha256: units measured
    on images since replaced drop out, as cells do), then per unit one measurement: the one
    on the most images, then the one recorded last (a rerun with other estimator settings
    replaces an older one)."""
    if frame.empty:
        return frame
    checkpoint = [*CHECKPOINT, "checkpoint_sha256"]
    # ties within a timestamp's second go to the later record (load_stability keeps rowid order)
    ordered = frame.assign(_order=np.arange(len(frame))).sort_values(["timestamp", "_order"], kind="stable")
    latest = ordered.groupby(checkpoint, dropna=False)["data_sha256"].transform("last")
    frame = frame[(frame["data_sha256"] == latest.reindex(frame.index)).to_numpy()]
    unit = [*checkpoint, "quantity", "perturbation", "eps_255"]
    last = frame.groupby([*unit, "n", "params"], dropna=False)["timestamp"].max().reset_index()
    keep = last.sort_values(["n", "timestamp"], kind="stable").groupby(unit, dropna=False).tail(1)
    return frame.merge(keep[[*unit, "n", "params"]], on=[*unit, "n", "params"])
