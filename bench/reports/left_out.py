"""The lines under a table naming what it left out and why: other runs, recipes, subsets
or parameter sets of the same cell, in words; and REPORT.md's list of the failed runs."""

from __future__ import annotations

import json

import pandas as pd

from bench.attacks.perturbations import PERTURBATIONS, pooled_noise
from bench.data.datasets import dataset_label
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

SHOWN_METRICS = 4  # metric names listed per left-out variant before "+N more"


def variant_text(row) -> str:
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


def left_out_phrases(left_out: pd.DataFrame, label_of) -> list[str]:
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

    def key_of(r) -> tuple:
        return (r["dataset"], r["model"], lambda_key((r["lambda_low"], r["lambda_high"])), r["kind"])

    mine = (
        left_out[
            [
                shown.get(key_of(r)) == r["run"] and r["metric"] in rows[key_of(r)][1]
                for _, r in left_out.iterrows()
            ]
        ]
        if not left_out.empty
        else left_out
    )
    phrases = left_out_phrases(mine, lambda r: rows[key_of(r)][0])
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
