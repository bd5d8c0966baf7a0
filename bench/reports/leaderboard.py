"""The leaderboard: one row per run (or ensemble) and data set, ranked by a metric, with
its sanity verdict; written as CSV and Markdown (RobustBench's view: bench.reports.robustbench). And the
lines under a table naming what it left out and why (other runs, recipes, subsets or
parameter sets of the same cell, in words), and REPORT.md's list of the failed runs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.attacks.perturbations import DERIVED, PERTURBATIONS, metric_name, parse_metric, pooled_noise
from bench.core.files import write_all
from bench.core.presets import test_selected_note
from bench.data.datasets import dataset_label
from bench.records import sanity
from bench.records.aggregate import GROUP
from bench.records.selection import (
    LARGEST_ENSEMBLE,
    LARGEST_SUBSET,
    LATEST_CHECKPOINT,
    LATEST_DATA,
    RELEASED_FIRST,
    chosen_runs,
    lambda_key,
)
from bench.reports.tables import TableCell
from models import UserError

SHOWN_METRICS = 4  # metric names listed per left-out variant before "+N more"


def variant_text(row: pd.Series) -> str:
    """How a left-out measurement differs from the one shown, from the rule that dropped it."""
    rule = row["rule"]
    if rule == LARGEST_SUBSET:
        return f"n={int(row['n_test'])}"
    if rule == LARGEST_ENSEMBLE:
        return f"ensemble of {int(row['members'])}"
    if rule == RELEASED_FIRST:
        return f"{row['data_source']} data"
    if rule == LATEST_CHECKPOINT:
        return "an earlier checkpoint"
    if rule == LATEST_DATA:
        return "data since replaced"
    slot = PERTURBATIONS.get(row["perturbation"])  # the parameter rules
    params = json.loads(row["params"] or "{}")
    return (slot.describe(params) if slot is not None else row["params"]) or "other parameters"


def left_out_phrases(left_out: pd.DataFrame, label_of: Callable[[pd.Series], str]) -> list[str]:
    """'<label>: <variant> (<metrics>)' per entry and variant; `label_of(row)` names the entry."""
    if left_out.empty:
        return []
    frame = left_out.assign(
        label=[label_of(r) for _, r in left_out.iterrows()],
        variant=[variant_text(r) for _, r in left_out.iterrows()],
    )
    phrases = []
    for (name, variant), rows in frame.groupby(["label", "variant"], sort=False):
        metrics = list(dict.fromkeys(rows["metric"]))
        more = f", +{len(metrics) - SHOWN_METRICS} more" if len(metrics) > SHOWN_METRICS else ""
        phrases.append(f"{name}: {variant} ({', '.join(metrics[:SHOWN_METRICS])}{more})")
    return phrases


def left_out_note(slots: list[TableCell], aggregated: pd.DataFrame, left_out: pd.DataFrame) -> str:
    """One line naming what a table leaves out although it was measured: other
    measurements of its cells (the rules of `selection.select_measurements`) and other runs
    of its models (`chosen_runs`); '' when nothing is."""
    if aggregated.empty:
        return ""
    rows: dict[tuple, tuple[str, set]] = {}
    for slot in slots:
        key = (slot.dataset, slot.model, lambda_key(slot.lambda_init), slot.kind)
        name, metrics = rows.get(key, (f"{slot.block} {slot.row}".strip(), set()))
        metrics |= {slot.metric, *(pooled_noise() if slot.metric == "noise" else ())}
        rows[key] = (name, metrics)
    runs = chosen_runs(aggregated)
    runs = runs[[tuple(k) in rows for k in runs[["dataset", "model", "lam", "kind"]].itertuples(index=False)]]
    shown = {
        tuple(r[:4]): r[4] for r in runs[runs["chosen"]][["dataset", "model", "lam", "kind", "run"]].values
    }

    def key_of(r: pd.Series) -> tuple:
        return (r["dataset"], r["model"], lambda_key((r["lambda_low"], r["lambda_high"])), r["kind"])

    left_of_shown = (
        left_out[
            [
                shown.get(key_of(r)) == r["run"] and r["metric"] in rows[key_of(r)][1]
                for _, r in left_out.iterrows()
            ]
        ]
        if not left_out.empty
        else left_out
    )
    phrases = left_out_phrases(left_of_shown, lambda r: rows[key_of(r)][0])
    phrases += [
        f"{rows[(d, m, lam, k)][0]}: run {run} (n={int(n)}, {int(seeds)} {'members' if k == 'ensemble' else 'seeds'})"
        for d, m, lam, k, run, n, seeds in runs[~runs["chosen"]][
            ["dataset", "model", "lam", "kind", "run", "n_test", "seeds"]
        ].values
    ]
    if not phrases:
        return ""
    return (
        "Measured but not shown (one measurement per cell, chosen by the rules in REPORT.md): "
        + "; ".join(phrases)
        + "."
    )


def failed_run_lines(runs: pd.DataFrame) -> list[str]:
    """REPORT.md's list of the failed training runs, each with the reason its meta.json
    gives; none: no lines."""
    failed = runs[runs["status"] == "failed"]
    if failed.empty:
        return []
    items = [
        f"- {r.run}, {dataset_label(r.dataset)}, seed {r.seed}: {one_line(r.reason) or 'no reason recorded'}"
        for r in failed.sort_values(["dataset", "run", "seed"]).itertuples()
    ]
    return ["", "## Failed runs", "", FAILED_LEGEND, "", *items]


def one_line(text: str | None) -> str:
    """Free text from the records (a failure's reason) as one Markdown line: control
    characters escaped, so that it can neither end the line nor start a table row."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text or "")).replace("|", "\\|")


FAILED_LEGEND = (
    "Training runs that ended without a network to measure: none of their numbers is in a table (Table 5 "
    "counts them). A diverged run stops at the step whose loss was not finite and names what went "
    "non-finite first (docs/PROTOCOL.md, Training)."
)


def leaderboard_metrics() -> list[str]:
    """The leaderboard's accuracy columns: clean, noise, and every registered perturbation
    that asks for a column, at 2/255."""
    shown = sorted((p for p in PERTURBATIONS.values() if p.leaderboard), key=lambda p: p.kind == DERIVED)
    return ["clean", "noise", *(metric_name(p.name, 2.0) for p in shown)]


def leaderboard(
    cells: pd.DataFrame,
    aggregated: pd.DataFrame,
    preset: str = "paper",
    rank_by: str = "pgd@2",
    gates: pd.DataFrame | None = None,
    amplification: dict | None = None,
) -> pd.DataFrame:
    """One row per run (or ensemble) x data set, ranked by `rank_by` (a canonical metric
    name, as `check_metric` gives it; descending, unmeasured last). `cells`: the measurements `selection.select_measurements` kept, which
    give each row its checkpoints and data sources; `gates`: bench.records.sanity.summary (default:
    the gates on these aggregates alone); `amplification`: (dataset, run, kind, preset) ->
    the stability stage's PGD amplification (bench.reports.stability). Accuracies in %."""
    # a sentinel for "no λ": NaN keys do not align between the pieces joined below
    at_preset = aggregated[aggregated["preset"] == preset].fillna({"lambda_low": -1.0, "lambda_high": -1.0})
    wide = at_preset.groupby([*GROUP, "metric"], dropna=False)["mean"].first().unstack("metric")
    seeds = at_preset.groupby(GROUP, dropna=False)["n"].max()
    # the entry's test subset is its clean cells' (AutoAttack may use a subset of it)
    n_test = (
        at_preset.assign(clean=at_preset["metric"] == "clean")
        .sort_values("clean")
        .groupby(GROUP, dropna=False)["n_test"]
        .last()
    )
    metrics = leaderboard_metrics()
    wide = wide.reindex(columns=sorted(set(wide.columns) | set(metrics) | {rank_by}))
    if gates is None:
        gates = sanity.summary(sanity.record_gates(at_preset))
    verdict = gates.fillna({"lambda_low": -1.0, "lambda_high": -1.0}).set_index(GROUP)[
        ["flags", "unchecked", "unreliable"]
    ]
    board = wide.assign(seeds=seeds.astype("Int64"), n_test=n_test).join(verdict).reset_index()
    board["flags"] = board["flags"].fillna("")
    ungated = board["unchecked"].isna()  # no gate measured at all: every one is unchecked
    board.loc[ungated, "unchecked"] = [
        sanity.unchecked_gates(entry) for entry in board.loc[ungated, ["model", "kind"]].to_dict("records")
    ]
    board["unreliable"] = board["unreliable"].astype("boolean")
    used = cells[cells["preset"] == preset]
    by_entry = used.groupby(["dataset", "run", "kind"])
    digests, sources = by_entry["checkpoint_sha256"].agg(set), by_entry["data_source"].agg(set)
    entries = list(zip(board["dataset"], board["run"], board["kind"], strict=True))
    board["name"] = board["run"] + board["kind"].map({"single": "", "ensemble": " (ensemble)"})
    board["data_source"] = [";".join(sorted(sources.get(e, ()))) for e in entries]
    every = at_preset.groupby(GROUP, dropna=False)[["metric", "mean"]].apply(
        lambda f: dict(zip(f["metric"], f["mean"], strict=True))
    )
    board["measured"] = [every.get(k, {}) for k in zip(*(board[c] for c in GROUP), strict=True)]
    board["checkpoints"] = [sorted(digests.get(e, ())) for e in entries]
    found = amplification or {}
    board["amplification"] = [found.get((*e, preset), math.nan) for e in entries]
    board = board.sort_values(rank_by, ascending=False, na_position="last", kind="stable").reset_index(
        drop=True
    )
    board.insert(0, "rank", range(1, len(board) + 1))
    columns = ["rank", "name", "model", "dataset", "data_source", "preset", "n_test", "seeds", *metrics]
    extra = [rank_by] if rank_by not in metrics else []
    return board[
        [
            *columns,
            *extra,
            "amplification",
            "flags",
            "unchecked",
            "unreliable",
            "checkpoints",
            "measured",
            "kind",
            "run",
            "lambda_low",
            "lambda_high",
        ]
    ]


def check_metric(name: str, available: set[str] | None = None) -> str:
    """The canonical name of a --rank-by metric (pgd@2.0 -> pgd@2); one error line for a
    name that no registered perturbation gives, or, given `available` (the metrics measured
    or planned), one that is not among them (the leaderboard's own columns always are)."""
    canonical = parse_metric(name)
    if canonical is None:
        raise UserError(f"--rank-by {name!r} is not a metric: use clean, noise, a noise group, or e.g. pgd@2")
    if available is not None and canonical not in available | set(leaderboard_metrics()):
        offered = sorted(available | set(leaderboard_metrics()))
        raise UserError(
            f"--rank-by {canonical!r} is not measured in this run or the records; choose one of {', '.join(offered)}"
        )
    return canonical


def render_board(board: pd.DataFrame, brief: bool = False) -> str:
    """The leaderboard's rows as a Markdown table (accuracy in %, '-' where not measured);
    `brief`: the names, data set, seeds, accuracies and verdict alone (REPORT.md's headline)."""
    hidden = ["model", "data_source", "preset", "n_test", "amplification", "flags"] if brief else []
    shown = board.drop(columns=["checkpoints", "measured", "kind", "run", "lambda_low", "lambda_high"])
    metrics = [c for c in shown.columns if c in leaderboard_metrics() or "@" in c]
    shown[metrics] = shown[metrics].map(lambda v: "-" if pd.isna(v) else f"{v:.2f}")
    shown["amplification"] = shown["amplification"].map(lambda v: "-" if pd.isna(v) else f"{v:.3f}")
    shown["dataset"] = shown["dataset"].map(lambda d: dataset_label(d))
    shown["unreliable"] = [
        sanity.verdict_text(u, c) for u, c in zip(shown["unreliable"], shown["unchecked"], strict=True)
    ]
    shown = shown.drop(columns=["unchecked", *hidden])
    return tabulate(
        shown.values.tolist(), headers=list(shown.columns), tablefmt="github", disable_numparse=True
    )


def leaderboard_texts(results: Path, board: pd.DataFrame, left_out: pd.DataFrame) -> dict[Path, str]:
    """leaderboard.csv and leaderboard.md (with a line naming the measurements left out)."""
    table = board.drop(columns=["checkpoints", "measured", "kind", "run", "lambda_low", "lambda_high"])
    names = dict(
        zip(zip(board["dataset"], board["run"], board["kind"], strict=True), board["name"], strict=True)
    )
    phrases = left_out_phrases(
        left_out, lambda r: f"{names.get((r['dataset'], r['run'], r['kind']), r['run'])} ({r['dataset']})"
    )
    note = ("\nMeasured but not shown (see REPORT.md): " + "; ".join(phrases) + ".\n") if phrases else ""
    note += "".join(f"\n{line}\n" for line in dict.fromkeys(map(test_selected_note, board["preset"])) if line)
    shown = render_board(board) if len(board) else "No entry was measured under the paper's protocol."
    text = "# Leaderboard (accuracy in %)\n\n" + shown + "\n" + note
    return {results / "leaderboard.csv": table.to_csv(index=False), results / "leaderboard.md": text}


def write_leaderboard(results: Path, board: pd.DataFrame, left_out: pd.DataFrame | None = None) -> list[Path]:
    texts = leaderboard_texts(results, board, left_out if left_out is not None else pd.DataFrame())
    return write_all(texts)
