"""Aggregation of the tidy records: pure pandas functions, no I/O, no formatting.

Accuracies become percentages here. A *metric* is `clean`, a noise group (all five
severities pooled), `noise` (the mean of the four groups, the paper's Tables 4-6
number), or `<attack>@<eps in 1/255>` such as `pgd@2` (bench.attacks.perturbations names them).

A reported number only ever averages cells that measured the same thing. An *entry* is
one run (or its ensemble) on one data set under one preset; where an entry measured a
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
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from bench.attacks.perturbations import (
    ATTACK,
    DEFAULT_STEPS,
    PERTURBATIONS,
    PRESET_ALPHA_255,
    AttackSetting,
    metric_name,
    of_kind,
    params_text,
)
from bench.data.noise import NOISE_GROUPS, SEVERITIES
from bench.records.store import KEY, cell_id

ENTRY = ["dataset", "model", "run", "lambda_low", "lambda_high", "kind", "preset"]
GROUP = ENTRY  # one aggregate per entry and metric
SOURCE_RANK = {"released": 4, "unofficial": 3, "generated": 2, "generated-unofficial": 1}
# the names of the selection rules, as left-out rows carry them
LARGEST_SUBSET, LARGEST_ENSEMBLE, RELEASED_FIRST = "largest test subset", "largest ensemble", "released data first"
ASKED_PARAMETERS, STRONGEST, LATEST_CHECKPOINT = "asked parameters", "strongest parameters", "latest checkpoint"
LATEST_DATA = "latest data"


def with_pooled_noise(frame: pd.DataFrame) -> pd.DataFrame:
    """Add, per model x data set x seed x measurement (the KEY but the severity), the
    accuracy of each noise group over all five severities (the paper's Table 1 number) as
    rows with severity 0 and n = 5 x the images per severity, where all five exist."""
    noise = frame[frame["perturbation"].isin(NOISE_GROUPS) & (frame["severity"] > 0)]
    group = [k for k in KEY if k != "severity"] + ["model", "family", "lambda_low", "lambda_high"]
    group += ["stale"] if "stale" in frame else []
    rest = [c for c in frame.columns if c not in group and c not in ("severity", "n", "correct", "accuracy")]
    pooled = noise.groupby(group, dropna=False).agg(
        severities=("severity", "nunique"),
        n_sum=("n", "sum"),
        correct=("correct", "sum"),
        **{c: (c, "max" if c in ("timestamp", "_order") else "sum" if c == "seconds" else "first") for c in rest},
    )
    pooled = pooled[pooled["severities"] == len(SEVERITIES)].reset_index()
    pooled = pooled.drop(columns=["severities", "n"]).rename(columns={"n_sum": "n"})
    pooled["severity"] = 0
    pooled["accuracy"] = pooled["correct"] / pooled["n"]
    return pd.concat([frame, pooled[frame.columns]], ignore_index=True)


def with_worst_case(frame: pd.DataFrame, bits: dict[tuple, np.ndarray]) -> pd.DataFrame:
    """Add a `worst` cell per checkpoint, subset, data and radius where two or more attacks
    were measured: an example counts as correct only if every attack at that radius left
    it correct (from the stored bits `records.load_bits` gives; nothing is recomputed).
    The worst cells' bits are added to `bits`."""
    attacks = frame[frame["perturbation"].isin([p.name for p in of_kind(ATTACK)])]
    group = ["run", "dataset", "data_source", "data_sha256", "seed", "members", "preset", "checkpoint_sha256", "n", "eps_255"]
    rows = []
    for _, cells in attacks.groupby(group, dropna=False, sort=False):
        found = [bits.get(cell_id(row)) for row in cells.itertuples(index=False)]
        if cells["perturbation"].nunique() < 2 or any(b is None for b in found):
            continue
        correct = np.logical_and.reduce(found)
        of = sorted(set(cells["perturbation"]))
        row = {
            **cells.iloc[0].to_dict(),
            "perturbation": "worst",
            "params": params_text({"of": of}),
            "correct": int(correct.sum()),
            "accuracy": float(correct.mean()),
            "seconds": 0.0,
            "timestamp": cells["timestamp"].max(),
        }
        bits[cell_id(row)] = correct  # intervals of the worst case need its bits too
        rows.append(row)
    return pd.concat([frame, pd.DataFrame(rows, columns=frame.columns)], ignore_index=True) if rows else frame


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
    noise = cells["perturbation"].isin(NOISE_GROUPS)
    cells["metric"] = [metric_name(p, e) for p, e in zip(cells["perturbation"], cells["eps_255"], strict=True)]
    cells["kind"] = np.where(cells["members"] > 1, "ensemble", "single")
    cells["n_test"] = np.where(noise, cells["n"] // len(SEVERITIES), cells["n"])
    scores = {
        "part": np.where(noise, "noise", "clean"),
        "source": cells["data_source"].map(SOURCE_RANK).fillna(0),
        "asked": [
            int(params == asked_params(p, preset, eps, steps))
            for p, preset, eps, params in zip(cells["perturbation"], cells["preset"], cells["eps_255"], cells["params"], strict=True)
        ],
        "strength": _strength_ranks(cells),
        "measured": cells.groupby([*ENTRY, "seed", "checkpoint_sha256"], dropna=False)["timestamp"].transform(
            "max"
        ),
        # what one data digest covers: the test images (clean and attack cells), or one noise file
        "read": np.where(noise, cells["perturbation"], "test images"),
    }
    when = cells["timestamp"].astype(str) + "#" + cells["_order"].map("{:012d}".format)
    scores["data"] = when.groupby([cells[c] for c in [*ENTRY, "seed"]] + [pd.Series(scores["read"], index=cells.index),
                                  cells["data_sha256"]], dropna=False).transform("max")  # fmt: skip
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
    spec = PERTURBATIONS.get(perturbation)
    if spec is None or preset not in PRESET_ALPHA_255:
        return ""
    return params_text(spec.params(AttackSetting(preset=preset, steps=steps), eps_255))


def _strength_ranks(cells: pd.DataFrame) -> list[int]:
    """Each cell's parameter set ranked among all of its perturbation's by strength."""
    pairs = sorted(set(zip(cells["perturbation"], cells["params"], strict=True)))

    def strength(pair) -> tuple:
        spec = PERTURBATIONS.get(pair[0])
        return spec.strength(json.loads(pair[1] or "{}")) if spec is not None else ()

    order = {pair: rank for rank, pair in enumerate(sorted(pairs, key=lambda p: (p[0], strength(p), p[1])))}
    return [order[pair] for pair in zip(cells["perturbation"], cells["params"], strict=True)]


def seed_metrics(frame: pd.DataFrame, steps: int = DEFAULT_STEPS) -> pd.DataFrame:
    """One row per entry x seed (or ensemble) x metric with `value` (accuracy in %),
    `n_test` and `members`, from the measurements `select_measurements` keeps."""
    return per_seed(select_measurements(frame, steps)[0])


def per_seed(cells: pd.DataFrame) -> pd.DataFrame:
    """The per-seed metrics of selected metric-level cells, `noise` (the mean of the four
    groups, each seed on its own) included."""
    keys = [*ENTRY, "seed", "members"]
    columns = [*keys, "metric", "value", "n_test"]
    if cells.empty:
        return pd.DataFrame(columns=columns)
    long = cells.assign(value=cells["accuracy"] * 100)[columns]
    groups = long[long["metric"].isin(NOISE_GROUPS)]
    complete = groups.groupby(keys, dropna=False)["metric"].transform("nunique") == len(NOISE_GROUPS)
    noise = (
        groups[complete]
        .groupby(keys, dropna=False)
        .agg(value=("value", "mean"), n_test=("n_test", "max"))
        .reset_index()
        .assign(metric="noise")
    )
    return pd.concat([long, noise[columns]], ignore_index=True)


def aggregate(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Long format: one row per entry x metric with `mean`, `std` (sample, NaN for a single
    seed), `n` (seeds averaged; for an ensemble, its members) and `n_test`."""
    columns = [*GROUP, "metric", "mean", "std", "n", "n_test"]
    if per_seed.empty:
        return pd.DataFrame(columns=columns)
    grouped = per_seed.groupby([*GROUP, "metric"], dropna=False)
    out = grouped["value"].agg(mean="mean", std="std", seeds="count").join(
        grouped[["members", "n_test"]].max()
    )
    out["n"] = np.where(out["members"] > 1, out["members"], out["seeds"])
    out[["mean", "std"]] = out[["mean", "std"]].round(6)  # no float dust in the CSVs
    return out.reset_index()[columns]
