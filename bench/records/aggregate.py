"""Aggregation of the tidy records: pure pandas functions, no I/O, no formatting.

Accuracies become percentages here. A *metric* is `clean`, a noise group (all five
severities pooled), `noise` (the mean of the four groups, the paper's Tables 4-6
number), `corruptions` (the mean of RobustBench's 15), or `<attack>@<eps in 1/255>` such as `pgd@2` (bench.attacks.perturbations names them).

A reported number only ever averages cells that measured the same thing. An *entry* is
one run (or its ensemble) on one data set under one preset; which of an entry's
measurements of a cell counts is decided in bench.records.selection.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from bench.attacks.gradient import LINF
from bench.attacks.perturbations import ATTACK, file_groups, of_kind, params_text, pooled_noise
from bench.data.noise import CORRUPTIONS, SEVERITIES
from bench.records.load import cell_id
from bench.records.schema import KEY

ENTRY = ["dataset", "model", "run", "lambda_low", "lambda_high", "kind", "preset"]
GROUP = ENTRY  # one aggregate per entry and metric


def with_pooled_noise(frame: pd.DataFrame) -> pd.DataFrame:
    """Add, per model x data set x seed x measurement (the KEY but the severity), the
    accuracy of each noise group over all five severities (the paper's Table 1 number) as
    rows with severity 0 and n = 5 x the images per severity, where all five exist."""
    noise = frame[frame["perturbation"].isin(file_groups()) & (frame["severity"] > 0)]
    group = [k for k in KEY if k != "severity"] + ["model", "family", "lambda_low", "lambda_high"]
    group += ["stale"] if "stale" in frame else []
    rest = [c for c in frame.columns if c not in group and c not in ("severity", "n", "correct", "accuracy")]
    pooled = noise.groupby(group, dropna=False).agg(
        severities=("severity", "nunique"),
        n_sum=("n", "sum"),
        correct=("correct", "sum"),
        **{
            c: (c, "max" if c in ("timestamp", "_order") else "sum" if c == "seconds" else "first")
            for c in rest
        },
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
    # the L-infinity attacks: an L2 radius is another threat model, never the same ball
    attacks = frame[frame["perturbation"].isin([p.name for p in of_kind(ATTACK) if p.norm == LINF])]
    attacks = attacks.assign(
        _subset=attacks["params"].map(subset_of)
    )  # RobustBench's first n: its own images
    group = [
        "_subset",
        "run",
        "dataset",
        "data_source",
        "data_sha256",
        "seed",
        "members",
        "preset",
        "checkpoint_sha256",
        "n",
        "eps_255",
    ]
    rows = []
    for _, cells in attacks.groupby(group, dropna=False, sort=False):
        found = [bits.get(cell_id(row)) for row in cells.itertuples(index=False)]
        measured = [b for b in found if b is not None]
        if cells["perturbation"].nunique() < 2 or len(measured) < len(found):
            continue
        correct = np.logical_and.reduce(measured)
        of = sorted(set(cells["perturbation"]))
        row = {
            **cells.iloc[0].to_dict(),
            "perturbation": "worst",
            "params": params_text(
                {"of": of, **({"subset": rule} if (rule := cells.iloc[0]["_subset"]) else {})}
            ),
            "correct": int(correct.sum()),
            "accuracy": float(correct.mean()),
            "seconds": 0.0,
            "timestamp": cells["timestamp"].max(),
        }
        bits[cell_id(row)] = correct  # intervals of the worst case need its bits too
        rows.append(row)
    return pd.concat([frame, pd.DataFrame(rows, columns=frame.columns)], ignore_index=True) if rows else frame


def mean_metrics() -> dict[str, list[str]]:
    """The metrics that average others, each seed on its own, where all of them were
    measured: `noise` (the paper's Avg. of the four noise groups), `corruptions`
    (RobustBench's corruptions_acc: the mean over its 15 corruptions and 5 severities)."""
    return {"noise": pooled_noise(), "corruptions": list(CORRUPTIONS)}


def subset_of(params: str) -> str:
    """The subset rule a cell's params record (bench.eval.protocol.EvalConfig.subset_params):
    "" for ours (class-balanced), "first" for RobustBench's."""
    return str(json.loads(params or "{}").get("subset", ""))


def per_seed(cells: pd.DataFrame) -> pd.DataFrame:
    """The per-seed metrics of selected metric-level cells, the means of `mean_metrics`
    included."""
    keys = [*ENTRY, "seed", "members"]
    columns = [*keys, "metric", "value", "n_test"]
    if cells.empty:
        return pd.DataFrame(columns=columns)
    long = cells.assign(value=cells["accuracy"] * 100)[columns]
    means = [long]
    for name, parts in mean_metrics().items():
        groups = long[long["metric"].isin(parts)]
        complete = groups.groupby(keys, dropna=False)["metric"].transform("nunique") == len(parts)
        means.append(
            groups[complete]
            .groupby(keys, dropna=False)
            .agg(value=("value", "mean"), n_test=("n_test", "max"))
            .reset_index()
            .assign(metric=name)[columns]
        )
    return pd.concat(means, ignore_index=True)


def aggregate(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Long format: one row per entry x metric with `mean`, `std` (sample, NaN for a single
    seed), `n` (seeds averaged; for an ensemble, its members) and `n_test`."""
    columns = [*GROUP, "metric", "mean", "std", "n", "n_test"]
    if per_seed.empty:
        return pd.DataFrame(columns=columns)
    grouped = per_seed.groupby([*GROUP, "metric"], dropna=False)
    out = (
        grouped["value"].agg(mean="mean", std="std", seeds="count").join(grouped[["members", "n_test"]].max())
    )
    out["n"] = np.where(out["members"] > 1, out["members"], out["seeds"])
    out[["mean", "std"]] = out[["mean", "std"]].round(6)  # no float dust in the CSVs
    return out.reset_index()[columns]
