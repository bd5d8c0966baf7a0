"""Aggregation of the tidy records: pure pandas functions, no I/O, no formatting.

Accuracies become percentages here. A *metric* is `clean`, a noise group (all five
severities pooled), `noise` (the mean of the four groups, the paper's Tables 4-6
number), or `<attack>@<eps in 1/255>` such as `pgd@2`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .attacks import ATTACKS
from .noise import NOISE_GROUPS
from .records import with_pooled_noise

GROUP = ["dataset", "model", "run", "lambda_low", "lambda_high", "kind", "preset", "n_test"]
GATE_TOLERANCE = 0.5  # points: differences below this are noise, not a failed gate


def metric_name(perturbation: str, eps_255: float) -> str:
    return f"{perturbation}@{eps_255:g}" if perturbation in ATTACKS else perturbation


def seed_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model x data set x seed (or ensemble) x preset x test size, one column
    per metric (accuracy in %), plus `members`."""
    if frame.empty:
        return pd.DataFrame(columns=[*GROUP, "seed", "members"])
    cells = with_pooled_noise(frame)
    cells = cells[cells["severity"] == 0].copy()
    cells["metric"] = [
        metric_name(p, e) for p, e in zip(cells["perturbation"], cells["eps_255"], strict=True)
    ]
    cells["kind"] = np.where(cells["members"] > 1, "ensemble", "single")
    pooled = cells["perturbation"].isin(NOISE_GROUPS)
    cells["n_test"] = np.where(pooled, cells["n"] // 5, cells["n"])
    keys = [*GROUP, "seed", "members"]
    wide = cells.groupby([*keys, "metric"], dropna=False)["accuracy"].first().unstack("metric") * 100
    if set(NOISE_GROUPS) <= set(wide.columns):
        wide["noise"] = wide[list(NOISE_GROUPS)].mean(axis=1, skipna=False)
    return wide.reset_index()


def aggregate(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Long format: one row per GROUP x metric with `mean`, `std` (sample, NaN for a single
    seed) and `n` (seeds averaged; for an ensemble, its members)."""
    columns = [*GROUP, "metric", "mean", "std", "n"]
    if per_seed.empty:
        return pd.DataFrame(columns=columns)
    metrics = [c for c in per_seed.columns if c not in (*GROUP, "seed", "members")]
    long = per_seed.melt(id_vars=[*GROUP, "seed", "members"], value_vars=metrics, var_name="metric").dropna(
        subset=["value"]
    )
    grouped = long.groupby([*GROUP, "metric"], dropna=False)
    out = grouped["value"].agg(mean="mean", std="std", seeds="count").join(grouped["members"].max())
    out["n"] = np.where(out["members"] > 1, out["members"], out["seeds"])
    out[["mean", "std"]] = out[["mean", "std"]].round(6)  # no float dust in the CSVs
    return out.reset_index()[columns]


def gate_flags(aggregated: pd.DataFrame) -> pd.Series:
    """Sanity gates against gradient masking (REFERENCE.md 7), per GROUP: `eps-not-monotone`
    when an attack's accuracy rises with the radius, `iterative-weaker-than-fgsm` when IFGSM
    or PGD leaves more accuracy than FGSM at the same radius (both beyond GATE_TOLERANCE).
    Returns the flags joined by ';' ('' when every gate passes), indexed by GROUP."""
    if aggregated.empty:
        return pd.Series(dtype=object)
    wide = aggregated.groupby([*GROUP, "metric"], dropna=False)["mean"].first().unstack("metric")
    flags = pd.Series("", index=wide.index, dtype=object)
    for key, row in wide.iterrows():
        found = []
        for attack in ATTACKS:
            radii = sorted(
                float(c.split("@")[1]) for c in row.index if c.startswith(attack + "@") and pd.notna(row[c])
            )
            values = [row[metric_name(attack, e)] for e in radii]
            if any(b > a + GATE_TOLERANCE for a, b in zip(values, values[1:], strict=False)):
                found.append("eps-not-monotone")
                break
        for column in row.index:
            if column.startswith(("ifgsm@", "pgd@")) and pd.notna(row[column]):
                fgsm = row.get("fgsm@" + column.split("@")[1])
                if pd.notna(fgsm) and row[column] > fgsm + GATE_TOLERANCE:
                    found.append("iterative-weaker-than-fgsm")
                    break
        flags[key] = ";".join(found)
    return flags
