"""Reports, regenerated in seconds from the records alone (`--stage report`).

Writes under the results dir: `records.csv`; `tables/table<k>.{md,csv,tex}` with the
Appendix-D view (`table<k>_std.md`) and the measured-vs-paper view
(`table<k>_vs_paper.md`); `REPORT.md` (which of the paper's claims reproduce); and the
leaderboard (`leaderboard.csv`, `leaderboard.md`, `leaderboard/<dataset>/<name>.json`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tabulate import tabulate

from models import UserError, create_model, list_models
from models.checkpoints import atomic_write, check_writable

from . import figures, sanity, stats
from .aggregate import (
    DEFAULT_STEPS,
    GROUP,
    aggregate,
    metric_name,
    per_seed,
    select_measurements,
    with_worst_case,
)
from .noise import NOISE_GROUPS, SEVERITIES
from .perturbations import DERIVED, PERTURBATIONS, parse_metric
from .records import (
    DB_FILE,
    SNAPSHOT_FILE,
    RecordStore,
    cell_id,
    check_results_dir,
    load_bits,
    load_checks,
    load_records,
    load_runs,
    needs_migration,
)
from .tables import (
    DATASET_LABELS,
    PAPER_DATASETS,
    TITLES,
    all_attacks_specs,
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

log = logging.getLogger(__name__)


def leaderboard_metrics() -> list[str]:
    """The leaderboard's accuracy columns: clean, noise, and every registered perturbation
    that asks for a column, at 2/255."""
    shown = sorted((p for p in PERTURBATIONS.values() if p.leaderboard), key=lambda p: p.kind == DERIVED)
    return ["clean", "noise", *(metric_name(p.name, 2.0) for p in shown)]


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


@dataclass(frozen=True)
class Measured:
    """What every report is made from: the records, read once and reduced."""

    everything: pd.DataFrame  # all cells, stale ones flagged
    frame: pd.DataFrame  # the current cells, worst cases added
    runs: pd.DataFrame  # load_runs
    kept: pd.DataFrame  # select_measurements' choice
    left_out: pd.DataFrame  # ... and what it left out
    aggregated: pd.DataFrame  # mean, std, n per entry and metric
    sanity: pd.DataFrame  # the gates per entry (bench.sanity.summary)
    bits: dict  # per-example correctness of every cell, by KEY


def measured(results_dir: str | os.PathLike, steps: int = DEFAULT_STEPS) -> Measured:
    """Read and reduce the records of `results_dir` (migrating an older store first); one
    error line when there are none, or none current."""
    results = check_results_dir(results_dir)
    if not (results / DB_FILE).is_file():
        raise NoRecordsError(f"no records in {results / DB_FILE}: run the eval stage first, or check --results-dir")
    check_writable(results, "reports", "--results-dir")
    RecordStore(results, readonly=not needs_migration(results))  # checked (and migrated)
    runs = load_runs(results)
    everything = load_records(results, include_stale=True, runs=runs)
    if everything.empty:
        raise NoRecordsError(f"no records in {results / DB_FILE}: run the eval stage first, or check --results-dir")
    if everything["stale"].all():
        raise NoRecordsError(
            f"no current records in {results / DB_FILE}: its {len(everything)} records all measured checkpoints "
            "since retrained, failed on retraining or deleted; run the eval stage"
        )
    return reduce_records(everything, runs, load_bits(results), load_checks(results, runs), steps)


def reduce_records(
    everything: pd.DataFrame, runs: pd.DataFrame, bits: dict, checks: pd.DataFrame, steps: int = DEFAULT_STEPS
) -> Measured:
    """Everything a report shows, from the records alone (pure: no files)."""
    current = everything[~everything["stale"]].drop(columns="stale").reset_index(drop=True)
    frame = with_worst_case(current, bits)
    kept, left_out = select_measurements(frame, steps)
    aggregated = aggregate(per_seed(kept))
    gates = sanity.summary(sanity.record_gates(aggregated), sanity.with_entries(checks, kept))
    return Measured(everything, frame, runs, kept, left_out, aggregated, gates, bits)


def write_reports(
    results_dir: str | os.PathLike,
    preset: str = "paper",
    rank_by: str = "pgd@2",
    steps: int = DEFAULT_STEPS,
    data_dir: str | os.PathLike | None = None,
    figure_config: figures.FigureConfig | None = None,
) -> list[Path]:
    """Regenerate every report and figure from the records (and, for Fig. 2, checkpoints
    and `data_dir`); returns the paths written. Everything is computed before the first
    file is written: a mistake leaves the old reports whole."""
    results = Path(results_dir)
    m = measured(results, steps)
    mine = m.aggregated[m.aggregated["preset"] == preset]
    left_mine = m.left_out[m.left_out["preset"] == preset]
    rank_by = check_metric(rank_by, set(m.aggregated["metric"]))
    texts: dict[Path, str] = {results / SNAPSHOT_FILE: m.everything.to_csv(index=False)}
    evidence = Evidence(m, stats.Bootstrap())
    tables = {}
    for number in range(1, 7):
        specs = table_specs(number, m.frame, m.runs)
        filled = fill(specs, m.aggregated, preset, number, evidence.intervals(specs, m.aggregated, preset))
        if number == 5:
            filled = with_failed_runs(filled, m.runs)
        tables[number] = filled
        texts.update(_table_texts(results / "tables", number, filled, left_out_note(specs, mine, left_mine)))
    specs = all_attacks_specs(m.frame, mine)
    filled = fill(specs, m.aggregated, preset, None, evidence.intervals(specs, m.aggregated, preset))
    texts.update(_table_texts(results / "tables", "3_all", filled, left_out_note(specs, mine, left_mine)))
    texts.update(sanity_texts(results, m, preset))
    drawn = figures.draw_all(m, results, preset, data_dir, figure_config or figures.FigureConfig())
    texts.update(_figure_files(results, drawn))
    texts[results / "REPORT.md"] = render_report(m, tables, preset, steps, evidence, drawn)
    board = leaderboard(m.kept, m.aggregated, preset, rank_by, m.sanity)
    texts.update(leaderboard_texts(results, board, left_mine))
    for path, text in texts.items():
        _write(path, text)
    return list(texts)


def write_figures(
    results_dir: str | os.PathLike,
    preset: str = "paper",
    steps: int = DEFAULT_STEPS,
    data_dir=None,
    figure_config: figures.FigureConfig | None = None,
) -> list[Path]:
    """The figures alone (`--stage figures`), under results/figures/."""
    m = measured(results_dir, steps)
    drawn = figures.draw_all(m, Path(results_dir), preset, data_dir, figure_config or figures.FigureConfig())
    for item in drawn:
        if isinstance(item, figures.Skipped):
            log.info("figure %s skipped: %s", item.name, item.reason)
    return [_write(path, data) for path, data in _figure_files(Path(results_dir), drawn).items()]


def _figure_files(results: Path, drawn: list) -> dict[Path, bytes]:
    return {
        results / "figures" / name: data
        for item in drawn
        if isinstance(item, figures.Drawn)
        for name, data in item.files.items()
    }


def write_sanity(results_dir: str | os.PathLike, preset: str = "paper", steps: int = DEFAULT_STEPS) -> list[Path]:
    """The sanity section alone (`--stage check`): sanity.md and sanity.csv."""
    m = measured(results_dir, steps)
    return [_write(path, text) for path, text in sanity_texts(Path(results_dir), m, preset).items()]


def _write(path: Path, content: str | bytes) -> Path:
    data = content.encode() if isinstance(content, str) else content
    atomic_write(path, lambda f: f.write(data))
    return path


def _table_texts(folder: Path, number: int | str, filled: pd.DataFrame, left: str) -> dict[Path, str]:
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


def claim_rows(
    frame: pd.DataFrame, aggregated: pd.DataFrame, preset: str = "paper", evidence: Evidence | None = None
) -> pd.DataFrame:
    """Each claim on each data set shown: the measured difference with its 95% interval
    (from `evidence`, the per-example bits), the published difference, and the verdict:
    reproduces / inconclusive / contradicts, or why it is not comparable with the paper."""
    chosen, paper = best_groups(aggregated[aggregated["preset"] == preset]), published()
    rows = []
    for claim in CLAIMS:
        for dataset in shown_datasets(frame, paper=("cifar10",) if claim.table in (4, 5, 6) else PAPER_DATASETS):
            for d in depths(frame, dataset)[: 1 if claim.table == 5 else None]:
                sides = [_side(chosen, dataset, side, claim.metric, d) for side in (claim.a, claim.b)]
                measured = math.nan if None in sides else sides[0]["mean"] - sides[1]["mean"]
                low = high = math.nan
                if evidence is not None and None not in sides:
                    samples = [evidence.samples(dataset, side["run"], kind, preset, claim.metric)
                               for side, kind in zip(sides, (claim.a[2], claim.b[2]), strict=True)]  # fmt: skip
                    if all(samples):
                        measured, low, high = evidence.bootstrap.difference(*samples)
                published_delta = _paper(paper, claim, dataset, d)
                why = _not_comparable(dataset, sides, evidence, preset) if None not in sides else ""
                rows.append(
                    {
                        "claim": claim.text.format(d=d),
                        "table": claim.table,
                        "dataset": dataset,
                        "measured": measured,
                        "low": low,
                        "high": high,
                        "paper": published_delta,
                        "verdict": _verdict(measured, low, high, published_delta, why),
                    }
                )
    return pd.DataFrame(rows)


def _side(chosen: dict, dataset: str, side, metric: str, d: int) -> dict | None:
    model = side[0].format(d=d)
    init = side[1] if side[1] is not None else default_lambda(model)
    return chosen.get((dataset, model, lambda_key(init), side[2], metric))


def _paper(paper: pd.DataFrame, claim: Claim, dataset: str, d: int) -> float:
    table = paper[paper["table"] == claim.table]
    a, b = (
        published_value(
            table, dataset, model.format(d=d), init or default_lambda(model.format(d=d)), kind, claim.metric
        )
        for model, init, kind in (claim.a, claim.b)
    )
    return a - b


def _not_comparable(dataset: str, sides: list[dict], evidence: Evidence | None, preset: str) -> str:
    """Why a measured difference cannot be set against the paper's ('' when it can): only
    runs of the paper's recipe (full length, all training images), on the official data,
    under the paper preset are."""
    if dataset not in PAPER_DATASETS:
        return "synthetic data" if dataset == "synthetic" else f"{dataset} is not in the paper"
    if preset != "paper":
        return f"preset {preset}"
    reasons = [] if evidence is None else [r for side in sides for r in evidence.departures(dataset, side["run"])]
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


@dataclass
class Evidence:
    """The per-example records behind the aggregates: samples for intervals, and what each
    run's recipe and data were."""

    m: Measured
    bootstrap: stats.Bootstrap

    def samples(self, dataset: str, run: str, kind: str, preset: str, metric: str) -> list[np.ndarray]:
        """Per seed, the per-example accuracy of `metric` (noise: the mean of the four
        groups over all severities) of the kept measurement; [] when not measured."""
        kept = self.m.kept
        wanted = list(NOISE_GROUPS) if metric == "noise" else [metric]
        rows = kept[
            (kept["dataset"] == dataset)
            & (kept["run"] == run)
            & (kept["kind"] == kind)
            & (kept["preset"] == preset)
            & kept["metric"].isin(wanted)
        ]
        out = []
        for _, cells in rows.groupby("seed"):
            if len(cells) == len(wanted):
                out.append(np.mean([self._per_example(row) for row in cells.to_dict("records")], axis=0))
        return out

    def _per_example(self, row: dict) -> np.ndarray:
        if row["perturbation"] in NOISE_GROUPS:  # a pooled cell: its five severity cells' bits
            n = int(row["n_test"])
            parts = [self.m.bits[cell_id({**row, "severity": s, "n": n})] for s in SEVERITIES]
            return stats.per_example(np.concatenate(parts), len(SEVERITIES))
        return stats.per_example(self.m.bits[cell_id(row)])

    def departures(self, dataset: str, run: str) -> list[str]:
        """How a run departs from the paper's recipe and data ([] when it does not)."""
        runs = self.m.runs[(self.m.runs["run"] == run) & (self.m.runs["dataset"] == dataset)]
        cells = self.m.kept[(self.m.kept["run"] == run) & (self.m.kept["dataset"] == dataset)]
        found = [f"{length} length" for length in set(runs["length"].dropna()) if length != "full"]
        found += [f"first {int(n)} training images" for n in set(runs["n_train"].dropna())]
        found += [f"{source} data" for source in sorted(set(cells["data_source"]) - {"released"})]
        return found

    def intervals(self, specs, aggregated: pd.DataFrame, preset: str) -> dict:
        """(dataset, model, λ, kind, metric) -> (low, high) of each measured table cell."""
        chosen = best_groups(aggregated[aggregated["preset"] == preset])
        out = {}
        for spec in specs:
            key = (spec.dataset, spec.model, lambda_key(spec.lambda_init), spec.kind, spec.metric)
            if key in chosen and key not in out and spec.metric != "failed":
                samples = self.samples(spec.dataset, chosen[key]["run"], spec.kind, preset, spec.metric)
                out[key] = self.bootstrap.interval(samples) if samples else (math.nan, math.nan)
        return out


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
    m: Measured,
    tables: dict,
    preset: str,
    steps: int = DEFAULT_STEPS,
    evidence: Evidence | None = None,
    drawn: list | None = None,
) -> str:
    frame, aggregated = m.frame, m.aggregated
    lines = ["# inres-bench report", ""]
    sources = frame.groupby("dataset")["data_source"].agg(lambda s: ", ".join(sorted(set(s))))
    stale = int(m.everything["stale"].sum())
    lines += [
        f"Generated from {len(m.everything) - stale} current records (preset `{preset}` in the tables)"
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
    left_out = m.left_out[m.left_out["preset"] == preset]
    phrases = left_out_phrases(left_out, lambda r: f"{r['run']} ({r['kind']}, {r['dataset']})")
    if phrases:
        lines += ["", "Measured but not shown: " + "; ".join(phrases) + "."]
    lines += ["", "## Sanity checks", "", render_sanity(m.sanity, preset), "", SANITY_LEGEND]
    claims = claim_rows(frame, aggregated, preset, evidence)
    shown = claims.assign(
        measured=[_with_interval(v, lo, hi) for v, lo, hi in zip(claims["measured"], claims["low"], claims["high"], strict=True)],
        paper=claims["paper"].map(lambda v: "-" if math.isnan(v) else f"{v:+.2f}"),
        dataset=claims["dataset"].map(lambda d: DATASET_LABELS.get(d, d)),
    )[["claim", "table", "dataset", "measured", "paper", "verdict"]]
    lines += [
        "",
        "## The paper's claims",
        "",
        "Differences in accuracy points (first model minus second), with their 95% interval from a "
        "bootstrap over seeds and test examples (paired: both models saw the same examples). A claim "
        "reproduces only when the interval excludes 0 in the paper's direction, contradicts it when it "
        "excludes 0 the other way, and is inconclusive otherwise; runs not made with the paper's recipe "
        "(full length, official data, paper preset) are not compared with the published numbers.",
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
    lines += [
        "- [Table 3, every attack](tables/table3_all.md): the sanity and reference attacks and the worst case too",
        "- [Sanity checks](sanity.md) and the [leaderboard](leaderboard.md)",
    ]
    lines += ["", "## Figures", ""]
    for item in drawn or []:
        if isinstance(item, figures.Drawn):
            lines += [f"![{item.name}](figures/{item.name}.png)", "", f"{item.caption} ([PDF](figures/{item.name}.pdf))", ""]
        else:
            lines += [f"- {item.name} skipped: {item.reason}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _with_interval(value: float, low: float, high: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.2f}" + ("" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]")


# --- sanity checks -----------------------------------------------------------------------------

SANITY_LEGEND = (
    "Each column is a gate's figure (accuracy points unless a share): "
    + "; ".join(f"**{name}**: {gate.figure}" for name, gate in sanity.GATES.items())
    + ". A ✗ marks a failed gate; `unreliable` means a critical one failed (all but eps-monotone and "
    "zero-gradients). Gates whose figures were not measured are blank."
)


def render_sanity(table: pd.DataFrame, preset: str) -> str:
    """The sanity table: one row per entry of `preset`, each gate's figure, ✗ where it failed."""
    rows = table[table["preset"] == preset]
    if rows.empty:
        return "No entry measured yet."
    gates = [g for g in sanity.GATES if g in rows.columns and rows[g].notna().any()]
    shown = []
    for row in rows.to_dict("records"):
        failed = set(row["flags"].split(";")) if row["flags"] else set()
        cells = [_sanity_figure(g, row[g], sanity.GATES[g].flag in failed) for g in gates]
        name = row["run"] + (" (ensemble)" if row["kind"] == "ensemble" else "")
        shown.append([name, DATASET_LABELS.get(row["dataset"], row["dataset"]), *cells, row["flags"] or "-",
                      "yes" if row["unreliable"] else "no"])  # fmt: skip
    return tabulate(shown, headers=["entry", "data", *gates, "flags", "unreliable"], tablefmt="github", disable_numparse=True)


def _sanity_figure(gate: str, value: float, failed: bool) -> str:
    if pd.isna(value):
        return ""
    if gate in ("zero-gradients", "nonfinite-gradients"):
        text = f"{100 * value:.1f}%"
    elif gate in ("randomized", "probabilities", "dynamic"):
        text = "yes" if value else "no"
    elif gate == "classes":
        text = f"{value:g}"
    else:
        text = f"{value:+.2f}"
    return text + (" ✗" if failed else "")


def sanity_texts(results: Path, m: Measured, preset: str) -> dict[Path, str]:
    """sanity.md (the table and its legend) and sanity.csv (the figures as numbers)."""
    table = m.sanity[m.sanity["preset"] == preset]
    text = "# Sanity checks\n\n" + render_sanity(m.sanity, preset) + "\n\n" + SANITY_LEGEND + "\n"
    return {results / "sanity.md": text, results / "sanity.csv": table.to_csv(index=False)}


# --- leaderboard -------------------------------------------------------------------------------


def leaderboard(
    cells: pd.DataFrame,
    aggregated: pd.DataFrame,
    preset: str = "paper",
    rank_by: str = "pgd@2",
    gates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per run (or ensemble) x data set, ranked by `rank_by` (descending;
    unmeasured last). `cells`: the measurements `aggregate.select_measurements` kept, which
    give each row its checkpoints and data sources; `gates`: bench.sanity.summary (default:
    the gates on these aggregates alone). Accuracies in %."""
    rank_by = check_metric(rank_by, set(aggregated["metric"]))
    # a sentinel for "no λ": NaN keys do not align between the pieces joined below
    mine = aggregated[aggregated["preset"] == preset].fillna({"lambda_low": -1.0, "lambda_high": -1.0})
    wide = mine.groupby([*GROUP, "metric"], dropna=False)["mean"].first().unstack("metric")
    seeds = mine.groupby(GROUP, dropna=False)["n"].max()
    # the entry's test subset is its clean cells' (AutoAttack may use a subset of it)
    n_test = mine.assign(clean=mine["metric"] == "clean").sort_values("clean").groupby(GROUP, dropna=False)["n_test"].last()
    metrics = leaderboard_metrics()
    wide = wide.reindex(columns=sorted(set(wide.columns) | set(metrics) | {rank_by}))
    if gates is None:
        gates = sanity.summary(sanity.record_gates(mine))
    verdict = gates.fillna({"lambda_low": -1.0, "lambda_high": -1.0}).set_index(GROUP)[["flags", "unreliable"]]
    board = wide.assign(seeds=seeds.astype("Int64"), n_test=n_test).join(verdict).reset_index()
    board["flags"] = board["flags"].fillna("")
    board["unreliable"] = board["unreliable"].eq(True)
    used = cells[cells["preset"] == preset]
    by_entry = used.groupby(["dataset", "run", "kind"])
    digests, sources = by_entry["checkpoint_sha256"].agg(set), by_entry["data_source"].agg(set)
    entries = list(zip(board["dataset"], board["run"], board["kind"], strict=True))
    board["name"] = board["run"] + board["kind"].map({"single": "", "ensemble": " (ensemble)"})
    board["data_source"] = [";".join(sorted(sources.get(e, ()))) for e in entries]
    every = mine.groupby(GROUP, dropna=False)[["metric", "mean"]].apply(lambda f: dict(zip(f["metric"], f["mean"], strict=True)))
    board["measured"] = [every.get(k, {}) for k in zip(*(board[c] for c in GROUP), strict=True)]
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
        *metrics,
    ]
    extra = [rank_by] if rank_by not in metrics else []
    return board[[*columns, *extra, "flags", "unreliable", "checkpoints", "measured", "kind", "run", "lambda_low", "lambda_high"]]


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


def leaderboard_texts(results: Path, board: pd.DataFrame, left_out: pd.DataFrame) -> dict[Path, str]:
    """leaderboard.csv, leaderboard.md (with a line naming the measurements left out) and
    one JSON file per entry."""
    table = board.drop(columns=["checkpoints", "measured", "kind", "run", "lambda_low", "lambda_high"])
    shown = table.copy()
    metrics = [c for c in shown.columns if c in leaderboard_metrics() or "@" in c]
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
    paper = published()
    for entry in board.to_dict("records"):
        texts.update(robustbench_entries(results / "leaderboard", entry, paper))
    return texts


def write_leaderboard(results: Path, board: pd.DataFrame, left_out: pd.DataFrame | None = None) -> list[Path]:
    texts = leaderboard_texts(results, board, left_out if left_out is not None else pd.DataFrame())
    return [_write(path, text) for path, text in texts.items()]


def robustbench_entries(folder: Path, entry: dict, paper: pd.DataFrame) -> dict[Path, str]:
    """The entry as RobustBench's leaderboard files: `<folder>/<dataset>/Linf/<name>.json`
    where AutoAttack was measured, `<dataset>/corruptions/<name>.json` where the noise groups
    were; RobustBench's fields (accuracies as strings with two decimals, as its files have
    them) plus our provenance in an `inres_bench` block."""
    measured = entry["measured"]
    lam = None if entry["lambda_low"] in (None, -1.0) or pd.isna(entry["lambda_low"]) else (entry["lambda_low"], entry["lambda_high"])

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
        "unreliable": bool(entry["unreliable"]),
        "inres_bench": _provenance(entry),
    }
    name, out = _file_name(entry["name"]), {}
    reference = metric_name("autoattack", 2.0)
    if reference in measured:
        linf = {**common, "eps": "2/255", "reported": reported("pgd@2"), "autoattack_acc": percent(measured[reference])}
        out[folder / entry["dataset"] / "Linf" / f"{name}.json"] = json.dumps(linf, indent=2) + "\n"
    if "noise" in measured:
        corruptions = {**common, "eps": None, "reported": reported("noise"), "corruptions_acc": percent(measured["noise"])}
        out[folder / entry["dataset"] / "corruptions" / f"{name}.json"] = json.dumps(corruptions, indent=2) + "\n"
    return out


def _footnote(entry: dict) -> str:
    who = f"ensemble of {entry['seeds']}" if entry["kind"] == "ensemble" else f"mean of {entry['seeds']} seed(s)"
    flags = f"; flags: {entry['flags'].replace(';', ', ')}" if entry["flags"] else ""
    return f"inres-bench, {who}, preset {entry['preset']}, {int(entry['n_test'])} test images{flags}"


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
        "data_source": entry["data_source"],
        "n_test": int(entry["n_test"]),
        "seeds": None if pd.isna(entry["seeds"]) else int(entry["seeds"]),
        "accuracy": other,  # clean, noise groups, noise
        "robust_acc": attacks,  # every attack (and the worst case) at every measured radius
        "flags": [f for f in str(entry["flags"] or "").split(";") if f],
        "unreliable": bool(entry["unreliable"]),
        "checkpoint_sha256": list(entry["checkpoints"]),
    }


@functools.cache
def architecture(model: str) -> str:
    """A registered model's architecture (e.g. preact-resnet110-basic), else its name."""
    if model not in list_models():
        return model
    with torch.device("meta"):
        return create_model(model).info.arch


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("_")
