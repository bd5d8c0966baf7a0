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
from models.checkpoints import atomic_write, check_writable

from .aggregate import (
    DEFAULT_STEPS,
    GROUP,
    aggregate,
    gate_flags,
    metric_name,
    per_seed,
    select_measurements,
)
from .noise import NOISE_GROUPS
from .records import DB_FILE, SNAPSHOT_FILE, check_results_dir, check_store, load_records, load_runs
from .tables import (
    DATASET_LABELS,
    PAPER_DATASETS,
    TITLES,
    best_groups,
    default_lambda,
    depths,
    fill,
    lambda_key,
    left_out_note,
    left_out_phrases,
    missing,
    published,
    published_value,
    render,
    shown_datasets,
    table_specs,
    with_failed_runs,
)

LEADERBOARD_METRICS = ("clean", "noise", "fgsm@2", "ifgsm@2", "pgd@2")


class NoRecordsError(UserError):
    """The results dir holds no records to report on."""


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
    results_dir: str | os.PathLike, preset: str = "paper", rank_by: str = "pgd@2", steps: int = DEFAULT_STEPS
) -> list[Path]:
    """Regenerate every report from the records; returns the paths written. Everything is
    computed before the first file is written: a mistake leaves the old reports whole."""
    results = check_results_dir(results_dir)
    exists = check_store(results)
    runs = load_runs(results)
    everything = load_records(results, include_stale=True, runs=runs) if exists else pd.DataFrame()
    if everything.empty:
        raise NoRecordsError(f"no records in {results / DB_FILE}: run the eval stage first, or check --results-dir")
    frame = everything[~everything["stale"]].reset_index(drop=True)
    if frame.empty:
        raise NoRecordsError(
            f"no current records in {results / DB_FILE}: its {len(everything)} records all measured checkpoints "
            "since retrained, failed on retraining or deleted; run the eval stage"
        )
    check_writable(results, "reports", "--results-dir")
    kept, left_out = select_measurements(frame, steps)
    aggregated = aggregate(per_seed(kept))
    mine = aggregated[aggregated["preset"] == preset]
    left_mine = left_out[left_out["preset"] == preset]
    rank_by = check_metric(rank_by, set(aggregated["metric"]))
    texts: dict[Path, str] = {results / SNAPSHOT_FILE: everything.to_csv(index=False)}
    tables = {}
    for number in range(1, 7):
        specs = table_specs(number, frame, runs)
        filled = fill(specs, aggregated, preset, number)
        if number == 5:
            filled = with_failed_runs(filled, runs)
        tables[number] = filled
        texts.update(_table_texts(results / "tables", number, filled, left_out_note(specs, mine, left_mine)))
    report = render_report(frame, aggregated, tables, preset, everything, left_mine, steps)
    texts[results / "REPORT.md"] = report
    board = leaderboard(kept, aggregated, preset, rank_by)
    texts.update(leaderboard_texts(results, board, left_mine))
    for path, text in texts.items():
        _write(path, text)
    return list(texts)


def _write(path: Path, text: str) -> Path:
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _table_texts(folder: Path, number: int, filled: pd.DataFrame, left: str) -> dict[Path, str]:
    footer = "".join("\n\n" + line for line in (missing(filled), left) if line) + "\n"
    title = f"# {TITLES[number]}\n\n"
    return {
        folder / f"table{number}.md": title + render(filled) + footer,
        folder / f"table{number}_std.md": title
        + "Mean ± sample std over seeds (Appendix D).\n\n"
        + render(filled, "std")
        + footer,
        folder / f"table{number}_vs_paper.md": title
        + "Measured / published (measured - published).\n\n"
        + render(filled, "paper")
        + footer,
        folder / f"table{number}.csv": filled.to_csv(index=False),
        folder / f"table{number}.tex": render(filled, fmt="latex_booktabs") + "\n",
    }


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


SELECTION_RULES = (
    "A number averages only cells that measured the same thing: the same checkpoints, test "
    "subset, data files, attack parameters and ensemble. Where a cell was measured several ways, "
    "one measurement is shown, chosen per run in this order: the largest test subset; the largest "
    "ensemble; released data first (then unofficial files; released noise, then generated); for "
    "IFGSM and PGD the step count asked for ({steps}) at the preset's step size, else the most steps; "
    "per seed the checkpoint measured last. A table row shows one run of its model: the one trained "
    "with the paper's full recipe, then the largest test subset, then the most seeds. Rows of "
    "checkpoints that were retrained, failed on retraining or deleted are never shown. Lines under "
    "the tables name what was left out."
)


def render_report(
    frame: pd.DataFrame,
    aggregated: pd.DataFrame,
    tables: dict,
    preset: str,
    everything: pd.DataFrame | None = None,
    left_out: pd.DataFrame | None = None,
    steps: int = DEFAULT_STEPS,
) -> str:
    lines = ["# inres-bench report", ""]
    if frame.empty:
        return "\n".join([*lines, "No current records: run the eval stage first.", ""])
    sources = frame.groupby("dataset")["data_source"].agg(lambda s: ", ".join(sorted(set(s))))
    stale = 0 if everything is None else int(everything["stale"].sum())
    lines += [
        f"Generated from {len(frame)} current records (preset `{preset}` in the tables)"
        + (f"; {stale} records of replaced or deleted checkpoints are not reported." if stale else "."),
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
    lines += ["", "## How numbers are chosen", "", SELECTION_RULES.format(steps=steps)]
    phrases = left_out_phrases(
        left_out if left_out is not None else pd.DataFrame(), lambda r: f"{r['run']} ({r['kind']}, {r['dataset']})"
    )
    if phrases:
        lines += ["", "Measured but not shown: " + "; ".join(phrases) + "."]
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
    cells: pd.DataFrame, aggregated: pd.DataFrame, preset: str = "paper", rank_by: str = "pgd@2"
) -> pd.DataFrame:
    """One row per run (or ensemble) x data set, ranked by `rank_by` (descending;
    unmeasured last). `cells`: the measurements `aggregate.select_measurements` kept, which
    give each row its checkpoints and data sources. Accuracies in %."""
    rank_by = check_metric(rank_by, set(aggregated["metric"]))
    # a sentinel for "no λ": NaN keys do not align between the pieces joined below
    mine = aggregated[aggregated["preset"] == preset].fillna({"lambda_low": -1.0, "lambda_high": -1.0})
    wide = mine.groupby([*GROUP, "metric"], dropna=False)["mean"].first().unstack("metric")
    seeds = mine.groupby(GROUP, dropna=False)["n"].max()
    wide = wide.reindex(columns=sorted(set(wide.columns) | set(LEADERBOARD_METRICS) | {rank_by}))
    board = wide.assign(seeds=seeds.astype("Int64"), flags=gate_flags(mine)).reset_index()
    used = cells[cells["preset"] == preset]
    by_entry = used.groupby(["dataset", "run", "kind"])
    digests, sources = by_entry["checkpoint_sha256"].agg(set), by_entry["data_source"].agg(set)
    entries = list(zip(board["dataset"], board["run"], board["kind"], strict=True))
    board["name"] = board["run"] + board["kind"].map({"single": "", "ensemble": " (ensemble)"})
    board["data_source"] = [";".join(sorted(sources.get(e, ()))) for e in entries]
    board["checkpoints"] = [sorted(digests.get(e, ())) for e in entries]
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


def check_metric(name: str, available: set[str] | None = None) -> str:
    """The canonical name of a --rank-by metric (pgd@2.0 -> pgd@2); one error line for a
    name that no cell can have, or, given `available` (the metrics measured or planned), one
    that is not among them (the leaderboard's own columns are always allowed)."""
    match = re.fullmatch(r"(fgsm|ifgsm|pgd)@(\d+(?:\.\d*)?|\.\d+)", name)
    if match:
        name = metric_name(match[1], float(match[2]))
    elif name not in ("clean", "noise", *NOISE_GROUPS):
        raise UserError(f"--rank-by {name!r} is not a metric: use clean, noise, a noise group, or e.g. pgd@2")
    if available is not None and name not in available | set(LEADERBOARD_METRICS):
        offered = sorted(available | set(LEADERBOARD_METRICS))
        raise UserError(f"--rank-by {name!r} is not measured in this run or the records; choose one of {', '.join(offered)}")
    return name


def leaderboard_texts(results: Path, board: pd.DataFrame, left_out: pd.DataFrame) -> dict[Path, str]:
    """leaderboard.csv, leaderboard.md (with a line naming the measurements left out) and
    one JSON file per entry."""
    table = board.drop(columns=["checkpoints", "kind", "run"])
    shown = table.copy()
    metrics = [c for c in shown.columns if c in LEADERBOARD_METRICS or "@" in c]
    shown[metrics] = shown[metrics].map(lambda v: "-" if pd.isna(v) else f"{v:.2f}")
    shown["dataset"] = shown["dataset"].map(lambda d: DATASET_LABELS.get(d, d))
    names = dict(zip(zip(board["dataset"], board["run"], board["kind"], strict=True), board["name"], strict=True))
    phrases = left_out_phrases(
        left_out, lambda r: f"{names.get((r['dataset'], r['run'], r['kind']), r['run'])} ({r['dataset']})"
    )
    note = ("\nMeasured but not shown (see REPORT.md): " + "; ".join(phrases) + ".\n") if phrases else ""
    text = (
        "# Leaderboard (accuracy in %)\n\n"
        + tabulate(
            shown.values.tolist(), headers=list(shown.columns), tablefmt="github", disable_numparse=True
        )
        + "\n"
        + note
    )
    texts = {results / "leaderboard.csv": table.to_csv(index=False), results / "leaderboard.md": text}
    for entry in board.to_dict("records"):
        path = results / "leaderboard" / entry["dataset"] / f"{_file_name(entry['name'])}.json"
        texts[path] = json.dumps(_entry_json(entry), indent=2) + "\n"
    return texts


def write_leaderboard(results: Path, board: pd.DataFrame, left_out: pd.DataFrame | None = None) -> list[Path]:
    texts = leaderboard_texts(results, board, left_out if left_out is not None else pd.DataFrame())
    return [_write(path, text) for path, text in texts.items()]


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
