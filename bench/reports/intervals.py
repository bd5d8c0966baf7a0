"""Tables 4 and 5 row by initialisation interval: Table 4 shows each variant at the interval
the paper's rule chooses (Sec. 4.4), Table 5 counts each interval's failed runs."""

from __future__ import annotations

import math

import pandas as pd

from bench.records.selection import lambda_key
from bench.reports.published import published, published_value
from bench.reports.tables import FULL_SEEDS, SELECTION_SCORE, TABLES, swept
from models import list_models, model_entry, model_label


def select_intervals(filled: pd.DataFrame, number: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(shown, others): Table `number`'s filled cells with one row per swept model, the
    interval with the largest mean clean accuracy + mean noise-group accuracy (the paper's
    Sec. 4.4 rule; ties go to the earlier interval of the grid), and the other intervals'
    rows that measured anything. The chosen row is labelled as chosen on the test set,
    among how many of the grid's intervals had both numbers. A model with no such interval
    keeps its default interval's row (named by the model alone when it measured nothing).
    Tables that select nothing pass through."""
    table = TABLES[number]
    if not table.selects or filled.empty:
        return filled, filled.iloc[0:0]
    entries = {name: model_entry(name) for name in set(filled["model"]) if name in list_models()}
    shown, others = [], []
    for (_, model), cells in filled.groupby(["block", "model"], sort=False):
        rows = list(cells.groupby("row", sort=False))
        if model not in entries or not swept(table, entries[model]):
            shown += [c for _, c in rows]
            continue
        scores = [_score(c) for _, c in rows]
        scored = [i for i, v in enumerate(scores) if not math.isnan(v)]
        if not scored:
            default = lambda_key(entries[model].damped_lambda_init)
            keep = next((i for i, (_, c) in enumerate(rows) if _init_key(c) == default), 0)
        else:
            keep = max(scored, key=lambda i: (scores[i], -i))
        for i, (row, c) in enumerate(rows):
            if i == keep:
                label = (
                    f"{row} (chosen on the test set, {len(scored)} of {len(rows)} intervals)"
                    if scored
                    else row
                )
                shown.append(c.assign(row=label if c["mean"].notna().any() else entries[model].label))
            elif c["mean"].notna().any():
                others.append(c)
    return _concat(shown, filled), _concat(others, filled)


def _concat(parts: list[pd.DataFrame], like: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True) if parts else like.iloc[0:0]


def _score(cells: pd.DataFrame) -> float:
    means = cells.set_index("metric")["mean"]
    return float(sum(means.get(m, math.nan) for m in SELECTION_SCORE))


def _init_key(cells: pd.DataFrame) -> tuple | None:
    first = cells.iloc[0]
    return lambda_key((first["lambda_low"], first["lambda_high"]))


def refusals(filled: pd.DataFrame) -> str:
    """One line naming the table's models the plan refuses to train, and why ('' if none)."""
    names = [n for n in dict.fromkeys(filled["model"]) if n in list_models() and model_entry(n).refused]
    return " ".join(f"{model_label(n)} is not trained: {model_entry(n).refused}." for n in names)


def with_failed_runs(filled: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Table 5's last column: failed training runs out of all runs seen per row (mean =
    failed, n = runs), and the paper's (5 minus the seeds it averaged)."""
    seeds = (
        published().query("table == 5 and metric == 'clean'").assign(value=lambda f: FULL_SEEDS - f["seeds"])
    )
    keys = pd.Series(
        [lambda_key(p) for p in zip(runs["lambda_low"], runs["lambda_high"], strict=True)], index=runs.index
    )
    rows = []
    for _, cells in filled.groupby(["block", "row"], sort=False):
        first = cells.iloc[0].to_dict()
        init = lambda_key((first["lambda_low"], first["lambda_high"]))
        mine = runs[
            (runs["dataset"] == first["dataset"])
            & (runs["model"] == first["model"])
            & keys.map(lambda key, init=init: key == init).astype(bool)
        ]
        mine = mine[mine["status"].isin(["finished", "failed"])]  # not running, nor deleted
        failed = float((mine["status"] == "failed").sum()) if len(mine) else math.nan
        paper = published_value(seeds, first["dataset"], first["model"], init, "single", "clean")
        rows.append(
            {
                **first,
                "column": "Failed",
                "metric": "failed",
                "mean": failed,
                "std": math.nan,
                "n": len(mine),
                "paper": paper,
                "delta": failed - paper,
            }
        )
    return pd.concat([filled, pd.DataFrame(rows)], ignore_index=True)
