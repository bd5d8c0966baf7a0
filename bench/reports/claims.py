"""The paper's claims, as data, and their verdicts on the records: each is a difference
between two models of one architecture, measured with a paired 95% interval and set
against the published difference where the run can be compared with the paper."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from bench.data.datasets import dataset_info, paper_datasets
from bench.records import stats
from bench.records.selection import best_groups, lambda_key
from bench.reports.measured import Evidence
from bench.reports.published import published, published_value
from bench.reports.tables import TABLES, measured_archs, shown_datasets
from models import ModelEntry, find_model, model_entries, model_entry

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
        if (a := _model(arch, claim.a)) and _model(arch, claim.b) and a.family == claim.family
    ]
    return [*dict.fromkeys(own), *(a for a in found if a not in own)]


def _model(arch: str, side: Side) -> ModelEntry | None:
    return find_model(arch, side[0])


def claim_rows(
    frame: pd.DataFrame, aggregated: pd.DataFrame, preset: str = "paper", evidence: Evidence | None = None
) -> pd.DataFrame:
    """Each claim on each data set shown, measured under `preset`: the measured difference
    with its 95% interval (from `evidence`, the per-example bits; its generator seeded by
    the claim and the cells, so no other claim changes it), the published difference, and
    the verdict: reproduces / inconclusive / contradicts, or why it is not comparable."""
    chosen, paper = best_groups(aggregated[aggregated["preset"] == preset]), published()
    rows = []
    for claim in CLAIMS:
        for dataset in shown_datasets(frame, TABLES[claim.table].datasets):
            for arch in claim_archs(claim, frame, dataset):
                a, b = _model(arch, claim.a), _model(arch, claim.b)
                sides = [
                    _side(chosen, dataset, entry, side, claim.metric)
                    for entry, side in ((a, claim.a), (b, claim.b))
                ]
                measured = math.nan if None in sides else sides[0]["mean"] - sides[1]["mean"]
                low = high = math.nan
                if evidence is not None and None not in sides:
                    seeded = [
                        evidence.seeded(dataset, side["run"], kind, preset, claim.metric)
                        for side, kind in zip(sides, (claim.a[2], claim.b[2]), strict=True)
                    ]
                    if all(seeded):
                        what = (
                            claim.text,
                            claim.table,
                            dataset,
                            arch,
                            preset,
                            *(
                                (side["run"], kind, tuple(s))
                                for side, kind, s in zip(sides, (claim.a[2], claim.b[2]), seeded, strict=True)
                            ),
                        )
                        measured, low, high = evidence.bootstrap.difference(
                            *(list(s.values()) for s in seeded), what
                        )
                published_delta = _paper(paper, claim, dataset, a, b)
                why = _not_comparable(dataset, sides, evidence) if None not in sides else ""
                rows.append(
                    {
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
                )
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


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
    0.01") judged on the trained checkpoints of its panels (run_figures.paper_panels) under
    `preset`: the mean over seeds of each seed's share above 0.01 as the release counts it
    (`measured`: all 54 blocks print_ks logs; 43/54 = 79.6%, 39/54 = 72.2%), with a 95%
    interval over seeds, against the published share; `damped` is the share of the damped
    blocks alone. On those of `datasets` (the measured ones) the paper draws it for.
    `coefficients`: figures.coefficient_table."""
    from bench.reports.run_figures import PUBLISHED, paper_panels, seed_shares

    published = pd.read_csv(PUBLISHED)
    published = published[
        (published["figure"] == 1)
        & (published["metric"] == "share_above_0.01")
        & published["dataset"].isin(datasets)
    ]
    mine = coefficients[paper_panels(coefficients, published, preset)]
    bootstrap = bootstrap or stats.Bootstrap()
    rows = []
    for dataset, model, paper in zip(
        published["dataset"], published["model"], published["value"], strict=True
    ):
        runs = mine[(mine["dataset"] == dataset) & (mine["model"] == model)]
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
