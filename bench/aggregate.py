"""Aggregation of the tidy records: pure pandas functions, no I/O, no formatting.

Accuracies become percentages here. A *metric* is `clean`, a noise group (all five
severities pooled), `noise` (the mean of the four groups, the paper's Tables 4-6
number), or `<attack>@<eps in 1/255>` such as `pgd@2`.

A reported number only ever averages cells that measured the same thing. An *entry* is
one run (or its ensemble) on one data set under one preset; where an entry was measured
in several ways, `select_measurements` keeps one, by these rules in this order:
1. the largest test subset (`n_test`): a smoke-sized rerun never hides a full evaluation;
2. the largest ensemble (ensembles of different sizes are different defenses);
3. the most faithful data: released files, then unofficial ones; released noise, then
   generated (from official, then unofficial test files);
4. for IFGSM / PGD, the step count asked for (default 20) with the preset's step size,
   else the most steps, then the largest step size;
5. per seed, the checkpoint measured last (ensembles of the same size, built from
   different seeds, are both current while all their members are).
What the rules leave out is returned too, so that reports can say it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .attacks import ATTACKS
from .evaluate import PRESET_ALPHA_255
from .noise import NOISE_GROUPS, SEVERITIES
from .records import KEY

ENTRY = ["dataset", "model", "run", "lambda_low", "lambda_high", "kind", "preset"]
GROUP = [*ENTRY, "n_test"]
GATE_TOLERANCE = 0.5  # points: differences below this are noise, not a failed gate
DEFAULT_STEPS = 20  # the paper's IFGSM / PGD iterations
SOURCE_RANK = {"released": 4, "unofficial": 3, "generated": 2, "generated-unofficial": 1}
ITERATIVE = ("ifgsm", "pgd")
# the names of the selection rules, as left-out rows carry them
LARGEST_SUBSET, LARGEST_ENSEMBLE, RELEASED_FIRST = "largest test subset", "largest ensemble", "released data first"
LATEST_CHECKPOINT = "latest checkpoint"


def metric_name(perturbation: str, eps_255: float) -> str:
    return f"{perturbation}@{eps_255:g}" if perturbation in ATTACKS else perturbation


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
        **{c: (c, "max" if c == "timestamp" else "sum" if c == "seconds" else "first") for c in rest},
    )
    pooled = pooled[pooled["severities"] == len(SEVERITIES)].reset_index()
    pooled = pooled.drop(columns=["severities", "n"]).rename(columns={"n_sum": "n"})
    pooled["severity"] = 0
    pooled["accuracy"] = pooled["correct"] / pooled["n"]
    return pd.concat([frame, pooled[frame.columns]], ignore_index=True)


def select_measurements(frame: pd.DataFrame, steps: int = DEFAULT_STEPS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, left_out): the records' metric-level cells (severity 0, pooled noise
    included) with `metric`, `kind` and `n_test` columns, one measurement per entry and
    metric (see the module docstring); `left_out` holds the others with the `rule` that
    dropped them. `steps`: the IFGSM / PGD step count preferred."""
    # the store holds each KEY once; a frame put together by hand may not: its first row wins
    cells = with_pooled_noise(frame.drop_duplicates(list(KEY)))
    cells = cells[cells["severity"] == 0].copy()
    noise = cells["perturbation"].isin(NOISE_GROUPS)
    cells["metric"] = [metric_name(p, e) for p, e in zip(cells["perturbation"], cells["eps_255"], strict=True)]
    cells["kind"] = np.where(cells["members"] > 1, "ensemble", "single")
    cells["n_test"] = np.where(noise, cells["n"] // len(SEVERITIES), cells["n"])
    iterative = cells["perturbation"].isin(ITERATIVE)
    asked = (cells["steps"] == steps) & (cells["alpha_255"] == cells["preset"].map(PRESET_ALPHA_255))
    scores = {
        "part": np.where(noise, "noise", "clean"),
        "source": cells["data_source"].map(SOURCE_RANK).fillna(0),
        "asked": (asked | ~iterative).astype(int),
        "measured": cells.groupby([*ENTRY, "seed", "checkpoint_sha256"], dropna=False)["timestamp"].transform(
            "max"
        ),
    }
    cells = cells.assign(**{f"_{k}": v for k, v in scores.items()})
    rules = (
        (LARGEST_SUBSET, ENTRY, "n_test"),
        (LARGEST_ENSEMBLE, ENTRY, "members"),
        (RELEASED_FIRST, [*ENTRY, "_part"], "_source"),
        (f"{steps} steps at the preset's step size", [*ENTRY, "perturbation"], "_asked"),
        ("most steps", [*ENTRY, "perturbation"], "steps"),
        ("largest step size", [*ENTRY, "perturbation"], "alpha_255"),
        (LATEST_CHECKPOINT, [*ENTRY, "seed"], "_measured"),
    )
    left = []
    for rule, by, score in rules:
        best = cells.groupby(by, dropna=False)[score].transform("max")
        dropped = cells[score] != best
        left.append(cells[dropped].assign(rule=rule))
        cells = cells[~dropped]
    cells = cells.drop(columns=[f"_{k}" for k in scores])
    left_out = pd.concat(left, ignore_index=True).drop(columns=[f"_{k}" for k in scores])
    twice = cells.duplicated([*ENTRY, "seed", "metric"], keep=False)
    if twice.any():  # the rules above leave one cell per entry, seed and metric, or it is a bug
        raise AssertionError(f"measurements still mixed:\n{cells[twice].head()}")
    return cells.reset_index(drop=True), left_out


def seed_metrics(frame: pd.DataFrame, steps: int = DEFAULT_STEPS) -> pd.DataFrame:
    """One row per entry x seed (or ensemble), one column per metric (accuracy in %), plus
    `members`, from the measurements `select_measurements` keeps."""
    return per_seed(select_measurements(frame, steps)[0])


def per_seed(cells: pd.DataFrame) -> pd.DataFrame:
    """The wide per-seed table of selected metric-level cells."""
    keys = [*GROUP, "seed", "members"]
    if cells.empty:
        return pd.DataFrame(columns=keys)
    wide = cells.groupby([*keys, "metric"], dropna=False)["accuracy"].first().unstack("metric") * 100
    if set(NOISE_GROUPS) <= set(wide.columns):
        wide["noise"] = wide[list(NOISE_GROUPS)].mean(axis=1, skipna=False)
    return wide.reset_index()


def aggregate(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Long format: one row per GROUP x metric with `mean`, `std` (sample, NaN for a single
    seed) and `n` (seeds averaged; for an ensemble, its members)."""
    columns = [*GROUP, "metric", "mean", "std", "n"]
    if per_seed.empty:
        return pd.DataFrame(columns=columns)
    metrics = [c for c in per_seed.columns if c not in (*GROUP, "seed", "members")]
    long = per_seed.melt(id_vars=[*GROUP, "seed", "members"], value_vars=metrics, var_name="metric").dropna(
        subset=["value"]
    )
    grouped = long.groupby([*GROUP, "metric"], dropna=False)
    out = grouped["value"].agg(mean="mean", std="std", seeds="count").join(grouped["members"].max())
    out["n"] = np.where(out["members"] > 1, out["members"], out["seeds"])
    out[["mean", "std"]] = out[["mean", "std"]].round(6)  # no float dust in the CSVs
    return out.reset_index()[columns]


def gate_flags(aggregated: pd.DataFrame) -> pd.Series:
    """Sanity gates against gradient masking, per GROUP: `eps-not-monotone` when an
    attack's accuracy rises with the radius, `iterative-weaker-than-fgsm` when IFGSM or PGD
    leaves more accuracy than FGSM at the same radius (both beyond GATE_TOLERANCE).
    Returns the flags joined by ';' ('' when every gate passes), indexed by GROUP."""
    if aggregated.empty:
        return pd.Series(dtype=object)
    wide = aggregated.groupby([*GROUP, "metric"], dropna=False)["mean"].first().unstack("metric")
    flags = pd.Series("", index=wide.index, dtype=object)
    for key, row in wide.iterrows():
        found = []
        for attack in ATTACKS:
            radii = sorted(
                float(c.split("@")[1]) for c in row.index if c.startswith(attack + "@") and pd.notna(row[c])
            )
            values = [row[metric_name(attack, e)] for e in radii]
            if any(b > a + GATE_TOLERANCE for a, b in zip(values, values[1:], strict=False)):
                found.append("eps-not-monotone")
                break
        for column in row.index:
            if column.startswith(("ifgsm@", "pgd@")) and pd.notna(row[column]):
                fgsm = row.get("fgsm@" + column.split("@")[1])
                if pd.notna(fgsm) and row[column] > fgsm + GATE_TOLERANCE:
                    found.append("iterative-weaker-than-fgsm")
                    break
        flags[key] = ";".join(found)
    return flags
