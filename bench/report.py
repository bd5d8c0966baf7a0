"""Reports, regenerated from the records alone: the CSV snapshot and a summary table.

Aggregation is pure pandas over the tidy records; formatting happens only when rendering.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from models.checkpoints import atomic_write

from .noise import NOISE_GROUPS
from .records import load_records, with_pooled_noise, write_snapshot

SUMMARY_FILE = "summary.md"
ATTACK_ORDER = ("fgsm", "ifgsm", "pgd")


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run x data set x (single models | ensemble) x preset x n: accuracy in
    [0, 1] per column (clean, noise = mean of the four groups over all severities, each
    attack at each radius), averaged over seeds, with the number of seeds."""
    frame = with_pooled_noise(frame)
    frame = frame[(frame["severity"] == 0)].copy()
    noise = frame["perturbation"].isin(NOISE_GROUPS)
    frame.loc[noise, "perturbation"] = "noise"
    frame["column"] = frame["perturbation"].where(
        ~frame["perturbation"].isin(ATTACK_ORDER),
        frame["perturbation"] + "@" + frame["eps_255"].map("{:g}".format),
    )
    frame["kind"] = frame["members"].map(lambda m: "single" if m == 1 else "ensemble")
    index = ["run", "dataset", "kind", "preset", "data_source_any", "n_test"]
    frame["data_source_any"] = frame.groupby(["run", "dataset"])["data_source"].transform(
        lambda s: "/".join(sorted(set(s)))
    )
    frame["n_test"] = frame.groupby(["run", "dataset", "seed"])["n"].transform("min")
    per_seed = frame.groupby([*index, "seed", "column"])["accuracy"].mean().unstack("column")
    table = per_seed.groupby(level=index).mean()
    table.insert(0, "seeds", per_seed.groupby(level=index).size())
    columns = ["seeds", "clean", "noise"] + sorted(
        (c for c in table.columns if "@" in c),
        key=lambda c: (ATTACK_ORDER.index(c.split("@")[0]), float(c.split("@")[1])),
    )
    return table[[c for c in columns if c in table.columns]].reset_index()


def render_summary(table: pd.DataFrame) -> str:
    shown = table.rename(columns={"data_source_any": "data", "n_test": "n"})
    numeric = [c for c in shown.columns if c == "clean" or c == "noise" or "@" in c]
    shown[numeric] = (100 * shown[numeric]).round(2)
    shown = shown.astype(object).where(shown.notna(), None)  # tabulate shows None as "-"
    return tabulate(shown, headers="keys", tablefmt="github", showindex=False, floatfmt=".2f", missingval="-")


def write_reports(results_dir: str | os.PathLike) -> list[Path]:
    """Write records.csv and summary.md under `results_dir`; returns their paths."""
    snapshot = write_snapshot(results_dir)
    table = summary(load_records(results_dir))
    text = "# Summary (accuracy in %, mean over seeds)\n\n" + render_summary(table) + "\n"
    path = Path(results_dir) / SUMMARY_FILE
    atomic_write(path, lambda f: f.write(text.encode()))
    return [snapshot, path]
