"""Model summary: what each registered network is, its size, and where it is damped."""

from __future__ import annotations

import pandas as pd
import torch
from tabulate import tabulate

from models import RULES, SkipRule, create_model, model_entry


def model_summary(names: list[str], num_classes: int = 10) -> pd.DataFrame:
    """One row per model: parameters without and with the interpolation parameters
    (lambda_n, gates), damped / total blocks, the initialisation range of d (λ_n or the
    gate's bias), the coefficients act(d) it starts at, and what is trained in place of λ."""
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
                **_starting_coefficients(model.info.rule, model.info.lambda_init if interp else None),
                "lambda_storage": model.info.lambda_storage,
                "description": entry.description,
            }
        )
    return pd.DataFrame(rows)


def _starting_coefficients(rule: str, init: tuple[float, float] | None) -> dict:
    """act(d) at the ends of d's initialisation interval (act is monotone, and a gate's
    W_d starts at 0): the coefficients a model starts from."""
    act = RULES[rule].act
    if init is None or act is None:
        return {"coefficient_low": float("nan"), "coefficient_high": float("nan")}
    low, high = (float(act(torch.tensor(v, dtype=torch.float64))) for v in init)
    return {"coefficient_low": low, "coefficient_high": high}


def render_summary(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["description"]).copy()
    shown["lambda init"] = [
        "-" if pd.isna(lo) else f"U[{lo:.4g}, {hi:.4g}]"
        for lo, hi in zip(table["lambda_low"], table["lambda_high"], strict=True)
    ]
    shown["act(d) at init"] = [
        "-" if pd.isna(lo) else f"[{lo:.4g}, {hi:.4g}]"
        for lo, hi in zip(table["coefficient_low"], table["coefficient_high"], strict=True)
    ]
    shown["trained as"] = table["lambda_storage"]
    shown["damped"] = [f"{d}/{b}" for d, b in zip(table["damped_blocks"], table["blocks"], strict=True)]
    columns = [
        "model",
        "arch",
        "rule",
        "params",
        "interp_params",
        "damped",
        "lambda init",
        "act(d) at init",
        "trained as",
    ]
    shown = shown[columns]
    return tabulate(shown, headers="keys", tablefmt="github", showindex=False, intfmt=",")
