"""The stability stage's records reduced and shown: per-checkpoint figures, the table
`tables/stability.*`, the mechanism's claims, the two figures per data set and the
leaderboard's `amplification` column. From the records alone (bench.records.load.load_stability).

Per checkpoint (each figure a mean over the stage's images unless said otherwise):
- `amplification_<δ>`: an image's growth after the last block over its growth at the stem;
- `median_spectral_norm`: the median over blocks of each block's median σ_max over images;
- `contraction_share`: the share of blocks whose σ_max < 1 (per image, then the mean);
- `damped_contraction_share`: the same over the blocks the rule damps (a ResNet's blocks at
  those positions), what the contraction claim compares;
- `median_shifted_eigenvalue`: the median over square blocks of the median max Re λ(J - I);
- `input_gradient`: ‖∇ₓ L‖₁."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tabulate import tabulate

from bench.data.datasets import dataset_label
from bench.records import stats
from bench.records.schema import DELTAS, EIGEN, GRADIENT, GROWTH, SPECTRAL
from bench.records.selection import CHECKPOINT, chosen_units
from bench.reports import plotting
from bench.reports.plotting import ordered
from models import list_models, model_entry, model_label, plain_counterpart

# The table's columns: (metric, header, scale, decimals)
TABLE = (
    ("amplification_pgd", "amplification (PGD δ)", 1.0, 3),
    ("median_spectral_norm", "median σ_max", 1.0, 3),
    ("contraction_share", "blocks σ_max < 1 (%)", 100.0, 1),
    ("median_shifted_eigenvalue", "median max Re λ(J - I)", 1.0, 3),
    ("input_gradient", "‖∇ₓL‖₁", 1.0, 2),
)


def per_checkpoint(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint x metric: CHECKPOINT, n, metric, value and `per_image` (the
    per-image values behind it, or None for a figure over blocks)."""
    rows: list[dict] = []
    if frame.empty:
        return pd.DataFrame(rows, columns=[*CHECKPOINT, "n", "metric", "value", "per_image"])
    for key, checkpoint_rows in chosen_units(frame).groupby(CHECKPOINT, dropna=False):
        base = dict(zip(CHECKPOINT, key, strict=True))
        n = int(checkpoint_rows["n"].max())
        for metric, values in _figures(checkpoint_rows).items():
            value = float(np.nanmean(values)) if isinstance(values, np.ndarray) else values
            rows.append(
                {
                    **base,
                    "n": n,
                    "metric": metric,
                    "value": value,
                    "per_image": values if isinstance(values, np.ndarray) else None,
                }
            )
    return pd.DataFrame(rows, columns=[*CHECKPOINT, "n", "metric", "value", "per_image"])


def _matrix(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    rows = rows.sort_values("block")
    return np.stack(rows["values"].to_list()).astype(np.float64), rows["damped"].to_numpy().astype(bool)


def _figures(checkpoint_rows: pd.DataFrame) -> dict:
    out: dict = {}
    for delta in DELTAS:
        rows = checkpoint_rows[
            (checkpoint_rows["quantity"] == GROWTH) & (checkpoint_rows["perturbation"] == delta)
        ]
        if len(rows):
            growth, _ = _matrix(rows)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[f"amplification_{delta}"] = growth[-2] / growth[0]  # after the last block over the stem
    rows = checkpoint_rows[checkpoint_rows["quantity"] == SPECTRAL]
    if len(rows):
        sigma, damped = _matrix(rows)
        out["median_spectral_norm"] = float(np.median(np.median(sigma, axis=1)))
        out["contraction_share"] = (sigma < 1).mean(0)
        if damped.any():
            out["damped_contraction_share"] = (sigma[damped] < 1).mean(0)
    rows = checkpoint_rows[checkpoint_rows["quantity"] == EIGEN]
    if len(rows):
        out["median_shifted_eigenvalue"] = float(np.median(np.median(_matrix(rows)[0], axis=1)))
    rows = checkpoint_rows[checkpoint_rows["quantity"] == GRADIENT]
    if len(rows):
        out["input_gradient"] = _matrix(rows)[0][0]
    return out


# --- the table --------------------------------------------------------------------------------


def stability_table(checkpoints: pd.DataFrame, aggregated: pd.DataFrame, preset: str) -> pd.DataFrame:
    """Per data set and run (single models, then ensembles, which have the input gradient
    only): mean and std over seeds of each TABLE metric, the FGSM accuracy at 2/255 beside
    the gradient norm, seeds (an ensemble: 1) and images."""
    at_preset = checkpoints[checkpoints["preset"] == preset]
    if at_preset.empty:
        return pd.DataFrame()
    at_preset = at_preset.assign(kind=np.where(at_preset["members"] > 1, "ensemble", "single"))
    entry = ["dataset", "run", "model", "kind"]
    stats_ = at_preset.groupby([*entry, "metric"])["value"].agg(["mean", "std"]).unstack("metric")
    seeds = at_preset.groupby(entry)["seed"].nunique()
    images = at_preset.groupby(entry)["n"].max()
    fgsm = aggregated[(aggregated["preset"] == preset) & (aggregated["metric"] == "fgsm@2")]
    fgsm = fgsm.groupby(["dataset", "run", "kind"])["mean"].first()
    table = pd.DataFrame(index=stats_.index)
    for metric, _, scale, _ in TABLE:
        for what in ("mean", "std"):
            table[f"{metric}_{what}"] = stats_[what][metric] * scale if metric in stats_[what] else math.nan
    table["fgsm@2"] = [fgsm.get((d, r, k), math.nan) for d, r, _, k in table.index]
    table["seeds"], table["n"] = seeds, images
    table = table.reset_index()
    order = {run: i for i, (run, _) in enumerate(ordered(zip(table["run"], table["model"], strict=True)))}
    rank = table["run"].map(order) + len(order) * (table["kind"] == "ensemble")
    return (
        table.assign(_rank=rank)
        .sort_values(["dataset", "_rank"], kind="stable")
        .drop(columns="_rank")
        .reset_index(drop=True)
    )


def render_table(table: pd.DataFrame, fmt: str = "github") -> str:
    """The stability table as Markdown (or LaTeX): mean ± std over seeds."""
    if table.empty:
        return "No stability records yet: run the stability stage."
    rows = []
    for row in table.to_dict("records"):
        cells = [
            row["run"] + (" (ensemble)" if row["kind"] == "ensemble" else ""),
            dataset_label(row["dataset"]),
        ]
        for metric, _, _, decimals in TABLE:
            cells.append(_pm(row[f"{metric}_mean"], row[f"{metric}_std"], decimals))
        cells += [
            "-" if pd.isna(row["fgsm@2"]) else f"{row['fgsm@2']:.2f}",
            f"{int(row['seeds'])}",
            f"{int(row['n'])}",
        ]
        rows.append(cells)
    headers = ["run", "data", *(h for _, h, _, _ in TABLE), "FGSM@2 (%)", "seeds", "images"]
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


def _pm(mean: float, std: float, decimals: int) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.{decimals}f}" + ("" if pd.isna(std) else f" ± {std:.{decimals}f}")


TABLE_LEGEND = (
    "Per checkpoint on the stage's class-balanced test images, then mean ± sample std over seeds. "
    "**amplification**: an image's relative perturbation ‖h_n(x+δ) - h_n(x)‖ / ‖h_n(x)‖ after the last "
    "block over the same at the stem, for the PGD-20 δ, averaged over images; **median σ_max**: the "
    "median over blocks of each block's median spectral norm of ∂g_n/∂x (power iteration with Lanczos's Rayleigh-Ritz); **blocks "
    "σ_max < 1**: the share of blocks that are contractions at the image; **max Re λ(J - I)**: the "
    "rightmost eigenvalue's real part of each square block's ∂g_n/∂x - I (Arnoldi), the median over "
    "blocks of the median over images (negative: locally stable in Eq. 17's continuous-time reading); "
    "**‖∇ₓL‖₁**: the cross-entropy's input gradient in [0, 1] pixel units, beside the FGSM accuracy at 2/255. Ensembles have the input gradient only."
)


def table_texts(folder: Path, table: pd.DataFrame) -> dict:
    title = "# Stability diagnostics: how each block amplifies a perturbation\n\n"
    return {
        folder / "stability.md": title + render_table(table) + "\n\n" + TABLE_LEGEND + "\n",
        folder / "stability.csv": table.to_csv(index=False),
        folder / "stability.tex": render_table(table, "latex_booktabs") + "\n",
    }


# --- the claims -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StabilityClaim:
    """`metric` of the model of skip rule `rule` minus that of its ResNet counterpart; the
    paper's mechanism expects the sign `sign` (-1: smaller, +1: larger)."""

    text: str
    rule: str
    metric: str
    sign: float


STABILITY_CLAIMS = (
    StabilityClaim(
        "{a} amplifies an adversarial (PGD) perturbation less than {b} through depth",
        "in",
        "amplification_pgd",
        -1.0,
    ),
    StabilityClaim(
        "{a} amplifies an adversarial (PGD) perturbation less than {b} through depth",
        "lambda-in",
        "amplification_pgd",
        -1.0,
    ),
    StabilityClaim(
        "the damped blocks of {a} are contractions more often than {b}'s",
        "in",
        "damped_contraction_share",
        1.0,
    ),
)


def claim_rows(checkpoints: pd.DataFrame, preset: str, bootstrap: stats.Bootstrap) -> pd.DataFrame:
    """Each claim for every measured model of its rule with a measured ResNet counterpart
    (the same depth and family) on each data set: the difference of the means over seeds
    and images, a 95% interval (bootstrap over seeds and images, paired on images when both
    were measured on the same ones), and the verdict against the expected sign."""
    singles = checkpoints[(checkpoints["preset"] == preset) & (checkpoints["members"] == 1)]
    rows = []
    registered = set(list_models())
    for claim in STABILITY_CLAIMS:
        for dataset in sorted(set(singles["dataset"])):
            here = singles[singles["dataset"] == dataset]
            for model in sorted(
                m for m in set(here["model"]) if m in registered and model_entry(m).rule == claim.rule
            ):
                plain = plain_counterpart(model)
                a, b = (
                    _samples(here, model, claim.metric),
                    _samples(here, plain, claim.metric) if plain else [],
                )
                if not a or not b or plain is None:
                    continue
                what = ("stability", claim.text, claim.metric, dataset, preset, model, plain, len(a), len(b))
                measured, low, high = bootstrap.difference(a, b, what, scale=1.0)
                rows.append(
                    {
                        "claim": claim.text.format(a=model_label(model), b=model_label(plain)),
                        "dataset": dataset,
                        "measured": measured,
                        "low": low,
                        "high": high,
                        "seeds": min(len(a), len(b)),
                        "verdict": stats.verdict(low, high, claim.sign),
                    }
                )
    return pd.DataFrame(rows, columns=["claim", "dataset", "measured", "low", "high", "seeds", "verdict"])


def _samples(rows: pd.DataFrame, model: str, metric: str) -> list[np.ndarray]:
    """Per seed, the per-image values of `metric` of the model's run with the most seeds."""
    model_rows = rows[(rows["model"] == model) & (rows["metric"] == metric)]
    if model_rows.empty:
        return []
    run = model_rows.groupby("run")["seed"].nunique().sort_index().idxmax()
    return [
        np.asarray(v, dtype=np.float64)
        for v in model_rows[model_rows["run"] == run].sort_values("seed")["per_image"]
    ]


CLAIMS_LEGEND = (
    "The paper's mechanism (Sec. 3.4: damping shifts each block's Jacobian spectrum by -λ_n, so a "
    "perturbation grows less through depth), measured: the first model's figure minus its ResNet's, "
    "the mean over seeds and images with its 95% interval (bootstrap over seeds and images, paired "
    "on images). The paper publishes no number: a claim reproduces when the interval excludes 0 in "
    "the direction the mechanism predicts, is contradicted when it excludes 0 the other way, and is "
    "inconclusive otherwise. Amplification: see tables/stability.md; contraction: the share of the "
    "damped blocks (the same positions in the ResNet) whose spectral norm is below 1."
)


def render_claims(claims: pd.DataFrame) -> str:
    rows = [
        [c, dataset_label(d), f"{s}", f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]", v]
        for c, d, s, m, lo, hi, v in zip(
            claims["claim"],
            claims["dataset"],
            claims["seeds"],
            claims["measured"],
            claims["low"],
            claims["high"],
            claims["verdict"],
            strict=True,
        )
    ]
    return tabulate(
        rows,
        headers=["claim", "data", "seeds", "measured", "verdict"],
        tablefmt="github",
        disable_numparse=True,
    )


# --- the figures ------------------------------------------------------------------------------


def growth_figure(
    frame: pd.DataFrame, dataset: str, preset: str, bootstrap: stats.Bootstrap
) -> Figure | None:
    """Relative perturbation against the level (0 stem, blocks, logits), a panel per δ, a
    line per run of a single model: the mean over seeds and images, the band its 95%
    interval (bootstrap over seeds and images). `frame`: `chosen` stability rows."""
    singles = _single(frame, dataset, preset)
    singles = singles[singles["quantity"] == GROWTH]
    panels = [d for d in DELTAS if (singles["perturbation"] == d).any()]
    if not panels:
        return None

    def curve(rows: pd.DataFrame) -> tuple:
        levels = sorted(set(rows["block"]))
        seeds = [
            [np.asarray(v, np.float64) for v in rows[rows["block"] == b].sort_values("seed")["values"]]
            for b in levels
        ]
        what = [
            (
                "growth",
                dataset,
                preset,
                *sorted(set(rows["run"])),
                *sorted(set(rows["perturbation"])),
                str(b),
                *rows.loc[rows["block"] == b, "seed"].sort_values().tolist(),
            )
            for b in levels
        ]
        bands = [bootstrap.interval(s, w, scale=1.0) for s, w in zip(seeds, what, strict=True)]
        return (
            levels,
            [float(np.mean([v.mean() for v in s])) for s in seeds],
            [b[0] for b in bands],
            [b[1] for b in bands],
        )

    figure, axes = plotting.line_panels(
        singles, panels, lambda rows, delta: rows[rows["perturbation"] == delta], curve, size=(4.0, 3.4)
    )
    titles = {"pgd": "PGD-20 δ", "fgsm": "FGSM δ", "uniform": "uniform δ", "gaussian": "Gaussian δ"}
    for ax, delta in zip(axes, panels, strict=True):
        ax.set_title(titles[delta], fontsize=10)
        ax.set_xlabel("block (0: stem; last: logits)")
        ax.set_ylabel("‖h(x+δ) - h(x)‖ / ‖h(x)‖")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(f"Perturbation growth through depth, {dataset_label(dataset)}", fontsize=10)
    return figure


def spectral_figure(frame: pd.DataFrame, dataset: str, preset: str) -> Figure | None:
    """Per block: the spectral norm of ∂g_n/∂x and the rightmost real part of the
    eigenvalues of ∂g_n/∂x - I, a line per run (median over seeds' images), the band the
    2.5-97.5% range over images. `frame`: `chosen` stability rows."""
    singles = _single(frame, dataset, preset)
    panels = [q for q in (SPECTRAL, EIGEN) if (singles["quantity"] == q).any()]
    if not panels:
        return None

    def curve(rows: pd.DataFrame) -> tuple:
        blocks = sorted(set(rows["block"]))
        pooled = [
            np.concatenate([np.asarray(v, np.float64) for v in rows[rows["block"] == b]["values"]])
            for b in blocks
        ]
        return (
            blocks,
            [np.median(p) for p in pooled],
            [np.percentile(p, 2.5) for p in pooled],
            [np.percentile(p, 97.5) for p in pooled],
        )

    figure, axes = plotting.line_panels(
        singles, panels, lambda rows, quantity: rows[rows["quantity"] == quantity], curve, size=(4.6, 3.4)
    )
    for ax, quantity in zip(axes, panels, strict=True):
        ax.axhline(1.0 if quantity == SPECTRAL else 0.0, color="black", linewidth=0.6, linestyle=":")
        ax.set_title(
            "σ_max(∂g_n/∂x) (Lanczos power iteration)"
            if quantity == SPECTRAL
            else "max Re λ(∂g_n/∂x - I) (Arnoldi)",
            fontsize=10,
        )
        ax.set_xlabel("block n")
    axes[0].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"Local stability of each block map, {dataset_label(dataset)}", fontsize=10)
    return figure


def _single(chosen: pd.DataFrame, dataset: str, preset: str) -> pd.DataFrame:
    """The single models' rows of one data set and preset of `chosen` (chosen_units' rows)."""
    return chosen[(chosen["dataset"] == dataset) & (chosen["preset"] == preset) & (chosen["members"] == 1)]


def drawn(frame: pd.DataFrame, preset: str) -> list:
    """Each data set's two stability figures, as plotting.Drawn (or Skipped). Their bands
    draw from a bootstrap of their own, so the report and the figure stage draw the same
    bytes."""
    return [
        plotting.render(figure, stem, caption)
        if figure is not None
        else plotting.Skipped(stem, "nothing of it recorded")
        for stem, figure, caption in figure_specs(frame, preset, stats.Bootstrap())
    ]


def figure_specs(frame: pd.DataFrame, preset: str, bootstrap: stats.Bootstrap) -> list[tuple]:
    """(stem, figure or None, caption) of each data set's two stability figures."""
    chosen = chosen_units(frame)
    out: list[tuple] = []
    if chosen.empty:
        return out
    chosen = chosen[chosen["preset"] == preset]
    for dataset in sorted(set(chosen["dataset"])):
        name, n = dataset_label(dataset), int(chosen.loc[chosen["dataset"] == dataset, "n"].max())
        radii = "/".join(
            f"{e:g}"
            for e in sorted(
                set(chosen.loc[(chosen["dataset"] == dataset) & (chosen["quantity"] == GROWTH), "eps_255"])
            )
        )
        params = chosen[(chosen["dataset"] == dataset) & (chosen["quantity"] == SPECTRAL)]["params"]
        estimator = params.iloc[0] if len(params) else "-"
        krylov = chosen[(chosen["dataset"] == dataset) & (chosen["quantity"] == EIGEN)]["params"]
        out += [
            (
                f"stability_growth_{dataset}",
                growth_figure(chosen, dataset, preset, bootstrap),
                f"Perturbation growth through depth on {name}: ‖h_n(x+δ) - h_n(x)‖₂ / ‖h_n(x)‖₂ at the stem, after each "
                f"block and at the logits, for the FGSM and PGD-20 δ, uniform noise and Gaussian noise (std = radius) at "
                f"{radii}/255, on {n} class-balanced test images; the mean over seeds and images, the band its "
                f"95% interval (bootstrap over seeds and images).",
            ),
            (
                f"stability_spectral_{dataset}",
                spectral_figure(chosen, dataset, preset),
                f"Local stability of each block map g_n on {name}, on {n} class-balanced test images: the spectral norm "
                f"of ∂g_n/∂x by power iteration on JᵀJ with Rayleigh-Ritz over its iterates ({estimator}) and the rightmost real part of the eigenvalues of "
                f"∂g_n/∂x - I by Arnoldi ({krylov.iloc[0] if len(krylov) else '-'}; square blocks only); the median "
                f"over seeds' images, the band their 2.5-97.5% range.",
            ),
        ]
    return out


# --- the leaderboard --------------------------------------------------------------------------


def amplification(checkpoints: pd.DataFrame) -> dict[tuple[str, str, str, str], float]:
    """(dataset, run, kind, preset) -> the mean over seeds of the PGD δ's amplification."""
    rows = checkpoints[(checkpoints["metric"] == "amplification_pgd") & (checkpoints["members"] == 1)]
    means = rows.groupby(["dataset", "run", "preset"])["value"].mean()
    return {(d, r, "single", p): float(v) for (d, r, p), v in means.items()}
