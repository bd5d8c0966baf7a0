"""Figures: the paper's Figures 1-3, robustness, severity and training curves.

Everything comes from what is recorded and trained: the records (curves, Fig. 3), each
checkpoint's meta.json (Fig. 1's coefficients) and epochs.csv (training curves), and the
landscapes the stability stage recorded (Fig. 2: the loss landscape of a test image on
the plane of the FGSM direction and a random sign direction orthogonal to it, measured by
bench.eval.landscape: no network runs here). Drawn with matplotlib's object API on the
Agg backend (no display, no global state), as PNG and PDF, byte-for-byte the same for the
same inputs. A figure whose inputs are missing is skipped, with the reason, never an error.

Colours follow the skip rule across every figure (ResNet blue, In-ResNet orange,
λ-In-ResNet green, the Table 4 variants and other defenses in their own colours); depths
differ by line style."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.attacks.perturbations import curves, metric_radius, pooled_noise
from bench.data.datasets import dataset_label
from bench.data.noise import SEVERITIES
from bench.records.checkpoints import GATE_IMAGES, run_tag
from bench.records.schema import LANDSCAPE_CLEAN, PAPER_LANDSCAPE_IMAGES, LandscapeConfig
from bench.reports.measured import Measured
from bench.reports.plotting import (
    RunFolder,
    Skipped,
    coefficient_figures,
    coefficient_table,
    colour,
    ordered,
    panel_grid,
    render,
    rule_of,
    run_folders,
    styles,
    training_figure,
    training_table,
)
from models import model_label, plain_counterpart


def landscape_figure(
    examples: list[tuple[str, int, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]],
) -> Figure:
    """Per example (title, true class, panels), two rows; per model's panel (name, offsets,
    loss, classes) a column: the loss as a heat map (one colour scale for all) over the map
    of predicted classes."""
    columns = max(len(panels) for _, _, panels in examples)
    figure = Figure(figsize=(4.4 * columns, 3.7 * 2 * len(examples)), layout="constrained")
    low = min(float(p[2].min()) for _, _, panels in examples for p in panels)
    high = max(float(p[2].max()) for _, _, panels in examples for p in panels)
    tops, bottoms = [], []
    for row, (title, true_class, panels) in enumerate(examples):
        for i, (name, offsets, loss, classes) in enumerate(panels):
            extent = (float(offsets[0]), float(offsets[-1]), float(offsets[0]), float(offsets[-1]))
            top = figure.add_subplot(2 * len(examples), columns, 2 * row * columns + i + 1)
            image = top.imshow(
                loss.T, origin="lower", extent=extent, vmin=low, vmax=high, cmap="viridis", aspect="auto"
            )
            top.set_title(f"{title}\n{name}: loss", fontsize=9)
            bottom = figure.add_subplot(2 * len(examples), columns, (2 * row + 1) * columns + i + 1)
            classes_image = bottom.imshow(
                classes.T,
                origin="lower",
                extent=extent,
                cmap="tab10",
                vmin=-0.5,
                vmax=9.5,
                aspect="auto",
                interpolation="nearest",
            )
            bottom.set_title(f"{name}: predicted class (true: {true_class})", fontsize=9)
            for ax in (top, bottom):
                ax.set_xlabel("a along its d_fgsm (1/255)")
                ax.set_ylabel("b along its d_orth (1/255)")
                ax.plot([0], [0], marker="+", color="white", markersize=10)
            tops.append(top)
            bottoms.append(bottom)
    figure.colorbar(image, ax=tops + bottoms, label="cross-entropy loss", shrink=0.6, location="right")
    classes_bar = figure.colorbar(
        classes_image,
        ax=tops + bottoms,
        label="predicted class",
        shrink=0.6,
        location="bottom",
        ticks=range(10),
    )
    classes_bar.ax.tick_params(labelsize=7)
    return figure


def landscape_figures(landscapes: pd.DataFrame, config: LandscapeConfig, folders: list[RunFolder]) -> list:
    """Fig. 2 from the recorded landscapes (bench.records.load.load_landscapes), for the
    first data set with a finished ResNet and interpolated model of the same architecture
    and seed whose landscapes on this grid are recorded: each model along its own directions."""
    present = {(f.dataset, f.run, f.seed) for f in folders}
    grid = (
        landscapes[
            (landscapes["eps_255"] == float(config.radius))
            & (landscapes["points"] == config.points)
            & (landscapes["direction_seed"] == config.seed)
        ]
        if len(landscapes)
        else landscapes
    )
    pairs = []
    for f in folders:
        plain = plain_counterpart(f.model) if rule_of(f.model) in ("in", "lambda-in") else None
        preset, length, n_train = f.recipe  # the ResNet has no λ, so no @lambda part
        partner = run_tag(plain, preset, length, None, n_train) if plain else None
        if partner is None or (f.dataset, partner, f.seed) not in present:
            continue
        pairs.append(f"{partner} and {f.run}")
        assert plain is not None  # a partner is the plain counterpart's run
        pair = [(partner, plain), (f.run, f.model)]
        examples = _examples(grid, f.dataset, f.seed, pair, config.index)
        if not examples:
            continue
        notes = [
            f"({n}) {title}: {_agreement([model_label(name) for _, name in pair], right)}"
            for n, (title, _, _, right) in enumerate(examples, 1)
        ]
        caption = (
            f"Fig. 2: loss and predicted class on x + a·d_fgsm + b·d_orth ({dataset_label(f.dataset)}, seed {f.seed}; "
            f"runs {pair[0][0]}, {pair[1][0]}), each model along its own FGSM direction d_fgsm and its own "
            f"random direction d_orth orthogonal to it, as the paper draws it. " + "; ".join(notes) + "."
        )
        drawn = [(title, label, panels) for title, label, panels, _ in examples]
        return [render(landscape_figure(drawn), "fig2_landscape", caption)]
    if pairs:
        return [
            Skipped(
                "fig2_landscape",
                f"no landscape of {pairs[0]} recorded on this grid ({config.points} "
                f"points, radius {config.radius:g}/255): the stability stage records it",
            )
        ]
    return [
        Skipped("fig2_landscape", "no finished ResNet and In-ResNet (or λ-In-ResNet) of one depth and seed")
    ]


def _examples(
    grid: pd.DataFrame, dataset: str, seed: int, pair: list[tuple[str, str]], index: int | None
) -> list:
    """(title, true class, panels, rightness per model) of each image recorded for both
    models of `pair` ((run, model)): the clean image `index`, else the paper's noise
    images, else the same two clean; each model's latest landscape of it."""
    grid_rows = grid[(grid["dataset"] == dataset) & (grid["seed"] == seed)]
    if index is not None:
        choices = [[(LANDSCAPE_CLEAN, index)]]
    else:
        choices = [
            list(PAPER_LANDSCAPE_IMAGES),
            [(LANDSCAPE_CLEAN, row) for _, row in PAPER_LANDSCAPE_IMAGES],
        ]
    for images in choices:
        found = []
        for group, row in images:
            rows = [
                grid_rows[
                    (grid_rows["run"] == run)
                    & (grid_rows["image_group"] == group)
                    & (grid_rows["image_row"] == row)
                ]
                for run, _ in pair
            ]
            if any(r.empty for r in rows):
                break
            latest = [r.iloc[-1] for r in rows]
            offsets = np.linspace(-latest[0]["eps_255"], latest[0]["eps_255"], int(latest[0]["points"]))
            panels = [
                (model_label(name), offsets, r["loss"], r["classes"])
                for (_, name), r in zip(pair, latest, strict=True)
            ]
            found.append(
                (
                    _title(group, row, latest[0]["data_source"], index),
                    int(latest[0]["label"]),
                    panels,
                    [bool(r["right"]) for r in latest],
                )
            )
        else:
            return found
    return []


def _title(group: str, row: int, source: str, index: int | None) -> str:
    if group != LANDSCAPE_CLEAN:  # a noise file is the release's, or generated (this data set's own included)
        made = "released" if source == "released" else "generated"
        return f"{made} {group.replace('_', ' ')} #{row + 1} (severity 1, test image {row})"
    return f"clean test image {row}" + ("" if index is not None else " (no noise files)")


def _agreement(names: list[str], right: list[bool]) -> str:
    if all(right):
        return "both models right"
    if not any(right):
        return "both models wrong"
    return "only " + " and ".join(n for n, r in zip(names, right, strict=True) if r) + " right"


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
    on_dataset = aggregated[aggregated["dataset"] == dataset]
    wide = on_dataset.pivot_table(
        index=["run", "model", "kind"], columns="metric", values="mean", aggfunc="first"
    )
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
    singles = aggregated[(aggregated["dataset"] == dataset) & (aggregated["kind"] == "single")]
    panels = [a for a in curves() if singles["metric"].str.startswith(a + "@").any()]
    if not panels:
        return None
    figure, axes = panel_grid(len(panels), columns=len(panels), size=(4.0, 3.4))
    runs = ordered(zip(singles["run"], singles["model"], strict=True))
    line = styles({m for _, m in runs})
    for ax, attack in zip(axes, panels, strict=True):
        for run, model in runs:
            rows = _curve(singles, run, attack)
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
                    points = _curve(singles, run, extra)
                    ax.scatter(
                        points["eps"], points["mean"], marker=marker, s=40, color=colour(model), zorder=3
                    )
        ax.set_title(attack.upper() if attack != "uniform" else "uniform noise", fontsize=10)
        ax.set_xticks(sorted(_curve(singles, None, attack)["eps"].unique()))
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


def _curve(singles: pd.DataFrame, run: str | None, attack: str) -> pd.DataFrame:
    """`attack`'s accuracy against the radius, of one run (None: every run)."""
    rows = singles[
        ((singles["run"] == run) if run is not None else True)
        & singles["metric"].str.startswith(attack + "@")
    ]
    rows = rows.assign(eps=[metric_radius(m)[1] for m in rows["metric"]]).sort_values("eps")
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
    on_dataset = table[table["dataset"] == dataset]
    if on_dataset.empty:
        return None
    figure, axes = panel_grid(len(pooled_noise()), columns=len(pooled_noise()), size=(3.6, 3.2))
    runs = ordered(zip(on_dataset["run"], on_dataset["model"], strict=True))
    line = styles({m for _, m in runs})
    for ax, group in zip(axes, pooled_noise(), strict=True):
        for run, model in runs:
            stats = (
                on_dataset[(on_dataset["run"] == run) & (on_dataset["group"] == group)]
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
    m: Measured,
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
