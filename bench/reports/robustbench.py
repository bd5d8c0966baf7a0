"""RobustBench's view of the records: the cells measured under its protocol (the suite
`robustbench`: the first n test images, AutoAttack standard at L-infinity 8/255 and at L2
0.5, the 15 corruptions of the released CIFAR-C files at 5 severities), one row per run and
data set with the gates' verdict, rendered as a section of leaderboard.md and REPORT.md and
written as RobustBench's leaderboard files (`leaderboard/<dataset>/<threat model>/<name>.json`).

A RobustBench file holds only numbers measured as RobustBench measures them: a threat
model's file is written where its metric was measured under that protocol, and nowhere
else (the paper protocol's AutoAttack at 2/255 and its four noise groups never are).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.attacks.perturbations import metric_name, metric_radius, perturbation
from bench.data.datasets import dataset_label
from bench.records import sanity
from bench.records.aggregate import GROUP
from models import list_models, model_entry


@dataclass(frozen=True)
class Threat:
    """One of RobustBench's CIFAR threat models: where its files go, the metric that measures
    it here, the accuracy field and `eps` its files carry."""

    folder: str  # RobustBench's threat-model folder (robustbench.model_zoo.enums.ThreatModel)
    metric: str  # our metric name
    field: str  # RobustBench's accuracy field
    eps: str | None  # as RobustBench's files write it
    label: str  # the column's header
    rand_metric: str | None = None  # what measures it on a randomized defense (AutoAttack's rand version)


def _autoattack(name: str, rand: str, eps_255: float) -> Threat:
    p = perturbation(name)
    return Threat(
        p.norm,  # LINF, L2: RobustBench's folder names
        metric_name(name, eps_255),
        "autoattack_acc",
        p.radius_text(eps_255),
        f"{p.label} {p.radius_text(eps_255)}",
        metric_name(rand, eps_255),
    )


# RobustBench's CIFAR leaderboards, measured at these radii (1/255): AutoAttack's standard
# version, and its rand version on a defense found randomized
ROBUSTBENCH_AUTOATTACKS = (
    ("autoattack", "autoattack-rand", 8.0),
    ("autoattack-l2", "autoattack-rand-l2", 0.5 * 255),
)
THREATS = (
    *(_autoattack(*autoattack) for autoattack in ROBUSTBENCH_AUTOATTACKS),
    Threat("corruptions", "corruptions", "corruptions_acc", None, "Corruptions (15 x 5)"),
)
RANK_BY = THREATS[0].metric


Interval = Callable[[tuple, str], tuple[float, float]]  # (entry, metric) -> its 95% interval


def robustbench_board(
    kept: pd.DataFrame, aggregated: pd.DataFrame, gates: pd.DataFrame, interval: Interval | None = None
) -> pd.DataFrame:
    """One row per entry measured under RobustBench's protocol (`kept`, `aggregated` and
    `gates`: that protocol's alone, bench.reports.measured's `robustbench`), ranked by
    AutoAttack L-infinity (unmeasured last): `clean` and each threat's metric with its
    `_std` (over seeds), `_n` (test images) and `_low`, `_high` (`interval(entry, metric)`,
    an entry being its GROUP values), the gates' `flags`, `unchecked`, `unreliable`."""
    wide = aggregated.pivot_table(
        index=GROUP, columns="metric", values=["mean", "std", "n_test"], dropna=False, aggfunc="first"
    )
    rows = []
    verdicts = gates.set_index(GROUP) if not gates.empty else pd.DataFrame()
    for entry in wide.index:
        row = dict(zip(GROUP, entry, strict=True))
        stats = wide.loc[entry]
        for metric, source in (("clean", "clean"), *((t.metric, _source(t, stats)) for t in THREATS)):
            row[metric] = _get(stats, "mean", source)
            row[f"{metric}_std"] = _get(stats, "std", source)
            row[f"{metric}_n"] = _get(stats, "n_test", source)
            row[f"{metric}_rand"] = source != metric
            measured = interval is not None and not math.isnan(row[metric])
            low, high = interval(entry, source) if interval is not None and measured else (math.nan, math.nan)
            row[f"{metric}_low"], row[f"{metric}_high"] = low, high
        cells = kept[(kept["run"] == row["run"]) & (kept["dataset"] == row["dataset"])]
        cells = cells[(cells["kind"] == row["kind"]) & (cells["preset"] == row["preset"])]
        row["seeds"] = int(aggregated.set_index(GROUP).loc[[entry], "n"].max())
        row["name"] = row["run"] + (" (ensemble)" if row["kind"] == "ensemble" else "")
        row["data_source"] = ";".join(sorted(set(cells["data_source"])))
        row["checkpoints"] = sorted(set(cells["checkpoint_sha256"]))
        verdict = verdicts.loc[entry] if entry in verdicts.index else None
        row["flags"] = "" if verdict is None else str(verdict["flags"] or "")
        row["unchecked"] = sanity.unchecked_gates({**row, **({} if verdict is None else verdict.to_dict())})
        row["unreliable"] = (
            None if verdict is None or pd.isna(verdict["unreliable"]) else bool(verdict["unreliable"])
        )
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    board = board.sort_values(RANK_BY, ascending=False, na_position="last", kind="stable").reset_index(
        drop=True
    )
    board.insert(0, "rank", range(1, len(board) + 1))
    return board


def _source(threat: Threat, stats: pd.Series) -> str:
    """The metric that gives a threat's number: AutoAttack's rand version where it was
    measured (a defense found randomized, as RobustBench measures one), else its own."""
    rand = threat.rand_metric
    return rand if rand is not None and not math.isnan(_get(stats, "mean", rand)) else threat.metric


def _get(stats: pd.Series, what: str, metric: str) -> float:
    value = stats.get((what, metric), math.nan)
    return float(value) if value is not None and not pd.isna(value) else math.nan


def render_robustbench(board: pd.DataFrame) -> str:
    """The Markdown section: accuracies in % (the mean over seeds, its 95% interval),
    each threat's test images where they are fewer than the clean ones
    (`--n-autoattack`), the gates' verdict; '' when nothing was measured so."""
    if board.empty:
        return ""
    headers = [
        "rank",
        "name",
        "data set",
        "seeds",
        "test images",
        "clean",
        *(t.label for t in THREATS),
        "flags",
        "unreliable",
    ]
    body = []
    for row in board.to_dict("records"):
        n = row["clean_n"]
        body.append(
            [
                row["rank"],
                row["name"],
                dataset_label(row["dataset"]),
                row["seeds"],
                "-" if math.isnan(n) else f"first {int(n):,}",
                _shown(row, "clean", n),
                *(_shown(row, t.metric, n) for t in THREATS),
                row["flags"].replace(";", ", ") or "-",
                sanity.verdict_text(row["unreliable"], row["unchecked"]),
            ]
        )
    table = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)
    return (
        "## RobustBench threat models (accuracy in %)\n\n" + table + "\n\n"
        "Measured as RobustBench's `benchmark()` measures: every number on the first n test images "
        "(RobustBench: all 10,000 of CIFAR's; `--n-test` sets n, `--n-autoattack` AutoAttack's, named "
        "beside a number on fewer images), AutoAttack's standard version (its rand version on a defense "
        "whose forward passes differ, named so), the corruptions' mean over "
        "15 corruptions x 5 severities of the released files. Mean over seeds [95% interval over seeds "
        "and test images]. The gates (docs/PROTOCOL.md) judge each row on its own cells; these numbers "
        "never enter the paper protocol's tables.\n"
    )


def _shown(row: dict, metric: str, clean_n: float) -> str:
    value, low, high, n = row[metric], row[f"{metric}_low"], row[f"{metric}_high"], row[f"{metric}_n"]
    if math.isnan(value):
        return "-"
    text = f"{value:.2f}" + ("" if math.isnan(low) else f" [{low:.1f}, {high:.1f}]")
    text += " (rand version)" if row[f"{metric}_rand"] else ""
    return text + (f" (first {int(n):,})" if not math.isnan(n) and n != clean_n else "")


def robustbench_entries(folder: Path, board: pd.DataFrame, rehearsal: bool = False) -> dict[Path, str]:
    """Each row as RobustBench's leaderboard files: `<folder>/<dataset>/<threat>/<name>.json`
    for every threat model it was measured under. RobustBench's fields (accuracies as
    strings with two decimals, as its files have them; `reported` empty: no paper reports
    these numbers), our provenance in an `inres_bench` block; a `rehearsal`'s say so in
    both (its numbers are not measurements)."""
    out = {}
    for row in board.to_dict("records"):
        for threat in THREATS:
            if math.isnan(row[threat.metric]):
                continue
            entry = {
                "link": "",
                "name": row["name"],
                "authors": "",
                "additional_data": False,
                "number_forward_passes": int(row["seeds"]) if row["kind"] == "ensemble" else 1,
                "dataset": row["dataset"],
                "venue": "inres-bench",
                "architecture": architecture(row["model"]),
                "eps": threat.eps,
                "clean_acc": _percent(row["clean"]),
                "reported": "",
                threat.field: _percent(row[threat.metric]),
                "footnote": ("REHEARSAL, not a measurement: " if rehearsal else "") + _footnote(row, threat),
                "unreliable": row["unreliable"],  # null: not every critical gate was measured
                "inres_bench": {**_provenance(row, threat), "rehearsal": rehearsal},
            }
            path = folder / row["dataset"] / threat.folder / f"{_file_name(row['name'])}.json"
            out[path] = json.dumps(entry, indent=2) + "\n"
    return out


def _percent(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}"


def _footnote(row: dict, threat: Threat) -> str:
    who = f"ensemble of {row['seeds']}" if row["kind"] == "ensemble" else f"mean of {row['seeds']} seed(s)"
    n, clean_n = row[f"{threat.metric}_n"], row["clean_n"]
    images = f"first {int(n):,} test images" + ("" if n == clean_n else f" (clean: first {int(clean_n):,})")
    flags = f"; flags: {row['flags'].replace(';', ', ')}" if row["flags"] else ""
    unchecked = f"; not checked: {row['unchecked'].replace(';', ', ')}" if row["unchecked"] else ""
    rand = ", AutoAttack's rand version (a randomized defense)" if row[f"{threat.metric}_rand"] else ""
    return f"inres-bench, {who}, {images}{rand}{flags}{unchecked}"


def _provenance(row: dict, threat: Threat) -> dict:
    """Our facts about a row's number: its spread, test images, gates and checkpoints."""
    radius = None if threat.eps is None else metric_radius(threat.metric)[1]
    return {
        "run": row["run"],
        "model": row["model"],
        "kind": row["kind"],
        "preset": row["preset"],
        "protocol": "robustbench",
        "subset": "first",
        "eps_255": radius,
        "version": ("rand" if row[f"{threat.metric}_rand"] else "standard") if threat.eps else None,
        "n_test": int(row[f"{threat.metric}_n"]),
        "clean_n_test": int(row["clean_n"]),
        "seeds": int(row["seeds"]),
        "std": _number(row[f"{threat.metric}_std"]),  # over seeds
        "interval_95": [_number(row[f"{threat.metric}_low"]), _number(row[f"{threat.metric}_high"])],
        "data_source": row["data_source"],
        "flags": [f for f in row["flags"].split(";") if f],
        "unchecked": [g for g in row["unchecked"].split(";") if g],
        "checkpoint_sha256": list(row["checkpoints"]),
    }


def architecture(model: str) -> str:
    """A registered model's architecture (e.g. preact-resnet110-basic), else its name."""
    return model_entry(model).arch if model in list_models() else model


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("_")
