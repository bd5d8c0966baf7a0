"""What every report is made from: the records of a results dir, read once and reduced,
and the per-example evidence behind each aggregate (intervals, departures from the recipe).

A rehearsal's folder (bench.run.rehearsal: a suite's plan on a few images and training
steps, in a results folder of its own marked by REHEARSAL_FILE) is reported as one: a
banner, a column, a stamp on every figure, no verdict on any claim, and its suite's
relaxed gates."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.attacks.perturbations import DEFAULT_STEPS, file_groups
from bench.core.files import check_writable
from bench.data.noise import SEVERITIES
from bench.data.splits import FIRST
from bench.records import sanity, stats
from bench.records.aggregate import aggregate, mean_metrics, per_seed, subset_of, with_worst_case
from bench.records.load import (
    cell_id,
    load_bits,
    load_checks,
    load_landscapes,
    load_records,
    load_runs,
    load_stability,
)
from bench.records.schema import DB_FILE
from bench.records.selection import best_groups, lambda_key, select_measurements
from bench.records.store import RecordStore, check_results_dir
from models import UserError

REHEARSAL_FILE = "rehearsal.json"  # in a rehearsal's results folder: what it rehearses, and its relaxed gates


@dataclass(frozen=True)
class Rehearsal:
    """What a rehearsal's folder says of itself (bench.run.rehearsal writes it)."""

    suite: str  # the suite it rehearses
    relaxed_gates: frozenset[str]  # the sanity gates its suite does not hold to (flagged, never critical)


def rehearsal_of(results: Path) -> Rehearsal | None:
    """The rehearsal a results folder holds, or None for a folder of measurements."""
    path = results / REHEARSAL_FILE
    if not path.is_file():
        return None
    try:
        said = json.loads(path.read_text())
        return Rehearsal(str(said["suite"]), frozenset(map(str, said["relaxed_gates"])))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{path} is not a rehearsal's record ({type(err).__name__}: {err}): rehearse again "
            "in a new --results-dir"
        ) from None


REHEARSAL_STAMP = "REHEARSAL: not measurements"  # on every figure of a rehearsal's report
REHEARSAL_BANNER = (
    "**Rehearsal** (`--rehearse`): every number here comes from networks trained for a few steps and "
    "tested on a few images, to show that each stage of the plan runs. None is a measurement: none is "
    "compared with the paper, and a rehearsal has a results folder of its own."
)


def rehearsal_marked(texts: dict[Path, str | bytes]) -> dict[Path, str | bytes]:
    """A rehearsal's outputs, each saying so where a reader looks: the banner under every
    Markdown file's title, a `rehearsal` column in every table CSV (the records, sanity and
    leaderboard CSVs name each run, whose tag says rehearsal)."""
    out = {}
    for path, text in texts.items():
        if path.suffix == ".md" and isinstance(text, str):
            title, _, rest = text.partition("\n")
            text = f"{title}\n\n{REHEARSAL_BANNER}\n{rest}"
        elif (
            path.suffix == ".csv" and path.parent.name == "tables" and isinstance(text, str) and text.strip()
        ):
            frame = pd.read_csv(io.StringIO(text))
            text = frame.assign(rehearsal=True).to_csv(index=False) if "run" not in frame else text
        out[path] = text
    return out


def relaxed_legend(rehearsal: Rehearsal) -> str:
    """The sanity table's note in a rehearsal's report: which gates its suite relaxes, and why."""
    return (
        "Relaxed in a rehearsal, by rule (the gates that need a trained network measured on enough images: "
        "those comparing attack strengths, and vanishing input gradients, which a deep network two steps "
        "from its initialisation may have): "
        + ", ".join(sorted(rehearsal.relaxed_gates))
        + "; and training's chance-level gate (a run at chance counts as finished). A relaxed gate is "
        "still measured and flagged `(relaxed)`; it never makes a row unreliable."
    )


NOT_JUDGED = "not judged (rehearsal: not a measurement)"


class NoRecordsError(UserError):
    """The results dir holds no records to report on."""


@dataclass(frozen=True)
class Measured:
    """What every report is made from: the records, read once and reduced."""

    everything: pd.DataFrame  # all cells, stale ones flagged
    frame: pd.DataFrame  # the current cells, worst cases added
    runs: pd.DataFrame  # load_runs
    kept: pd.DataFrame  # select_measurements' choice
    left_out: pd.DataFrame  # ... and what it left out
    aggregated: pd.DataFrame  # mean, std, n per entry and metric
    sanity: pd.DataFrame  # the gates per entry (bench.records.sanity.summary)
    bits: dict  # per-example correctness of every cell, by KEY
    stability: pd.DataFrame = field(default_factory=pd.DataFrame)  # records.load_stability's current rows
    # records.load_landscapes' current rows (Fig. 2)
    landscapes: pd.DataFrame = field(default_factory=pd.DataFrame)
    rehearsal: Rehearsal | None = None  # the rehearsal the folder holds (every output says so)
    # the cells measured under RobustBench's protocol (its first-n subsets), reduced on their
    # own: never in the paper's tables, leaderboard or figures, which hold the others
    robustbench: Measured | None = None


def measured(results_dir: str | os.PathLike, steps: int = DEFAULT_STEPS) -> Measured:
    """Read and reduce the records of `results_dir`; one
    error line when there are none, or none current."""
    results = check_results_dir(results_dir)
    if not (results / DB_FILE).is_file():
        raise NoRecordsError(
            f"no records in {results / DB_FILE}: run the eval stage first, or check --results-dir"
        )
    check_writable(results, "reports", "--results-dir")
    RecordStore(results, readonly=True)  # checked
    runs = load_runs(results)
    everything = load_records(results, include_stale=True, runs=runs)
    if everything.empty:
        raise NoRecordsError(
            f"no records in {results / DB_FILE}: run the eval stage first, or check --results-dir"
        )
    if everything["stale"].all():
        raise NoRecordsError(
            f"no current records in {results / DB_FILE}: its {len(everything)} records all measured "
            f"checkpoints since retrained, replaced or failed on retraining; {_advice(runs)}"
        )
    checks, stability = load_checks(results, runs), load_stability(results, runs)
    landscapes = load_landscapes(results, runs)
    rehearsal = rehearsal_of(results)
    relaxed = rehearsal.relaxed_gates if rehearsal else frozenset()
    m = reduce_records(everything, runs, load_bits(results), checks, steps, stability, relaxed)
    return replace(m, landscapes=landscapes, rehearsal=rehearsal)


def _advice(runs: pd.DataFrame) -> str:
    """What to do about a store whose records are all stale: evaluate only where a finished
    checkpoint stands on disk to be measured."""
    standing = int(((runs["status"] == "finished") & runs["on_disk"].astype(bool)).sum())
    if standing:
        return f"run the eval stage to measure the {standing} finished checkpoint{'s' * (standing != 1)} that stand now"
    return "no finished checkpoint stands to be measured: restore the replaced weights, or train again"


def reduce_records(
    everything: pd.DataFrame,
    runs: pd.DataFrame,
    bits: dict,
    checks: pd.DataFrame,
    steps: int = DEFAULT_STEPS,
    stability: pd.DataFrame | None = None,
    relaxed: frozenset[str] = frozenset(),
) -> Measured:
    """Everything a report shows, from the records alone (pure: no files): the paper
    protocol's cells, and RobustBench's (`Measured.robustbench`) on their own."""
    current = everything[~everything["stale"]].drop(columns="stale").reset_index(drop=True)
    first = current["params"].map(subset_of) == FIRST
    stability = pd.DataFrame() if stability is None else stability
    theirs = (
        _reduced(everything, current[first], runs, bits, checks, steps, stability, relaxed)
        if first.any()
        else None
    )
    ours = _reduced(everything, current[~first], runs, bits, checks, steps, stability, relaxed)
    return replace(ours, robustbench=theirs)


def _reduced(
    everything: pd.DataFrame,
    current: pd.DataFrame,
    runs: pd.DataFrame,
    bits: dict,
    checks: pd.DataFrame,
    steps: int,
    stability: pd.DataFrame,
    relaxed: frozenset[str],
) -> Measured:
    frame = with_worst_case(current.reset_index(drop=True), bits)
    kept, left_out = select_measurements(frame, steps)
    aggregated = aggregate(per_seed(kept))
    gates = sanity.summary(sanity.record_gates(aggregated), sanity.with_entries(checks, kept), relaxed)
    return Measured(everything, frame, runs, kept, left_out, aggregated, gates, bits, stability)


@dataclass
class Evidence:
    """The per-example records behind the aggregates: samples for intervals, and what each
    run's recipe and data were."""

    m: Measured
    bootstrap: stats.Bootstrap

    def samples(self, dataset: str, run: str, kind: str, preset: str, metric: str) -> list[np.ndarray]:
        """Per seed, the per-example accuracy of `metric` (noise: the mean of the four
        groups over all severities; corruptions: of the 15) of the kept measurement; [] when not measured."""
        return list(self.seeded(dataset, run, kind, preset, metric).values())

    def seeded(self, dataset: str, run: str, kind: str, preset: str, metric: str) -> dict[int, np.ndarray]:
        """`samples` keyed by seed, in seed order."""
        kept = self.m.kept
        wanted = mean_metrics().get(metric, [metric])
        rows = kept[
            (kept["dataset"] == dataset)
            & (kept["run"] == run)
            & (kept["kind"] == kind)
            & (kept["preset"] == preset)
            & kept["metric"].isin(wanted)
        ]
        out = {}
        for seed, cells in rows.groupby("seed"):
            if len(cells) == len(wanted):
                out[int(seed)] = np.mean([self._per_example(row) for row in cells.to_dict("records")], axis=0)
        return out

    def _per_example(self, row: dict) -> np.ndarray:
        if row["perturbation"] in file_groups():  # a pooled cell: its five severity cells' bits
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

    def intervals(self, slots: Sequence[Any], aggregated: pd.DataFrame, preset: str) -> dict:
        """(dataset, model, λ, kind, metric) -> (low, high) of each measured table cell."""
        chosen = best_groups(aggregated[aggregated["preset"] == preset])
        out = {}
        for slot in slots:
            key = (slot.dataset, slot.model, lambda_key(slot.lambda_init), slot.kind, slot.metric)
            if key in chosen and key not in out and slot.metric != "failed":
                what = (slot.dataset, chosen[key]["run"], slot.kind, preset, slot.metric)
                seeded = self.seeded(*what)  # the interval's identity: these cells and their seeds
                out[key] = (
                    self.bootstrap.interval(list(seeded.values()), (*what, tuple(seeded)))
                    if seeded
                    else (math.nan, math.nan)
                )
        return out
