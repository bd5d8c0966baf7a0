"""The paper's published numbers (published.csv: Tables 1-6, mean and std per cell as
printed), beside which the tables show ours."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.data.datasets import dataset_info

PUBLISHED = Path(__file__).with_name("published.csv")


def published() -> pd.DataFrame:
    return pd.read_csv(PUBLISHED)


def published_value(paper: pd.DataFrame, dataset: str, model: str, init, kind: str, metric: str) -> float:
    """The paper's number for one cell (NaN when it has none; always NaN off CIFAR: synthetic
    data is never compared with CIFAR numbers). `paper`: published(), maybe one table's."""
    if not dataset_info(dataset).paper:
        return math.nan
    match = paper[
        (paper["dataset"] == dataset)
        & (paper["model"] == model)
        & (paper["kind"] == kind)
        & (paper["metric"] == metric)
    ]
    if init is not None and match["lambda_low"].notna().any():
        match = match[
            (match["lambda_low"].round(6) == round(init[0], 6))
            & (match["lambda_high"].round(6) == round(init[1], 6))
        ]
    return float(match["value"].iloc[0]) if len(match) else math.nan
