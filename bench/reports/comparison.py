"""Which protocol comes closest to the published numbers: the claims judged under every
preset that has runs, side by side, and each preset's root mean squared distance from the
published cells of Tables 1-3 with a 95% interval (bench.core.presets: every preset is a protocol
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
    paper = paper[
        paper["table"].isin(CLOSEST_TABLES) & (paper["kind"] == "single") & (paper["metric"] != "noise")
    ]
    return paper.drop_duplicates(["dataset", "model", "metric"]).reset_index(drop=True)


def closest_rows(aggregated: pd.DataFrame, evidence: Evidence, presets: list[str]) -> pd.DataFrame:
    """Per preset with comparable runs (full recipe, official data), over the published
    cells of Tables 1-3 that every such preset measured: the root of the mean squared gap
    (measured - published, points) with each cell's sampling variance taken out, and its 95%
    interval; and, for every preset but the closest, how much larger its mean squared gap is
    than the closest's (points squared) with its interval. The variance is taken out because
    a noisy cell's squared gap is too large on average by exactly that variance (E[g^2] =
    gap^2 + Var g): a mean |gap|, or its bootstrap, would favour the preset measured on
    fewer seeds and examples, and its percentile interval could miss its own estimate."""
    found = {p: _comparable_cells(aggregated, evidence, p) for p in presets}
    found = {p: cells for p, cells in found.items() if cells}
    common = sorted(set.intersection(*(set(c) for c in found.values()))) if found else []
    squared = {name: _squared_gap(evidence, name, cells, common) for name, cells in found.items() if common}
    best = min(squared, key=lambda name: squared[name][0]) if squared else None
    rows = []
    for name in found:
        row = dict.fromkeys(CLOSEST_COLUMNS, math.nan) | {"preset": name, "cells": len(common)}
        if name in squared:
            point, draws = squared[name]
            low, high = stats.percentiles(draws)
            row |= {"gap": _root(point), "low": _root(low), "high": _root(high)}
            if name != best:
                behind = draws - squared[best][1]  # independent draws: the presets' runs are distinct
                row |= {
                    "behind": point - squared[best][0],
                    **dict(zip(("behind_low", "behind_high"), stats.percentiles(behind), strict=True)),
                }
        rows.append(row)
    return pd.DataFrame(rows, columns=CLOSEST_COLUMNS)


CLOSEST_COLUMNS = ["preset", "cells", "gap", "low", "high", "behind", "behind_low", "behind_high"]


def _squared_gap(evidence: Evidence, name: str, cells: dict, common: list) -> tuple[float, np.ndarray]:
    """The mean over `common` of (gap^2 - Var gap), unbiased for the protocol's own mean
    squared gap, and its bootstrap draws centred on it (each draw's gap^2 is too large on
    average by Var gap once more, so it loses twice the variance); Var gap is the cell's
    bootstrap variance, drawn by a generator seeded by the cell."""
    points, draws = [], []
    for key in common:
        value, seeded, run = cells[key]
        samples = list(seeded.values())
        gap = 100 * np.mean([s.mean() for s in samples]) - value
        boot = evidence.bootstrap.means(samples, ("closest", name, *key, run, tuple(seeded))) - value
        variance = float(boot.var())
        points.append(gap**2 - variance)
        draws.append(boot**2 - 2 * variance)
    return float(np.mean(points)), np.mean(draws, axis=0)


def _root(squared: float) -> float:
    """A mean squared gap as a gap in points; within sampling noise of none, none."""
    return math.sqrt(max(squared, 0.0))


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
    """Which preset comes closest, in one sentence, with its interval, and whether each other
    preset is told apart from it."""
    measured = closest[closest["gap"].notna()]
    if measured.empty:
        return (
            "No preset has runs that can be set against the published numbers (the full recipe on the "
            "official CIFAR data, measured on the cells of Tables 1-3): none is closer than another yet."
        )
    best = measured.loc[measured["behind"].isna()].iloc[0]
    text = (
        f"root mean squared gap {best['gap']:.2f} [{best['low']:.2f}, {best['high']:.2f}] points over "
        f"the {int(best['cells'])} published cells of Tables 1-3"
    )
    if len(measured) == 1:
        return f"Only preset `{best['preset']}` has runs comparable with the paper: {text}."
    others = [
        f"{'closer than' if low > 0 else 'not told apart from'} `{name}` (its mean squared gap is larger by "
        f"{behind:.2f} [{low:.2f}, {high:.2f}] points²)"
        for name, behind, low, high in zip(
            measured["preset"],
            measured["behind"],
            measured["behind_low"],
            measured["behind_high"],
            strict=True,
        )
        if name != best["preset"]
    ]
    return (
        f"Closest to the published numbers: preset `{best['preset']}`, {text} that every preset measured; "
        f"{'; '.join(others)}."
    )


def render_closest(closest: pd.DataFrame, claims: dict[str, pd.DataFrame]) -> str:
    """The comparison table: preset, source, cells, root mean squared gap [interval], claims reproduced."""
    rows = []
    for name in claims:
        row = closest[closest["preset"] == name]
        gap = (
            "-"
            if row.empty or math.isnan(row["gap"].iloc[0])
            else (f"{row['gap'].iloc[0]:.2f} [{row['low'].iloc[0]:.2f}, {row['high'].iloc[0]:.2f}]")
        )
        judged = claims[name]["verdict"].isin(JUDGED)
        reproduced = f"{int((claims[name]['verdict'] == 'reproduces').sum())} of {int(judged.sum())}"
        rows.append(
            [
                f"`{name}`",
                preset(name).source,
                "-" if row.empty else f"{int(row['cells'].iloc[0])}",
                gap,
                reproduced,
            ]
        )
    return tabulate(
        rows,
        headers=["preset", "protocol", "cells", "root mean squared gap (points)", "claims reproduced"],
        tablefmt="github",
        disable_numparse=True,
    )


def render_claims(claims: pd.DataFrame) -> str:
    """One preset's claims: claim, table, data, measured [interval], paper, verdict."""
    shown = claims.assign(
        measured=[
            with_interval(v, lo, hi)
            for v, lo, hi in zip(claims["measured"], claims["low"], claims["high"], strict=True)
        ],
        paper=claims["paper"].map(lambda v: "-" if math.isnan(v) else f"{v:+.2f}"),
        dataset=claims["dataset"].map(dataset_label),
    )[["claim", "table", "dataset", "measured", "paper", "verdict"]]
    return tabulate(
        shown.values.tolist(),
        headers=["claim", "table", "data", "measured", "paper", "verdict"],
        tablefmt="github",
        disable_numparse=True,
    )


def render_shares(shares: pd.DataFrame) -> str:
    """Fig. 1's claims as a table: claim, data, seeds, the share as the release counts it
    [interval], the damped blocks' share, paper, verdict."""
    rows = [
        [
            claim,
            dataset_label(dataset),
            f"{seeds}",
            "-"
            if math.isnan(value)
            else f"{value:.1f}" + ("" if math.isnan(low) else f" [{low:.1f}, {high:.1f}]"),
            "-" if math.isnan(damped) else f"{damped:.1f}",
            f"{paper:.1f}",
            verdict,
        ]
        for claim, dataset, seeds, value, low, high, damped, paper, verdict in zip(
            shares["claim"],
            shares["dataset"],
            shares["seeds"],
            shares["measured"],
            shares["low"],
            shares["high"],
            shares["damped"],
            shares["paper"],
            shares["verdict"],
            strict=True,
        )
    ]
    return tabulate(
        rows,
        headers=["claim", "data", "seeds", "all blocks (%)", "damped blocks (%)", "paper (%)", "verdict"],
        tablefmt="github",
        disable_numparse=True,
    )


def with_interval(value: float, low: float, high: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.2f}" + ("" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]")
