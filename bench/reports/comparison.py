"""Which protocol comes closest to the published numbers: the claims judged under every
preset that has runs, side by side, and each preset's mean distance from the published
cells of Tables 1-3 with a 95% interval (bench.core.presets: every preset is a protocol
that could have made the paper's tables; docs/PROTOCOL.md says which code each follows)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench.core.presets import PRESET_NAMES, preset
from bench.data.datasets import dataset_info, dataset_label
from bench.records import stats
from bench.records.selection import best_groups, lambda_key
from bench.reports.measured import Evidence
from bench.reports.published import published
from models import list_models, model_entry

CLOSEST_TABLES = (1, 2, 3)  # the published single-model cells a preset is measured against
JUDGED = ("reproduces", "inconclusive", "contradicts")


def presets_with_runs(aggregated: pd.DataFrame, first: str) -> list[str]:
    """`first` (the run's preset, whose tables the report shows), then every other preset
    with records, in the registry's order."""
    present = set(aggregated["preset"])
    return [first, *(p for p in PRESET_NAMES if p in present and p != first)]


def published_cells() -> pd.DataFrame:
    """The published single-model cells of Tables 1-3 (the four noise groups, not their
    average), each (data set, model, metric) once."""
    paper = published()
    paper = paper[paper["table"].isin(CLOSEST_TABLES) & (paper["kind"] == "single") & (paper["metric"] != "noise")]
    return paper.drop_duplicates(["dataset", "model", "metric"]).reset_index(drop=True)


def closest_rows(aggregated: pd.DataFrame, evidence: Evidence, presets: list[str]) -> pd.DataFrame:
    """Per preset with comparable runs (full recipe, official data): the mean over the
    published cells of Tables 1-3 that every such preset measured of |measured - published|
    (points) with its 95% interval (each cell's bootstrap draws, seeded by the cell), and
    the cells compared."""
    found = {p: _comparable_cells(aggregated, evidence, p) for p in presets}
    found = {p: cells for p, cells in found.items() if cells}
    common = sorted(set.intersection(*(set(c) for c in found.values()))) if found else []
    rows = []
    for name, cells in found.items():
        gap = low = high = math.nan
        if common:
            gaps = [abs(100 * np.mean([s.mean() for s in cells[k][1].values()]) - cells[k][0]) for k in common]
            draws = np.mean([np.abs(evidence.bootstrap.means(list(cells[k][1].values()), ("closest", name, *k, cells[k][2],
                                                                                           tuple(cells[k][1])))
                                    - cells[k][0]) for k in common], axis=0)  # fmt: skip
            gap, (low, high) = float(np.mean(gaps)), stats.percentiles(draws)
        rows.append({"preset": name, "cells": len(common), "gap": gap, "low": low, "high": high})
    return pd.DataFrame(rows, columns=["preset", "cells", "gap", "low", "high"])


def _comparable_cells(aggregated: pd.DataFrame, evidence: Evidence, name: str) -> dict:
    """(table, data set, model, metric) -> (published, {seed: per-example}, run) of the
    published cells `name`'s runs measured with the full recipe on the official data."""
    chosen, out = best_groups(aggregated[aggregated["preset"] == name]), {}
    for row in published_cells().itertuples(index=False):
        if row.model not in list_models() or not dataset_info(row.dataset).paper:
            continue
        entry = model_entry(row.model)
        init = entry.damped_lambda_init if math.isnan(row.lambda_low) else (row.lambda_low, row.lambda_high)
        hit = chosen.get((row.dataset, row.model, lambda_key(init), "single", row.metric))
        if hit is None or evidence.departures(row.dataset, hit["run"]):
            continue
        seeded = evidence.seeded(row.dataset, hit["run"], "single", name, row.metric)
        if seeded:
            out[(int(row.table), row.dataset, row.model, row.metric)] = (float(row.value), seeded, hit["run"])
    return out


def closest_sentence(closest: pd.DataFrame) -> str:
    """Which preset comes closest, in one sentence, with its interval."""
    measured = closest[closest["gap"].notna()]
    if measured.empty:
        return ("No preset has runs that can be set against the published numbers (the full recipe on the "
                "official CIFAR data, measured on the cells of Tables 1-3): none is closer than another yet.")  # fmt: skip
    best = measured.loc[measured["gap"].idxmin()]
    text = (f"mean |measured - published| {best['gap']:.2f} [{best['low']:.2f}, {best['high']:.2f}] points over "
            f"the {int(best['cells'])} published cells of Tables 1-3")  # fmt: skip
    if len(measured) == 1:
        return f"Only preset `{best['preset']}` has runs comparable with the paper: {text}."
    overlapping = [f"`{p}`" for p, lo in zip(measured["preset"], measured["low"], strict=True)
                   if p != best["preset"] and lo <= best["high"]]  # fmt: skip
    tail = (f"; its interval overlaps that of {', '.join(overlapping)}, so these runs do not tell them apart"
            if overlapping else "; its interval lies clear of every other preset's")  # fmt: skip
    return f"Closest to the published numbers: preset `{best['preset']}`, {text} that every preset measured{tail}."


def render_closest(closest: pd.DataFrame, claims: dict[str, pd.DataFrame]) -> str:
    """The comparison table: preset, source, cells, mean |gap| [interval], claims reproduced."""
    rows = []
    for name in claims:
        row = closest[closest["preset"] == name]
        gap = "-" if row.empty or math.isnan(row["gap"].iloc[0]) else (
            f"{row['gap'].iloc[0]:.2f} [{row['low'].iloc[0]:.2f}, {row['high'].iloc[0]:.2f}]")  # fmt: skip
        judged = claims[name]["verdict"].isin(JUDGED)
        reproduced = f"{int((claims[name]['verdict'] == 'reproduces').sum())} of {int(judged.sum())}"
        rows.append([f"`{name}`", preset(name).source, "-" if row.empty else f"{int(row['cells'].iloc[0])}", gap, reproduced])
    return tabulate(rows, headers=["preset", "protocol", "cells", "mean |measured - published|", "claims reproduced"],
                    tablefmt="github", disable_numparse=True)  # fmt: skip


def render_claims(claims: pd.DataFrame) -> str:
    """One preset's claims: claim, table, data, measured [interval], paper, verdict."""
    shown = claims.assign(
        measured=[with_interval(v, lo, hi) for v, lo, hi in zip(claims["measured"], claims["low"], claims["high"], strict=True)],
        paper=claims["paper"].map(lambda v: "-" if math.isnan(v) else f"{v:+.2f}"),
        dataset=claims["dataset"].map(dataset_label),
    )[["claim", "table", "dataset", "measured", "paper", "verdict"]]
    return tabulate(shown.values.tolist(), headers=["claim", "table", "data", "measured", "paper", "verdict"],
                    tablefmt="github", disable_numparse=True)  # fmt: skip


def render_shares(shares: pd.DataFrame) -> str:
    """Fig. 1's claims as a table: claim, data, seeds, the share as the release counts it
    [interval], the damped blocks' share, paper, verdict."""
    rows = [
        [claim, dataset_label(dataset), f"{seeds}",
         "-" if math.isnan(value) else f"{value:.1f}" + ("" if math.isnan(low) else f" [{low:.1f}, {high:.1f}]"),
         "-" if math.isnan(damped) else f"{damped:.1f}", f"{paper:.1f}", verdict]
        for claim, dataset, seeds, value, low, high, damped, paper, verdict in zip(
            shares["claim"], shares["dataset"], shares["seeds"], shares["measured"], shares["low"], shares["high"],
            shares["damped"], shares["paper"], shares["verdict"], strict=True)
    ]  # fmt: skip
    return tabulate(rows, headers=["claim", "data", "seeds", "all blocks (%)", "damped blocks (%)", "paper (%)",
                                   "verdict"], tablefmt="github", disable_numparse=True)  # fmt: skip


def with_interval(value: float, low: float, high: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.2f}" + ("" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]")
