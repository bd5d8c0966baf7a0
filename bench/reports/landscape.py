"""Fig. 2: the loss landscape of a test image on the plane of the FGSM direction and a
random sign direction orthogonal to it, per model, drawn from the landscapes the stability
stage recorded (bench.eval.landscape measures them): no network runs here."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.data.datasets import dataset_label
from bench.records.checkpoints import run_tag
from bench.records.schema import LANDSCAPE_CLEAN, PAPER_LANDSCAPE_IMAGES, LandscapeConfig
from bench.reports.plotting import Skipped, render, rule_of
from bench.reports.run_figures import RunFolder
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
            extent = [offsets[0], offsets[-1], offsets[0], offsets[-1]]
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
    mine = grid[(grid["dataset"] == dataset) & (grid["seed"] == seed)]
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
                mine[(mine["run"] == run) & (mine["image_group"] == group) & (mine["image_row"] == row)]
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
