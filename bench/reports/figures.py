"""Figures: the paper's Figures 1-3, robustness, severity and training curves.

Everything comes from what is recorded and trained: the records (curves, Fig. 3), each
checkpoint's meta.json (Fig. 1's coefficients) and epochs.csv (training curves) and, for
Fig. 2's loss landscape, two checkpoints and the paper's two test images. Drawn with
matplotlib's object API on the Agg backend (no display, no global state), as PNG and PDF,
byte-for-byte the same for the same inputs.
A figure whose inputs are missing is skipped, with the reason, never an error.

Colours follow the skip rule across every figure (ResNet blue, In-ResNet orange,
λ-In-ResNet green, the Table 4 variants and other defenses in their own colours); depths
differ by line style.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.attacks.perturbations import curves, pooled_noise
from bench.data.datasets import dataset_label
from bench.data.noise import SEVERITIES
from bench.records.checkpoints import GATE_IMAGES
from bench.records.schema import LandscapeConfig
from bench.reports.landscape import landscape_figures
from bench.reports.plotting import Skipped, colour, ordered, panel_grid, render, styles
from bench.reports.run_figures import (
    RunFolder,
    coefficient_figures,
    coefficient_table,
    run_folders,
    training_figure,
    training_table,
)
from models import model_label

GAIN_METRICS = ("clean", "noise", "fgsm@2", "ifgsm@2", "pgd@2", "autoattack@2", "worst@2")


# --- shared helpers -------------------------------------------------------------------------------


# --- what the finished runs' folders hold ----------------------------------------------------------


# --- Fig. 1: interpolation coefficients ------------------------------------------------------------


# --- training curves -------------------------------------------------------------------------------


# --- Fig. 2: loss landscape -----------------------------------------------------------------------


# --- Fig. 3 and the curves, from the aggregates ------------------------------------------------------


def gain_figure(aggregated: pd.DataFrame, dataset: str) -> Figure | None:
    """Per model with an ensemble: the ensemble's accuracy minus the mean of its single
    models, per perturbation."""
    mine = aggregated[aggregated["dataset"] == dataset]
    wide = mine.pivot_table(index=["run", "model", "kind"], columns="metric", values="mean", aggfunc="first")
    with_ensemble = {(a, m) for a, m, k in wide.index if k == "ensemble"}
    runs = [r for r, _ in ordered(with_ensemble)]
    metrics = [m for m in GAIN_METRICS if m in wide.columns]
    if not runs or not metrics:
        return None
    figure = Figure(figsize=(1.2 * len(metrics) * max(1, len(runs)) / 2 + 3, 3.6), layout="constrained")
    ax = figure.add_subplot()
    width = 0.8 / len(runs)
    models = {r: wide.xs(r, level="run").index.get_level_values("model")[0] for r in runs}
    line = styles(models.values())
    for i, run in enumerate(runs):
        gains = [
            wide.xs((run, "ensemble"), level=("run", "kind"))[m].iloc[0]
            - wide.xs((run, "single"), level=("run", "kind"))[m].iloc[0]
            for m in metrics
        ]
        bars = ax.bar(
            np.arange(len(metrics)) + (i - (len(runs) - 1) / 2) * width,
            gains,
            width,
            color=colour(models[run]),
            label=model_label(models[run]),
            edgecolor="black",
            linewidth=0.4,
            hatch="//" if line[models[run]] != "-" else None,
        )
        ax.bar_label(bars, fmt="%+.1f", fontsize=6, padding=1)
    ax.axhline(0, color="black", linewidth=0.6)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.25 * (high - low))  # room for the legend above the bars
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.set_xlabel("perturbation (radius in 1/255)")
    ax.set_ylabel("ensemble − mean of its members (points)")
    ax.set_title(f"Ensemble gain, {dataset_label(dataset)}", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncols=min(len(runs), 6))
    return figure


def robustness_figure(aggregated: pd.DataFrame, dataset: str) -> Figure | None:
    """Accuracy against the radius per attack, every single model, mean ± std over seeds;
    in the PGD panel the worst case (×) and AutoAttack (★) where recorded."""
    mine = aggregated[(aggregated["dataset"] == dataset) & (aggregated["kind"] == "single")]
    panels = [a for a in curves() if mine["metric"].str.startswith(a + "@").any()]
    if not panels:
        return None
    figure, axes = panel_grid(len(panels), columns=len(panels), size=(4.0, 3.4))
    runs = ordered(zip(mine["run"], mine["model"], strict=True))
    line = styles({m for _, m in runs})
    for ax, attack in zip(axes, panels, strict=True):
        for run, model in runs:
            rows = _curve(mine, run, attack)
            if rows.empty:
                continue
            ax.plot(
                rows["eps"],
                rows["mean"],
                marker="o",
                markersize=3,
                color=colour(model),
                linestyle=line[model],
                label=model_label(model) if len(set(m for _, m in runs)) == len(runs) else run,
            )
            ax.fill_between(
                rows["eps"],
                rows["mean"] - rows["std"],
                rows["mean"] + rows["std"],
                color=colour(model),
                alpha=0.15,
                linewidth=0,
            )
            if attack == "pgd":
                for extra, marker in (("worst", "x"), ("autoattack", "*")):
                    points = _curve(mine, run, extra)
                    ax.scatter(
                        points["eps"], points["mean"], marker=marker, s=40, color=colour(model), zorder=3
                    )
        ax.set_title(attack.upper() if attack != "uniform" else "uniform noise", fontsize=10)
        ax.set_xticks(sorted(_curve(mine, None, attack)["eps"].unique()))
        ax.set_xlabel("radius ε (1/255)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7, loc="upper right")
    if "pgd" in panels:
        axes[panels.index("pgd")].text(
            0.02,
            0.02,
            "× worst case   ★ AutoAttack",
            transform=axes[panels.index("pgd")].transAxes,
            fontsize=7,
        )
    figure.suptitle(
        f"Accuracy against the radius, {dataset_label(dataset)} (mean ± std over seeds)", fontsize=10
    )
    return figure


def _curve(mine: pd.DataFrame, run: str | None, attack: str) -> pd.DataFrame:
    """`attack`'s accuracy against the radius, of one run (None: every run)."""
    rows = mine[
        ((mine["run"] == run) if run is not None else True) & mine["metric"].str.startswith(attack + "@")
    ]
    rows = rows.assign(eps=rows["metric"].str.split("@").str[1].astype(float)).sort_values("eps")
    return rows.assign(std=rows["std"].fillna(0.0))


def severity_table(frame: pd.DataFrame, kept: pd.DataFrame) -> pd.DataFrame:
    """Per kept single-model noise measurement, its accuracy at each severity (%):
    dataset, run, model, seed, group, severity, value."""
    pooled = kept[kept["perturbation"].isin(pooled_noise()) & (kept["kind"] == "single")]
    keys = [
        "dataset",
        "run",
        "seed",
        "members",
        "perturbation",
        "data_source",
        "preset",
        "params",
        "checkpoint_sha256",
    ]
    severities = frame[frame["perturbation"].isin(pooled_noise()) & (frame["severity"] > 0)]
    joined = severities.merge(
        pooled[[*keys, "n_test", "model"]].rename(columns={"model": "kept_model"}), on=keys
    )
    joined = joined[joined["n"] == joined["n_test"]]
    return pd.DataFrame(
        {
            "dataset": joined["dataset"],
            "run": joined["run"],
            "model": joined["kept_model"],
            "seed": joined["seed"],
            "group": joined["perturbation"],
            "severity": joined["severity"],
            "value": 100 * joined["accuracy"],
        }
    )


def severity_figure(table: pd.DataFrame, dataset: str) -> Figure | None:
    """Accuracy against the severity per noise group, every single model, mean ± std over seeds."""
    mine = table[table["dataset"] == dataset]
    if mine.empty:
        return None
    figure, axes = panel_grid(len(pooled_noise()), columns=len(pooled_noise()), size=(3.6, 3.2))
    runs = ordered(zip(mine["run"], mine["model"], strict=True))
    line = styles({m for _, m in runs})
    for ax, group in zip(axes, pooled_noise(), strict=True):
        for run, model in runs:
            stats = (
                mine[(mine["run"] == run) & (mine["group"] == group)]
                .groupby("severity")["value"]
                .agg(["mean", "std"])
            )
            stats = stats.reindex(SEVERITIES).fillna({"std": 0.0})
            ax.plot(
                stats.index,
                stats["mean"],
                marker="o",
                markersize=3,
                color=colour(model),
                linestyle=line[model],
                label=model_label(model) if len(set(m for _, m in runs)) == len(runs) else run,
            )
            ax.fill_between(
                stats.index,
                stats["mean"] - stats["std"],
                stats["mean"] + stats["std"],
                color=colour(model),
                alpha=0.15,
                linewidth=0,
            )
        ax.set_title(group.replace("_", " "), fontsize=10)
        ax.set_xlabel("severity")
        ax.set_xticks(SEVERITIES)
        ax.set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower left")
    figure.suptitle(
        f"Accuracy against the noise severity, {dataset_label(dataset)} (mean ± std over seeds)", fontsize=10
    )
    return figure


# --- all of them ----------------------------------------------------------------------------------


def draw_all(
    m,
    results: Path,
    preset: str,
    landscape: LandscapeConfig | None = None,
    folders: list[RunFolder] | None = None,
) -> list:
    """Every figure the records (and, for Figures 1-2 and the training curves, the
    checkpoint folders and data) allow: a `Drawn` or a `Skipped` for each. `m`:
    measured.Measured; `folders`: run_folders(results, m.runs, preset) when already read."""
    aggregated = m.aggregated[m.aggregated["preset"] == preset]
    folders = run_folders(results, m.runs, preset) if folders is None else folders
    out: list = []
    table = coefficient_table(folders)
    if table.empty:
        out.append(
            Skipped("fig1_coefficients", "no finished In-ResNet or λ-In-ResNet run with scalar coefficients")
        )
    else:
        out += coefficient_figures(table, preset)
    out += landscape_figures(m.landscapes, landscape or LandscapeConfig(), folders)
    severity = severity_table(m.frame, m.kept[m.kept["preset"] == preset])
    training = training_table(folders)
    for dataset in sorted(set(aggregated["dataset"]) | set(training["dataset"])):
        name = dataset_label(dataset)
        runs = ", ".join(dict.fromkeys(aggregated.loc[aggregated["dataset"] == dataset, "run"]))
        for stem, figure, caption in (
            (
                f"fig3_ensemble_gain_{dataset}",
                gain_figure(aggregated, dataset),
                f"Fig. 3 ({name}): the ensemble's accuracy gain over the mean of its single models, per perturbation.",
            ),
            (
                f"robustness_{dataset}",
                robustness_figure(aggregated, dataset),
                f"Accuracy against the radius per attack on {name}, mean ± std over seeds, worst case and AutoAttack "
                f"points in the PGD panel (runs: {runs}).",
            ),
            (
                f"severity_{dataset}",
                severity_figure(severity, dataset),
                f"Accuracy against the severity of each noise group on {name}, mean ± std over seeds.",
            ),
            (
                f"training_{dataset}",
                training_figure(training, dataset),
                f"Training curves on {name} from each run's epochs.csv, mean over seeds: training loss, test accuracy "
                f"(the whole test set after each epoch) and, for the damped runs, the median of act(λ_n) over the damped "
                f"blocks with its 10-90% band (gating rules: each block's median over {GATE_IMAGES:,} test images).",
            ),
        ):
            out.append(
                render(figure, stem, caption)
                if figure is not None
                else Skipped(stem, "nothing of it recorded")
            )
    return out
