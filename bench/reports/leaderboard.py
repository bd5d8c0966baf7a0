"""The leaderboard: one row per run (or ensemble) and data set, ranked by a metric, with
its sanity verdict; written as CSV, Markdown and RobustBench-style JSON per entry."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.attacks.perturbations import DERIVED, PERTURBATIONS, metric_name, parse_metric
from bench.core.files import write_all
from bench.core.presets import preset as preset_of
from bench.core.presets import test_selected_note
from bench.data.datasets import dataset_label
from bench.records import sanity
from bench.records.aggregate import GROUP
from bench.reports.left_out import left_out_phrases
from bench.reports.published import published, published_value
from models import UserError, list_models, model_entry


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
    the stability stage's PGD amplification (bench.reports.stability_report). Accuracies in %."""
    # a sentinel for "no λ": NaN keys do not align between the pieces joined below
    mine = aggregated[aggregated["preset"] == preset].fillna({"lambda_low": -1.0, "lambda_high": -1.0})
    wide = mine.groupby([*GROUP, "metric"], dropna=False)["mean"].first().unstack("metric")
    seeds = mine.groupby(GROUP, dropna=False)["n"].max()
    # the entry's test subset is its clean cells' (AutoAttack may use a subset of it)
    n_test = (
        mine.assign(clean=mine["metric"] == "clean")
        .sort_values("clean")
        .groupby(GROUP, dropna=False)["n_test"]
        .last()
    )
    metrics = leaderboard_metrics()
    wide = wide.reindex(columns=sorted(set(wide.columns) | set(metrics) | {rank_by}))
    if gates is None:
        gates = sanity.summary(sanity.record_gates(mine))
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
    every = mine.groupby(GROUP, dropna=False)[["metric", "mean"]].apply(
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
    """leaderboard.csv, leaderboard.md (with a line naming the measurements left out) and
    one JSON file per entry."""
    table = board.drop(columns=["checkpoints", "measured", "kind", "run", "lambda_low", "lambda_high"])
    names = dict(
        zip(zip(board["dataset"], board["run"], board["kind"], strict=True), board["name"], strict=True)
    )
    phrases = left_out_phrases(
        left_out, lambda r: f"{names.get((r['dataset'], r['run'], r['kind']), r['run'])} ({r['dataset']})"
    )
    note = ("\nMeasured but not shown (see REPORT.md): " + "; ".join(phrases) + ".\n") if phrases else ""
    note += "".join(f"\n{line}\n" for line in dict.fromkeys(map(test_selected_note, board["preset"])) if line)
    text = "# Leaderboard (accuracy in %)\n\n" + render_board(board) + "\n" + note
    texts = {results / "leaderboard.csv": table.to_csv(index=False), results / "leaderboard.md": text}
    paper = published()
    for entry in board.to_dict("records"):
        texts.update(robustbench_entries(results / "leaderboard", entry, paper))
    return texts


def write_leaderboard(results: Path, board: pd.DataFrame, left_out: pd.DataFrame | None = None) -> list[Path]:
    texts = leaderboard_texts(results, board, left_out if left_out is not None else pd.DataFrame())
    return write_all(texts)


def robustbench_entries(folder: Path, entry: dict, paper: pd.DataFrame) -> dict[Path, str]:
    """The entry as RobustBench's leaderboard files: `<folder>/<dataset>/Linf/<name>.json`
    where AutoAttack was measured, `<dataset>/corruptions/<name>.json` where the noise groups
    were; RobustBench's fields (accuracies as strings with two decimals, as its files have
    them) plus our provenance in an `inres_bench` block."""
    measured = entry["measured"]
    lam = (
        None
        if entry["lambda_low"] in (None, -1.0) or pd.isna(entry["lambda_low"])
        else (entry["lambda_low"], entry["lambda_high"])
    )

    def percent(value) -> str:
        return f"{value:.2f}"

    def reported(metric: str) -> str:
        value = published_value(paper, entry["dataset"], entry["model"], lam, entry["kind"], metric)
        return "" if math.isnan(value) else percent(value)

    common = {
        "link": "",
        "name": entry["name"],
        "authors": "",
        "venue": "inres-bench",
        "architecture": architecture(entry["model"]),
        "clean_acc": percent(measured["clean"]) if "clean" in measured else "",
        "number_forward_passes": int(entry["seeds"]) if entry["kind"] == "ensemble" else 1,
        "additional_data": False,
        "dataset": entry["dataset"],
        "footnote": _footnote(entry),
        "unreliable": _verdict(entry["unreliable"]),  # null: not every critical gate was measured
        "inres_bench": _provenance(entry),
    }
    name, out = _file_name(entry["name"]), {}
    reference = metric_name("autoattack", 2.0)
    if reference in measured:
        linf = {
            **common,
            "eps": "2/255",
            "reported": reported("pgd@2"),
            "autoattack_acc": percent(measured[reference]),
        }
        out[folder / entry["dataset"] / "Linf" / f"{name}.json"] = json.dumps(linf, indent=2) + "\n"
    if "noise" in measured:
        corruptions = {
            **common,
            "eps": None,
            "reported": reported("noise"),
            "corruptions_acc": percent(measured["noise"]),
        }
        out[folder / entry["dataset"] / "corruptions" / f"{name}.json"] = (
            json.dumps(corruptions, indent=2) + "\n"
        )
    return out


def _footnote(entry: dict) -> str:
    who = (
        f"ensemble of {entry['seeds']}"
        if entry["kind"] == "ensemble"
        else f"mean of {entry['seeds']} seed(s)"
    )
    flags = f"; flags: {entry['flags'].replace(';', ', ')}" if entry["flags"] else ""
    unchecked = (
        f"; not checked: {entry['unchecked'].replace(';', ', ')}" if pd.isna(entry["unreliable"]) else ""
    )
    chosen = ", checkpoint chosen by test accuracy" if preset_of(entry["preset"]).test_selected else ""
    return f"inres-bench, {who}, preset {entry['preset']}{chosen}, {int(entry['n_test'])} test images{flags}{unchecked}"


def _provenance(entry: dict) -> dict:
    """Our facts about an entry: every measured metric, in % (radii in 1/255)."""
    attacks: dict[str, dict[str, float]] = {}
    other = {}
    for metric, value in sorted(entry["measured"].items()):
        attack, at, eps = metric.partition("@")
        if at:
            attacks.setdefault(attack, {})[eps] = round(float(value), 6)
        else:
            other[metric] = round(float(value), 6)
    return {
        "run": entry["run"],
        "model": entry["model"],
        "kind": entry["kind"],
        "preset": entry["preset"],
        "checkpoint": preset_of(entry["preset"]).checkpoint,  # "last", or "best-test": chosen on the test set
        "data_source": entry["data_source"],
        "n_test": int(entry["n_test"]),
        "seeds": None if pd.isna(entry["seeds"]) else int(entry["seeds"]),
        "accuracy": other,  # clean, noise groups, noise
        "robust_acc": attacks,  # every attack (and the worst case) at every measured radius
        "flags": [f for f in str(entry["flags"] or "").split(";") if f],
        "unreliable": _verdict(entry["unreliable"]),
        "unchecked": [
            g for g in str(entry["unchecked"] or "").split(";") if g
        ],  # critical gates not measured
        "checkpoint_sha256": list(entry["checkpoints"]),
        # the stability stage's growth of a PGD-20 perturbation from the stem to the last block
        "amplification": None
        if pd.isna(entry.get("amplification", math.nan))
        else round(float(entry["amplification"]), 6),
    }


def _verdict(unreliable) -> bool | None:
    return None if pd.isna(unreliable) else bool(unreliable)


def architecture(model: str) -> str:
    """A registered model's architecture (e.g. preact-resnet110-basic), else its name."""
    return model_entry(model).arch if model in list_models() else model


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("_")
