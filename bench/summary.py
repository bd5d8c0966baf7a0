"""Model summary: what each registered network is, its size, and where it is damped."""

from __future__ import annotations

import pandas as pd
from tabulate import tabulate

from models import SkipRule, create_model, model_entry


def model_summary(names: list[str], num_classes: int = 10) -> pd.DataFrame:
    """One row per model: parameters without and with the interpolation parameters
    (lambda_n, gates), damped / total blocks, and the lambda initialisation range."""
    rows = []
    for name in names:
        entry, model = model_entry(name), create_model(name, num_classes=num_classes)
        skips = [m for m in model.modules() if isinstance(m, SkipRule)]
        interp = sum(p.numel() for s in skips for p in s.parameters())
        total = sum(p.numel() for p in model.parameters())
        damped = model.damped_skips()
        rows.append(
            {
                "model": name,
                "arch": entry.arch or model.info.arch,  # a user's registration may not say
                "rule": entry.rule or model.info.rule,
                "params": total - interp,
                "interp_params": interp,
                "damped_blocks": len(damped),
                "blocks": len(skips),
                "lambda_low": model.info.lambda_init[0] if interp else float("nan"),
                "lambda_high": model.info.lambda_init[1] if interp else float("nan"),
                "description": entry.description,
            }
        )
    return pd.DataFrame(rows)


def render_summary(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["description"]).copy()
    shown["lambda init"] = [
        "-" if pd.isna(lo) else f"U[{lo:g}, {hi:g}]"
        for lo, hi in zip(table["lambda_low"], table["lambda_high"], strict=True)
    ]
    shown["damped"] = [f"{d}/{b}" for d, b in zip(table["damped_blocks"], table["blocks"], strict=True)]
    shown = shown[["model", "arch", "rule", "params", "interp_params", "damped", "lambda init"]]
    return tabulate(shown, headers="keys", tablefmt="github", showindex=False, intfmt=",")
