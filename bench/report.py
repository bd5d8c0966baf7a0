"""Reports, regenerated in seconds from the records alone (`--stage report`).

Writes under the results dir: `records.csv`; `tables/table<k>.{md,csv,tex}` with the
Appendix-D view (`table<k>_std.md`) and the measured-vs-paper view
(`table<k>_vs_paper.md`); `REPORT.md` (which of the paper's claims reproduce); and the
leaderboard (`leaderboard.csv`, `leaderboard.md`, `leaderboard/<dataset>/<name>.json`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from models import UserError
from models.checkpoints import atomic_write

from .aggregate import GROUP, aggregate, gate_flags, seed_metrics
from .records import load_records, load_runs, write_snapshot
from .tables import (
    DATASET_LABELS,
    PAPER_DATASETS,
    TITLES,
    best_groups,
    default_lambda,
    depths,
    fill,
    lambda_key,
    missing,
    published,
    published_value,
    render,
    shown_datasets,
    table_specs,
    with_failed_runs,
)

LEADERBOARD_METRICS = ("clean", "noise", "fgsm@2", "ifgsm@2", "pgd@2")


@dataclass(frozen=True)
class Claim:
    """`a` minus `b` on `metric`, as Table `table` reports it; models are templates on the
    depth, members "single" or "ensemble", λ None for the default initialisation."""

    text: str
    table: int
    metric: str
    a: tuple[str, tuple[float, float] | None, str]
    b: tuple[str, tuple[float, float] | None, str]


CLAIMS = (
    Claim(
        "In-ResNet-{d} beats ResNet-{d} on the noise groups (avg.)",
        1,
        "noise",
        ("in-resnet{d}", None, "single"),
        ("resnet{d}", None, "single"),
    ),
    Claim(
        "In-ResNet-{d} beats ResNet-{d} under PGD at 2/255",
        3,
        "pgd@2",
        ("in-resnet{d}", None, "single"),
        ("resnet{d}", None, "single"),
    ),
    Claim(
        "λ-In-ResNet-{d} beats ResNet-{d} under PGD at 2/255",
        3,
        "pgd@2",
        ("lambda-in-resnet{d}", None, "single"),
        ("resnet{d}", None, "single"),
    ),
    Claim(
        "ResNet-{d} is more accurate than In-ResNet-{d} on clean data",
        2,
        "clean",
        ("resnet{d}", None, "single"),
        ("in-resnet{d}", None, "single"),
    ),
    Claim(
        "the ensemble of In-ResNet-{d} beats its single models under PGD at 2/255",
        6,
        "pgd@2",
        ("in-resnet{d}", None, "ensemble"),
        ("in-resnet{d}", None, "single"),
    ),
    Claim(
        "λ ~ U[0.3, 0.4] makes In-ResNet-{d} more robust than U[0, 0.1] (PGD at 2/255)",
        5,
        "pgd@2",
        ("in-resnet{d}", (0.3, 0.4), "single"),
        ("in-resnet{d}", (0.0, 0.1), "single"),
    ),
)


def write_reports(
    results_dir: str | os.PathLike, preset: str = "paper", rank_by: str = "pgd@2"
) -> list[Path]:
    """Regenerate every report from the records; returns the paths written."""
    results = Path(results_dir)
    frame, runs = load_records(results), load_runs(results)
    aggregated = aggregate(seed_metrics(frame))
    written = [write_snapshot(results)]
    tables = {}
    for number in range(1, 7):
        filled = fill(table_specs(number, frame), aggregated, preset, number)
        if number == 5:
            filled = with_failed_runs(filled, runs)
        tables[number] = filled
        written += _write_table(results / "tables", number, filled)
    written.append(_write(results / "REPORT.md", render_report(frame, aggregated, tables, preset)))
    board = leaderboard(frame, aggregated, preset, rank_by)
    written += write_leaderboard(results, board)
    return written


def _write(path: Path, text: str) -> Path:
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _write_table(folder: Path, number: int, filled: pd.DataFrame) -> list[Path]:
    note = missing(filled)
    footer = ("\n\n" + note if note else "") + "\n"
    title = f"# {TITLES[number]}\n\n"
    return [
        _write(folder / f"table{number}.md", title + render(filled) + footer),
        _write(
            folder / f"table{number}_std.md",
            title + "Mean ± sample std over seeds (Appendix D).\n\n" + render(filled, "std") + footer,
        ),
        _write(
            folder / f"table{number}_vs_paper.md",
            title + "Measured / published (measured - published).\n\n" + render(filled, "paper") + footer,
        ),
        _write(folder / f"table{number}.csv", filled.to_csv(index=False)),
        _write(folder / f"table{number}.tex", render(filled, fmt="latex_booktabs") + "\n"),
    ]


# --- REPORT.md --------------------------------------------------------------------------------


def claim_rows(frame: pd.DataFrame, aggregated: pd.DataFrame, preset: str = "paper") -> pd.DataFrame:
    """Each claim on each data set shown: measured and published difference, and verdict."""
    chosen, paper = best_groups(aggregated[aggregated["preset"] == preset]), published()
    rows = []
    for claim in CLAIMS:
        for dataset in shown_datasets(
            frame, paper=("cifar10",) if claim.table in (4, 5, 6) else PAPER_DATASETS
        ):
            for d in depths(frame, dataset)[: 1 if claim.table == 5 else None]:
                measured = _value(chosen, dataset, claim.a, claim.metric, d) - _value(
                    chosen, dataset, claim.b, claim.metric, d
                )
                published_delta = _paper(paper, claim, dataset, d)
                rows.append(
                    {
                        "claim": claim.text.format(d=d),
                        "table": claim.table,
                        "dataset": dataset,
                        "measured": measured,
                        "paper": published_delta,
                        "verdict": _verdict(measured, published_delta, dataset),
                    }
                )
    return pd.DataFrame(rows)


def _value(chosen: dict, dataset: str, side, metric: str, d: int) -> float:
    model = side[0].format(d=d)
    init = side[1] if side[1] is not None else default_lambda(model)
    found = chosen.get((dataset, model, lambda_key(init), side[2], metric))
    return found["mean"] if found is not None else math.nan


def _paper(paper: pd.DataFrame, claim: Claim, dataset: str, d: int) -> float:
    table = paper[paper["table"] == claim.table]
    a, b = (
        published_value(
            table, dataset, model.format(d=d), init or default_lambda(model.format(d=d)), kind, claim.metric
        )
        for model, init, kind in (claim.a, claim.b)
    )
    return a - b


def _verdict(measured: float, paper: float, dataset: str) -> str:
    if math.isnan(measured):
        return "not measured"
    if dataset not in PAPER_DATASETS:
        return "synthetic data: not compared with the paper"
    if math.isnan(paper):
        return "the paper has no number"
    return "reproduces (same direction)" if (measured > 0) == (paper > 0) else "does not reproduce"


def render_report(frame: pd.DataFrame, aggregated: pd.DataFrame, tables: dict, preset: str) -> str:
    lines = ["# inres-bench report", ""]
    if frame.empty:
        return "\n".join([*lines, "No records yet: run the eval stage first.", ""])
    sources = frame.groupby("dataset")["data_source"].agg(lambda s: ", ".join(sorted(set(s))))
    lines += [
        f"Generated from {len(frame)} current records (preset `{preset}` in the tables).",
        "",
        "Data (data set: sources of its cells): "
        + "; ".join(f"{DATASET_LABELS.get(d, d)}: {s}" for d, s in sources.items())
        + ".",
    ]
    if "synthetic" in set(frame["dataset"]):
        lines += [
            "",
            "Synthetic-data numbers check the pipeline only: they are never compared with the paper's CIFAR numbers.",
        ]
    claims = claim_rows(frame, aggregated, preset)
    shown = claims.assign(
        measured=claims["measured"].map(lambda v: "-" if math.isnan(v) else f"{v:+.2f}"),
        paper=claims["paper"].map(lambda v: "-" if math.isnan(v) else f"{v:+.2f}"),
        dataset=claims["dataset"].map(lambda d: DATASET_LABELS.get(d, d)),
    )
    lines += [
        "",
        "## The paper's claims",
        "",
        "Differences in accuracy points (first model minus second).",
        "",
    ]
    lines += [
        tabulate(
            shown.values.tolist(),
            headers=["claim", "table", "data", "measured", "paper", "verdict"],
            tablefmt="github",
            disable_numparse=True,
        )
    ]
    lines += ["", "## Tables", ""]
    for number, filled in tables.items():
        measured = int(filled["mean"].notna().sum())
        lines.append(
            f"- [Table {number}](tables/table{number}.md): {measured} of {len(filled)} cells measured "
            f"([± std](tables/table{number}_std.md), [vs paper](tables/table{number}_vs_paper.md))"
        )
    return "\n".join(lines) + "\n"


# --- leaderboard -------------------------------------------------------------------------------


def leaderboard(
    frame: pd.DataFrame, aggregated: pd.DataFrame, preset: str = "paper", rank_by: str = "pgd@2"
) -> pd.DataFrame:
    """One row per run (or ensemble) x data set, on its largest evaluated test set, ranked by
    `rank_by` (descending; unmeasured last). Accuracies in %."""
    if rank_by not in set(aggregated["metric"]) | set(LEADERBOARD_METRICS):
        raise UserError(
            f"--rank-by {rank_by!r} is not a measured metric; e.g. {', '.join(LEADERBOARD_METRICS)}"
        )
    # a sentinel for "no λ": NaN keys do not align between the pieces joined below
    mine = aggregated[aggregated["preset"] == preset].fillna({"lambda_low": -1.0, "lambda_high": -1.0})
    wide = mine.groupby([*GROUP, "metric"], dropna=False)["mean"].first().unstack("metric")
    seeds = mine[mine["metric"] == "clean"].set_index(GROUP)["n"]
    wide = wide.reindex(columns=sorted(set(wide.columns) | set(LEADERBOARD_METRICS) | {rank_by}))
    board = wide.assign(seeds=seeds.astype("Int64"), flags=gate_flags(mine)).reset_index()
    board = board.sort_values("n_test").drop_duplicates(["dataset", "run", "kind"], keep="last")
    digests = frame.groupby(["dataset", "run", "members"])["checkpoint_sha256"].agg(lambda s: sorted(set(s)))
    sources = frame.groupby(["dataset", "run"])["data_source"].agg(lambda s: ";".join(sorted(set(s))))
    board["name"] = board["run"] + board["kind"].map({"single": "", "ensemble": " (ensemble)"})
    board["data_source"] = [
        sources.get((d, r), "") for d, r in zip(board["dataset"], board["run"], strict=True)
    ]
    board["checkpoints"] = [
        [
            x
            for (ds, run, _), v in digests.items()
            if ds == d and run == r
            for x in v
            if (k == "ensemble") == (_ > 1)
        ]
        for d, r, k in zip(board["dataset"], board["run"], board["kind"], strict=True)
    ]
    board = board.sort_values(rank_by, ascending=False, na_position="last", kind="stable").reset_index(
        drop=True
    )
    board.insert(0, "rank", range(1, len(board) + 1))
    columns = [
        "rank",
        "name",
        "model",
        "dataset",
        "data_source",
        "preset",
        "n_test",
        "seeds",
        *LEADERBOARD_METRICS,
    ]
    extra = [rank_by] if rank_by not in LEADERBOARD_METRICS else []
    return board[[*columns, *extra, "flags", "checkpoints", "kind", "run"]]


def check_metric(name: str) -> None:
    """One error line for a metric name that no cell can have (e.g. a typo in --rank-by)."""
    if not re.fullmatch(
        r"clean|noise|(impulse|speckle|gaussian|shot)_noise|(fgsm|ifgsm|pgd)@\d+(\.\d+)?", name
    ):
        raise UserError(f"--rank-by {name!r} is not a metric: use clean, noise, a noise group, or e.g. pgd@2")


def write_leaderboard(results: Path, board: pd.DataFrame) -> list[Path]:
    table = board.drop(columns=["checkpoints", "kind", "run"])
    shown = table.copy()
    metrics = [c for c in shown.columns if c in LEADERBOARD_METRICS or "@" in c]
    shown[metrics] = shown[metrics].map(lambda v: "-" if pd.isna(v) else f"{v:.2f}")
    shown["dataset"] = shown["dataset"].map(lambda d: DATASET_LABELS.get(d, d))
    text = (
        "# Leaderboard (accuracy in %)\n\n"
        + tabulate(
            shown.values.tolist(), headers=list(shown.columns), tablefmt="github", disable_numparse=True
        )
        + "\n"
    )
    paths = [
        _write(results / "leaderboard.csv", table.to_csv(index=False)),
        _write(results / "leaderboard.md", text),
    ]
    for entry in board.to_dict("records"):
        path = results / "leaderboard" / entry["dataset"] / f"{_file_name(entry['name'])}.json"
        paths.append(_write(path, json.dumps(_entry_json(entry), indent=2) + "\n"))
    return paths


def _entry_json(entry: dict) -> dict:
    """RobustBench-style, numbers as numbers (accuracy in %; eps in 1/255)."""

    def number(v):
        return None if v is None or pd.isna(v) else float(v)

    attacks: dict[str, dict[str, float | None]] = {}
    for key, v in entry.items():
        if "@" in key:
            attack, eps = key.split("@")
            attacks.setdefault(attack, {})[eps] = number(v)
    return {
        "name": entry["name"],
        "model": entry["model"],
        "dataset": entry["dataset"],
        "threat_model": "Linf",
        "preset": entry["preset"],
        "data_source": entry["data_source"],
        "n_test": int(entry["n_test"]),
        "seeds": None if pd.isna(entry["seeds"]) else int(entry["seeds"]),
        "clean_acc": number(entry["clean"]),
        "noise_acc": number(entry["noise"]),
        "robust_acc": attacks,
        "flags": [f for f in str(entry["flags"] or "").split(";") if f],
        "checkpoint_sha256": list(entry["checkpoints"]),
    }


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("_")
