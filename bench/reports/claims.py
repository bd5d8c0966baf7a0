"""The paper's claims, as data, and their verdicts on the records: each is a difference
between two models of one architecture, measured with a paired 95% interval and set
against the published difference where the run can be compared with the paper.

Which protocol comes closest to the published numbers: the claims judged under every
preset that has runs, side by side, and each preset's root mean squared distance from the
published cells of Tables 1-3 with a 95% interval (bench.core.presets: every preset is a protocol
that could have made the paper's tables; docs/PROTOCOL.md says which code each follows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench.core.presets import PRESET_NAMES, preset
from bench.data.datasets import dataset_info, dataset_label, paper_datasets
from bench.records import stats
from bench.records.selection import best_groups, lambda_key
from bench.reports.measured import Evidence
from bench.reports.tables import TABLES, measured_archs, published, published_value, shown_datasets
from models import ModelEntry, find_model, list_models, model_entries, model_entry

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
            if best is not None and name != best:
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


Side = tuple[str, "tuple[float, float] | None", str]  # (skip rule, λ init or None: the default, kind)


@dataclass(frozen=True)
class Claim:
    """`a` minus `b` on `metric`, as Table `table` reports it, for two models of one
    architecture of `family`; each side is (skip rule, λ initialisation or None for the
    model's default, "single" or "ensemble"); `text` names them {a} and {b}."""

    text: str
    table: int
    metric: str
    a: Side
    b: Side
    family: str = "preact-resnet"


CLAIMS = (
    Claim(
        "{a} beats {b} on the noise groups (avg.)",
        1,
        "noise",
        ("in", None, "single"),
        ("residual", None, "single"),
    ),
    Claim(
        "{a} beats {b} under PGD at 2/255", 3, "pgd@2", ("in", None, "single"), ("residual", None, "single")
    ),
    Claim(
        "{a} beats {b} under PGD at 2/255",
        3,
        "pgd@2",
        ("lambda-in", None, "single"),
        ("residual", None, "single"),
    ),
    Claim(
        "{a} is more accurate than {b} on clean data",
        2,
        "clean",
        ("residual", None, "single"),
        ("in", None, "single"),
    ),
    Claim(
        "the ensemble of {a} beats its single models under PGD at 2/255",
        6,
        "pgd@2",
        ("in", None, "ensemble"),
        ("in", None, "single"),
    ),
    Claim(
        "λ ~ U[0.3, 0.4] makes {a} more robust than U[0, 0.1] (PGD at 2/255)",
        5,
        "pgd@2",
        ("in", (0.3, 0.4), "single"),
        ("in", (0.0, 0.1), "single"),
    ),
)


def claim_archs(claim: Claim, frame: pd.DataFrame, dataset: str) -> list[str]:
    """The architectures a claim is judged on: on the paper's data sets those of its table's
    rows; then every other architecture of its family measured on `dataset`, each judged on
    its own (labelled with its depth, never set against the paper's depths)."""
    own = [
        e.arch
        for e in model_entries()
        if dataset in paper_datasets() and claim.table in e.tables and e.family == claim.family
    ]
    found = [
        arch
        for arch in measured_archs(frame, dataset, claim.table)
        if (a := find_model(arch, claim.a[0])) and find_model(arch, claim.b[0]) and a.family == claim.family
    ]
    return [*dict.fromkeys(own), *(a for a in found if a not in own)]


def _model(arch: str, side: Side) -> ModelEntry:
    """The registered model of one side of a claim (claim_archs keeps the archs with both)."""
    entry = find_model(arch, side[0])
    if entry is None:
        raise KeyError(f"no registered model applies the {side[0]} rule to {arch}")
    return entry


def claim_rows(
    frame: pd.DataFrame, aggregated: pd.DataFrame, preset: str = "paper", evidence: Evidence | None = None
) -> pd.DataFrame:
    """Each claim on each data set shown, measured under `preset`: the measured difference
    with its 95% interval (from `evidence`, the per-example bits; its generator seeded by
    the claim and the cells, so no other claim changes it), the published difference, and
    the verdict: reproduces / inconclusive / contradicts, or why it is not comparable."""
    chosen, paper = best_groups(aggregated[aggregated["preset"] == preset]), published()
    rows = [
        _claim_row(claim, dataset, arch, chosen, paper, preset, evidence)
        for claim in CLAIMS
        for dataset in shown_datasets(frame, TABLES[claim.table].datasets)
        for arch in claim_archs(claim, frame, dataset)
    ]
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def _claim_row(
    claim: Claim,
    dataset: str,
    arch: str,
    chosen: dict,
    paper: pd.DataFrame,
    preset: str,
    evidence: Evidence | None,
) -> dict:
    a, b = _model(arch, claim.a), _model(arch, claim.b)
    first, second = (
        _side(chosen, dataset, entry, side, claim.metric) for entry, side in ((a, claim.a), (b, claim.b))
    )
    measured = low = high = math.nan
    why = ""
    if first is not None and second is not None:
        measured = first["mean"] - second["mean"]
        why = _not_comparable(dataset, [first, second], evidence)
        interval = (
            None if evidence is None else _interval(claim, dataset, arch, preset, (first, second), evidence)
        )
        if interval is not None:
            measured, low, high = interval
    published_delta = _paper(paper, claim, dataset, a, b)
    return {
        "claim": claim.text.format(a=a.label, b=b.label),
        "table": claim.table,
        "dataset": dataset,
        "preset": preset,
        "measured": measured,
        "low": low,
        "high": high,
        "paper": published_delta,
        "verdict": _verdict(measured, low, high, published_delta, why),
    }


def _interval(
    claim: Claim, dataset: str, arch: str, preset: str, sides: tuple[dict, dict], evidence: Evidence
) -> tuple[float, float, float] | None:
    """The measured difference and its 95% interval over seeds and examples; None when a
    side has no per-example bits."""
    kinds = (claim.a[2], claim.b[2])
    seeded = [
        evidence.seeded(dataset, side["run"], kind, preset, claim.metric)
        for side, kind in zip(sides, kinds, strict=True)
    ]
    if not all(seeded):
        return None
    what = (
        claim.text,
        claim.table,
        dataset,
        arch,
        preset,
        *((side["run"], kind, tuple(s)) for side, kind, s in zip(sides, kinds, seeded, strict=True)),
    )
    first, second = (list(s.values()) for s in seeded)
    return evidence.bootstrap.difference(first, second, what)


CLAIM_COLUMNS = ["claim", "table", "dataset", "preset", "measured", "low", "high", "paper", "verdict"]


def _side(chosen: dict, dataset: str, entry: ModelEntry, side: Side, metric: str) -> dict | None:
    init = side[1] if side[1] is not None else entry.damped_lambda_init
    return chosen.get((dataset, entry.name, lambda_key(init), side[2], metric))


def _paper(paper: pd.DataFrame, claim: Claim, dataset: str, a: ModelEntry, b: ModelEntry) -> float:
    table = paper[paper["table"] == claim.table]
    first, second = (
        published_value(
            table, dataset, entry.name, side[1] or entry.damped_lambda_init, side[2], claim.metric
        )
        for entry, side in ((a, claim.a), (b, claim.b))
    )
    return first - second


def _not_comparable(dataset: str, sides: list[dict], evidence: Evidence | None) -> str:
    """Why a measured difference cannot be set against the paper's ('' when it can): only
    runs of the full recipe (full length, all training images) on the official data are,
    under any preset (each is a protocol that could have made the published numbers)."""
    if not dataset_info(dataset).paper:
        return dataset_info(dataset).not_compared()
    reasons = (
        [] if evidence is None else [r for side in sides for r in evidence.departures(dataset, side["run"])]
    )
    return ", ".join(dict.fromkeys(reasons))


def _verdict(measured: float, low: float, high: float, paper: float, why: str) -> str:
    if math.isnan(measured):
        return "not measured"
    if why:
        return f"not comparable with the paper ({why})"
    if math.isnan(paper):
        return "the paper has no number"
    if math.isnan(low):
        return "no interval (no per-example records)"
    return stats.verdict(low, high, paper)


# --- Fig. 1: the share of coefficients above 0.01 ----------------------------------------------


def share_claim_rows(
    coefficients: pd.DataFrame,
    datasets: set[str],
    preset: str = "paper",
    evidence: Evidence | None = None,
    bootstrap: stats.Bootstrap | None = None,
) -> pd.DataFrame:
    """The paper's Fig. 1 claim ("79.6% (72.2%) of the λ_n of In-ResNet-110 (164) are above
    0.01") judged on the trained checkpoints of its panels (plotting.paper_panels) under
    `preset`: the mean over seeds of each seed's share above 0.01 as the release counts it
    (`measured`: all 54 blocks print_ks logs; 43/54 = 79.6%, 39/54 = 72.2%), with a 95%
    interval over seeds, against the published share; `damped` is the share of the damped
    blocks alone. On those of `datasets` (the measured ones) the paper draws it for.
    `coefficients`: figures.coefficient_table."""
    from bench.reports.plotting import PUBLISHED, paper_panels, seed_shares

    published = pd.read_csv(PUBLISHED)
    published = published[
        (published["figure"] == 1)
        & (published["metric"] == "share_above_0.01")
        & published["dataset"].isin(datasets)
    ]
    paper_runs = coefficients[paper_panels(coefficients, published, preset)]
    bootstrap = bootstrap or stats.Bootstrap()
    rows = []
    for dataset, model, paper in zip(
        published["dataset"], published["model"], published["value"], strict=True
    ):
        runs = paper_runs[(paper_runs["dataset"] == dataset) & (paper_runs["model"] == model)]
        shares = (
            pd.concat([seed_shares(r) for _, r in runs.groupby("run")]) if len(runs) else seed_shares(runs)
        )
        measured = float(shares["logged"].mean()) if len(shares) else math.nan
        what = (
            "fig1-share",
            dataset,
            model,
            preset,
            tuple(dict.fromkeys(runs["run"])),
            tuple(shares["seed"]),
        )
        low, high = bootstrap.over_seeds(shares["logged"].tolist(), what)
        why = _not_comparable(dataset, [{"run": r} for r in dict.fromkeys(runs["run"])], evidence)
        if math.isnan(measured):
            verdict = "not measured"
        elif why:
            verdict = f"not comparable with the paper ({why})"
        else:
            verdict = stats.level_verdict(low, high, paper, PUBLISHED_SHARE_RESOLUTION)
        rows.append(
            {
                "claim": f"{paper:.1f}% of {model_entry(model).label}'s coefficients act(λ_n) are above 0.01",
                "figure": 1,
                "dataset": dataset,
                "preset": preset,
                "measured": measured,
                "low": low,
                "high": high,
                "damped": float(shares["damped"].mean()) if len(shares) else math.nan,
                "paper": paper,
                "seeds": len(shares),
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows, columns=SHARE_COLUMNS)


SHARE_COLUMNS = [
    "claim",
    "figure",
    "dataset",
    "preset",
    "measured",
    "low",
    "high",
    "damped",
    "paper",
    "seeds",
    "verdict",
]
PUBLISHED_SHARE_RESOLUTION = 0.1  # the paper prints shares to 0.1%: 43/54 = 79.63% is its 79.6
