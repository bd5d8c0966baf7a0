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

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch.nn import functional as F

from bench.data.datasets import dataset_label
from bench.data.noise import NOISE_GROUPS, SEVERITIES
from bench.eval.adapters import zoo_defense
from bench.records.checkpoints import EPOCHS_FILE, GATE_IMAGES, META_FILE, zoo_checkpoint_dir
from bench.train.recipes import run_tag
from models import UserError, list_models, model_entry, model_label

matplotlib.use("Agg")
PUBLISHED = Path(__file__).with_name("published_figures.csv")
RULE_COLOURS = {
    "residual": "tab:blue",
    "in": "tab:orange",
    "lambda-in": "tab:green",
    "in-sig": "tab:red",
    "in-gating": "tab:purple",
    "in-gating-sig": "tab:brown",
    "plain": "tab:pink",
}
OTHER_COLOUR = "tab:gray"
STYLES = ("-", "--", ":", "-.")
CURVES = ("fgsm", "ifgsm", "pgd", "uniform")  # panels of the robustness figure
GAIN_METRICS = ("clean", "noise", "fgsm@2", "ifgsm@2", "pgd@2", "autoattack@2", "worst@2")
SHARE_THRESHOLD = 0.01  # the paper counts coefficients above this


@dataclass(frozen=True)
class FigureConfig:
    """Fig. 2's settings; radii in 1/255."""

    landscape_index: int | None = None  # one clean test image; None: the paper's two (PAPER_LANDSCAPE_IMAGES)
    landscape_points: int = 21  # grid points per axis
    landscape_radius: float = 8.0  # the grid spans [-radius, radius] along both directions
    landscape_batch: int = 256  # grid points per forward pass
    landscape_seed: int = 0  # d_orth's random signs


@dataclass
class Drawn:
    name: str  # file stem under results/figures/
    caption: str
    files: dict[str, bytes] = field(default_factory=dict)  # file name -> contents


@dataclass
class Skipped:
    name: str
    reason: str


# --- shared helpers -------------------------------------------------------------------------------


def rule_of(model: str) -> str:
    """A registered model's skip rule, or '' for a defense of the user's."""
    return model_entry(model).rule if model in list_models() else ""


def rule_rank(model: str) -> int:
    """The paper's order: ResNet, In-, λ-In-, the variants, then other defenses."""
    return list(RULE_COLOURS).index(rule_of(model)) if rule_of(model) in RULE_COLOURS else len(RULE_COLOURS)


def ordered(pairs) -> list[tuple[str, str]]:
    """(run, model) pairs, without repeats, in the paper's order."""
    return sorted(dict.fromkeys(pairs), key=lambda p: (rule_rank(p[1]), p[1], p[0]))


def colour(model: str) -> str:
    return RULE_COLOURS.get(rule_of(model), OTHER_COLOUR)


def styles(models) -> dict[str, str]:
    """A line style per depth (the digits in a model's name; the first depth solid)."""
    depths = sorted({"".join(c for c in m if c.isdigit()) for m in models}, key=lambda d: (len(d), d))
    return {m: STYLES[depths.index("".join(c for c in m if c.isdigit())) % len(STYLES)] for m in models}


def render(figure: Figure, name: str, caption: str) -> Drawn:
    """The figure as PNG and PDF bytes, without timestamps (the same inputs give the same
    bytes)."""
    files = {}
    for fmt, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, dpi=100, metadata=metadata)  # constrained layout: nothing clipped
        files[f"{name}.{fmt}"] = buffer.getvalue()
    return Drawn(name, caption, files)


def _grid(count: int, columns: int = 3, size: tuple[float, float] = (4.2, 3.2)) -> tuple[Figure, list]:
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(count)]
    return figure, axes


def line_panels(mine: pd.DataFrame, panels: list, rows_of, curve, size: tuple[float, float]) -> tuple[Figure, list]:
    """A row of panels, a line per (run, model) of `mine` with a band: `rows_of(rows,
    panel)` picks a run's rows of a panel, `curve(rows)` gives (x, middle, low, high)."""
    figure, axes = _grid(len(panels), columns=len(panels), size=size)
    runs = ordered(zip(mine["run"], mine["model"], strict=True))
    line = styles({m for _, m in runs})
    one_run_each = len({m for _, m in runs}) == len(runs)
    for ax, panel in zip(axes, panels, strict=True):
        for run, model in runs:
            rows = rows_of(mine[mine["run"] == run], panel)
            if rows.empty:
                continue
            x, middle, low, high = curve(rows)
            ax.plot(x, middle, color=colour(model), linestyle=line[model], marker="o", markersize=2,
                    label=model_label(model) if one_run_each else run)  # fmt: skip
            ax.fill_between(x, low, high, color=colour(model), alpha=0.15, linewidth=0)
    return figure, axes


# --- what the finished runs' folders hold ----------------------------------------------------------


@dataclass(frozen=True)
class RunFolder:
    """A finished run's checkpoint folder, as figures and the Fig. 1 claim read it."""

    dataset: str
    run: str
    model: str
    seed: int
    lambda_init: tuple[float, float] | None  # None: the rule has no λ
    coefficients: tuple[float, ...]  # act(λ_n) of the damped blocks at the end ((): gating rules)
    epochs: pd.DataFrame | None  # the training log (epochs.csv), None for runs older than it
    recipe: tuple[str, str, int | None] = ("paper", "full", None)  # meta.json's preset, length, n_train


def read_epochs(folder: Path) -> pd.DataFrame | None:
    """A checkpoint folder's training log (one row per epoch), or None for a run older than it."""
    path = folder / EPOCHS_FILE
    return pd.read_csv(path) if path.is_file() else None


def run_folders(results_dir: Path, runs: pd.DataFrame, preset: str) -> list[RunFolder]:
    """Every finished run of `preset` (its meta.json says which), read once."""
    out = []
    finished = runs[runs["status"] == "finished"]
    for run, dataset, seed, model, low, high in zip(finished["run"], finished["dataset"], finished["seed"],
                                                    finished["model"], finished["lambda_low"], finished["lambda_high"],
                                                    strict=True):  # fmt: skip
        folder = zoo_checkpoint_dir(results_dir, dataset, run, seed)
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("preset", "paper") != preset:
            continue
        init = None if pd.isna(low) else (float(low), float(high))
        recipe = (meta.get("preset", "paper"), meta.get("length", "full"), meta.get("n_train"))
        out.append(RunFolder(dataset, run, model, int(seed), init,
                             tuple(meta.get("interpolation_coefficients") or ()), read_epochs(folder), recipe))  # fmt: skip
    return out


# --- Fig. 1: interpolation coefficients ------------------------------------------------------------


def coefficient_table(folders: list[RunFolder]) -> pd.DataFrame:
    """act(d_n) per damped block of every run with scalar coefficients (In-, λ-In-, sig
    rules): dataset, run, model, lambda_low, lambda_high, seed, block (from 1), coefficient."""
    rows = [
        {"dataset": f.dataset, "run": f.run, "model": f.model, "lambda_low": f.lambda_init[0],
         "lambda_high": f.lambda_init[1], "seed": f.seed, "block": i + 1, "coefficient": c}
        for f in folders
        if f.lambda_init is not None
        for i, c in enumerate(f.coefficients)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["dataset", "run", "model", "lambda_low", "lambda_high", "seed", "block", "coefficient"])


def paper_panels(table: pd.DataFrame, published: pd.DataFrame, preset: str) -> pd.Series:
    """Which rows of the coefficient table are the paper's Fig. 1: the models and data sets
    it draws (published_figures.csv), trained with the paper's full recipe at the model's
    default initialisation."""
    from bench.reports.tables import paper_recipe_tags

    panels = published[published["figure"] == 1]
    wanted = {(d, r) for d, m in zip(panels["dataset"], panels["model"], strict=True)
              for r in paper_recipe_tags(m, preset, None)}  # fmt: skip
    return pd.Series([(d, r) in wanted for d, r in zip(table["dataset"], table["run"], strict=True)], index=table.index,
                     dtype=bool)  # fmt: skip


def coefficients_figure(table: pd.DataFrame, published: pd.DataFrame | None) -> Figure:
    """One panel per run: each seed's coefficients as points, their mean as a line, the
    share above 0.01 measured and, for the paper's panels (`published` given), published;
    without `published` the titles name the initialisation and nothing is compared."""
    runs = sorted(
        dict.fromkeys(zip(table["dataset"], table["run"], table["model"], strict=True)),
        key=lambda t: (t[0], rule_rank(t[2]), t[2], t[1]),
    )
    figure, axes = _grid(len(runs))
    for ax, (dataset, run, model) in zip(axes, runs, strict=True):
        mine = table[(table["dataset"] == dataset) & (table["run"] == run)]
        for seed, points in mine.groupby("seed"):
            ax.scatter(points["block"], points["coefficient"], s=9, alpha=0.45, color=colour(model),
                       label="seeds" if seed == mine["seed"].min() else None)  # fmt: skip
        mean = mine.groupby("block")["coefficient"].mean()
        ax.plot(mean.index, mean.values, color="black", linewidth=1.2, label="mean over seeds")
        share = 100 * (mine["coefficient"] > SHARE_THRESHOLD).mean()
        name = model_label(model) + ("" if run == model else f" ({run})")
        if published is None:
            low, high = mine["lambda_low"].iloc[0], mine["lambda_high"].iloc[0]
            title = f"{name}, λ~U[{low:.4g}, {high:.4g}], {dataset_label(dataset)}: {share:.1f}% > 0.01"
        else:
            paper = published[(published["dataset"] == dataset) & (published["model"] == model)]["value"]
            quoted = f", paper {paper.iloc[0]:.1f}%" if len(paper) else ""
            title = f"{name}, {dataset_label(dataset)}: {share:.1f}% > 0.01{quoted}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("damped block (depth order)")
        ax.set_ylabel("coefficient act(λ_n)")
        ax.axhline(SHARE_THRESHOLD, color="gray", linewidth=0.6, linestyle=":")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper right")
    return figure


def _coefficient_figures(table: pd.DataFrame, preset: str) -> list:
    """Fig. 1 (the paper's panels) and the coefficients of every other damped run."""
    published = pd.read_csv(PUBLISHED)
    paper = paper_panels(table, published, preset)
    wanted = published[published["figure"] == 1]
    names = " and ".join(f"{model_label(m)} on {dataset_label(d)}" for d, m in zip(wanted["dataset"], wanted["model"], strict=True))
    out = []
    if paper.any():
        runs = ", ".join(dict.fromkeys(table.loc[paper, "run"]))
        caption = (f"Fig. 1: interpolation coefficients act(λ_n) per damped block of {names} (the paper's panels: its "
                   f"full recipe, default initialisation), each seed and their mean, with the share above 0.01 against "
                   f"the published one (runs: {runs}).")  # fmt: skip
        out.append(render(coefficients_figure(table[paper], published), "fig1_coefficients", caption))
    else:
        out.append(Skipped("fig1_coefficients", f"no finished run of {names} with the paper's full recipe at the "
                                                "default initialisation"))  # fmt: skip
    if (~paper).any():
        runs = ", ".join(dict.fromkeys(table.loc[~paper, "run"]))
        caption = (f"Interpolation coefficients act(λ_n) per damped block of the other damped runs, each seed and their "
                   f"mean, with the share above 0.01; each panel names its initialisation and data set, and none is "
                   f"compared with the paper (runs: {runs}).")  # fmt: skip
        out.append(render(coefficients_figure(table[~paper], None), "coefficients_other", caption))
    return out


# --- training curves -------------------------------------------------------------------------------


def training_table(folders: list[RunFolder]) -> pd.DataFrame:
    """Per run, seed and epoch of the training logs: dataset, run, model, seed, epoch,
    train_loss, test_accuracy (%), and the coefficients' median, 10th and 90th percentile
    over the damped blocks (NaN for the rules without λ; the per-block median for gates)."""
    rows = []
    for f in folders:
        if f.epochs is None:
            continue
        coefficients = f.epochs[[c for c in f.epochs.columns if c.startswith("coefficient_")
                                 and (c.count("_") == 1 or c.endswith("_median"))]]  # fmt: skip
        for i, epoch in enumerate(f.epochs.to_dict("records")):
            values = coefficients.iloc[i].to_numpy(dtype=float) if len(coefficients.columns) else np.array([])
            low, mid, high = np.percentile(values, [10, 50, 90]) if values.size else (np.nan,) * 3
            rows.append({"dataset": f.dataset, "run": f.run, "model": f.model, "seed": f.seed,
                         "epoch": int(epoch["epoch"]), "train_loss": epoch["train_loss"],
                         "test_accuracy": 100 * epoch["test_accuracy"], "coefficient_p10": low,
                         "coefficient_median": mid, "coefficient_p90": high})  # fmt: skip
    columns = ["dataset", "run", "model", "seed", "epoch", "train_loss", "test_accuracy", "coefficient_p10",
               "coefficient_median", "coefficient_p90"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def training_figure(table: pd.DataFrame, dataset: str) -> Figure | None:
    """Per run (mean over seeds): the training loss and test accuracy per epoch, and for the
    damped runs the coefficients' median per epoch with their 10-90% band over blocks."""
    mine = table[table["dataset"] == dataset]
    if mine.empty:
        return None
    damped = mine["coefficient_median"].notna().any()
    figure, axes = _grid(3 if damped else 2, columns=3, size=(4.0, 3.2))
    runs = ordered(zip(mine["run"], mine["model"], strict=True))
    line = styles({m for _, m in runs})
    for run, model in runs:
        curve = mine[mine["run"] == run].groupby("epoch").mean(numeric_only=True)
        label = model_label(model) if len({m for _, m in runs}) == len(runs) else run
        style = {"color": colour(model), "linestyle": line[model], "marker": "o", "markersize": 2}
        axes[0].plot(curve.index, curve["train_loss"], label=label, **style)
        axes[1].plot(curve.index, curve["test_accuracy"], label=label, **style)
        if damped and curve["coefficient_median"].notna().any():
            axes[2].plot(curve.index, curve["coefficient_median"], label=label, **style)
            axes[2].fill_between(curve.index, curve["coefficient_p10"], curve["coefficient_p90"], color=colour(model),
                                 alpha=0.15, linewidth=0)  # fmt: skip
    for ax, ylabel in zip(axes, ("training loss", "test accuracy (%)", "act(λ_n): median, 10-90% of blocks"), strict=False):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"Training curves, {dataset_label(dataset)} (mean over seeds)", fontsize=10)
    return figure


# --- Fig. 2: loss landscape -----------------------------------------------------------------------


def directions(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_fgsm, d_orth) for one image `x` (1 x C x H x W in [0, 1]): the FGSM direction
    sign(grad of the loss), and random signs made orthogonal to it and rescaled to the
    same L-infinity norm (1)."""
    x = x.detach().clone().requires_grad_(True)
    d_fgsm = torch.autograd.grad(F.cross_entropy(model(x), y), x)[0].sign()
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    signs = signs.to(x.device)
    norm = (d_fgsm * d_fgsm).sum()
    orth = signs - (signs * d_fgsm).sum() / norm * d_fgsm if norm > 0 else signs
    return d_fgsm.detach(), orth / orth.abs().max()


def landscape(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    d_fgsm: torch.Tensor,
    d_orth: torch.Tensor,
    radius: float,
    points: int,
    batch: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets in 1/255, loss, predicted class) over the grid x + a d_fgsm + b d_orth,
    a (rows) and b (columns) in [-radius, radius] / 255, inputs clamped to [0, 1];
    computed `batch` grid points at a time."""
    offsets = np.linspace(-radius, radius, points)
    a, b = np.meshgrid(offsets, offsets, indexing="ij")
    coords = torch.tensor(np.stack([a.ravel(), b.ravel()], 1) / 255, dtype=torch.float32, device=x.device)
    losses, classes = [], []
    with torch.no_grad():
        for chunk in coords.split(batch):
            inputs = (x + chunk[:, 0, None, None, None] * d_fgsm + chunk[:, 1, None, None, None] * d_orth).clamp(0, 1)
            logits = model(inputs)
            losses.append(F.cross_entropy(logits, y.expand(len(chunk)), reduction="none").cpu())
            classes.append(logits.argmax(1).cpu())
    shape = (points, points)
    return offsets, torch.cat(losses).reshape(shape).numpy(), torch.cat(classes).reshape(shape).numpy()


def landscape_figure(examples: list[tuple[str, int, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]]) -> Figure:
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
            image = top.imshow(loss.T, origin="lower", extent=extent, vmin=low, vmax=high, cmap="viridis", aspect="auto")
            top.set_title(f"{title}\n{name}: loss", fontsize=9)
            bottom = figure.add_subplot(2 * len(examples), columns, (2 * row + 1) * columns + i + 1)
            classes_image = bottom.imshow(classes.T, origin="lower", extent=extent, cmap="tab10", vmin=-0.5, vmax=9.5,
                                          aspect="auto", interpolation="nearest")  # fmt: skip
            bottom.set_title(f"{name}: predicted class (true: {true_class})", fontsize=9)
            for ax in (top, bottom):
                ax.set_xlabel("a along its d_fgsm (1/255)")
                ax.set_ylabel("b along its d_orth (1/255)")
                ax.plot([0], [0], marker="+", color="white", markersize=10)
            tops.append(top)
            bottoms.append(bottom)
    figure.colorbar(image, ax=tops + bottoms, label="cross-entropy loss", shrink=0.6, location="right")
    classes_bar = figure.colorbar(classes_image, ax=tops + bottoms, label="predicted class", shrink=0.6,
                                  location="bottom", ticks=range(10))  # fmt: skip
    classes_bar.ax.tick_params(labelsize=7)
    return figure


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
        gains = [wide.xs((run, "ensemble"), level=("run", "kind"))[m].iloc[0] - wide.xs((run, "single"), level=("run", "kind"))[m].iloc[0]
                 for m in metrics]  # fmt: skip
        bars = ax.bar(np.arange(len(metrics)) + (i - (len(runs) - 1) / 2) * width, gains, width,
                      color=colour(models[run]), label=model_label(models[run]), edgecolor="black", linewidth=0.4,
                      hatch="//" if line[models[run]] != "-" else None)  # fmt: skip
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
    panels = [a for a in CURVES if mine["metric"].str.startswith(a + "@").any()]
    if not panels:
        return None
    figure, axes = _grid(len(panels), columns=len(panels), size=(4.0, 3.4))
    runs = ordered(zip(mine["run"], mine["model"], strict=True))
    line = styles({m for _, m in runs})
    for ax, attack in zip(axes, panels, strict=True):
        for run, model in runs:
            rows = _curve(mine, run, attack)
            if rows.empty:
                continue
            ax.plot(rows["eps"], rows["mean"], marker="o", markersize=3, color=colour(model), linestyle=line[model],
                    label=model_label(model) if len(set(m for _, m in runs)) == len(runs) else run)  # fmt: skip
            ax.fill_between(rows["eps"], rows["mean"] - rows["std"], rows["mean"] + rows["std"], color=colour(model),
                            alpha=0.15, linewidth=0)  # fmt: skip
            if attack == "pgd":
                for extra, marker in (("worst", "x"), ("autoattack", "*")):
                    points = _curve(mine, run, extra)
                    ax.scatter(points["eps"], points["mean"], marker=marker, s=40, color=colour(model), zorder=3)
        ax.set_title(attack.upper() if attack != "uniform" else "uniform noise", fontsize=10)
        ax.set_xticks(sorted(_curve(mine, None, attack)["eps"].unique()))
        ax.set_xlabel("radius ε (1/255)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7, loc="upper right")
    if "pgd" in panels:
        axes[panels.index("pgd")].text(0.02, 0.02, "× worst case   ★ AutoAttack", transform=axes[panels.index("pgd")].transAxes,
                                       fontsize=7)  # fmt: skip
    figure.suptitle(f"Accuracy against the radius, {dataset_label(dataset)} (mean ± std over seeds)", fontsize=10)
    return figure


def _curve(mine: pd.DataFrame, run: str | None, attack: str) -> pd.DataFrame:
    """`attack`'s accuracy against the radius, of one run (None: every run)."""
    rows = mine[((mine["run"] == run) if run is not None else True) & mine["metric"].str.startswith(attack + "@")]
    rows = rows.assign(eps=rows["metric"].str.split("@").str[1].astype(float)).sort_values("eps")
    return rows.assign(std=rows["std"].fillna(0.0))


def severity_table(frame: pd.DataFrame, kept: pd.DataFrame) -> pd.DataFrame:
    """Per kept single-model noise measurement, its accuracy at each severity (%):
    dataset, run, model, seed, group, severity, value."""
    pooled = kept[kept["perturbation"].isin(NOISE_GROUPS) & (kept["kind"] == "single")]
    keys = ["dataset", "run", "seed", "members", "perturbation", "data_source", "preset", "params", "checkpoint_sha256"]
    severities = frame[frame["perturbation"].isin(NOISE_GROUPS) & (frame["severity"] > 0)]
    joined = severities.merge(pooled[[*keys, "n_test", "model"]].rename(columns={"model": "kept_model"}), on=keys)
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
    figure, axes = _grid(len(NOISE_GROUPS), columns=len(NOISE_GROUPS), size=(3.6, 3.2))
    runs = ordered(zip(mine["run"], mine["model"], strict=True))
    line = styles({m for _, m in runs})
    for ax, group in zip(axes, NOISE_GROUPS, strict=True):
        for run, model in runs:
            stats = mine[(mine["run"] == run) & (mine["group"] == group)].groupby("severity")["value"].agg(["mean", "std"])
            stats = stats.reindex(SEVERITIES).fillna({"std": 0.0})
            ax.plot(stats.index, stats["mean"], marker="o", markersize=3, color=colour(model), linestyle=line[model],
                    label=model_label(model) if len(set(m for _, m in runs)) == len(runs) else run)  # fmt: skip
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=colour(model),
                            alpha=0.15, linewidth=0)  # fmt: skip
        ax.set_title(group.replace("_", " "), fontsize=10)
        ax.set_xlabel("severity")
        ax.set_xticks(SEVERITIES)
        ax.set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower left")
    figure.suptitle(f"Accuracy against the noise severity, {dataset_label(dataset)} (mean ± std over seeds)",
                    fontsize=10)  # fmt: skip
    return figure


# --- all of them ----------------------------------------------------------------------------------


def draw_all(m, results: Path, preset: str, data_dir=None, config: FigureConfig = FigureConfig(),
             folders: list[RunFolder] | None = None) -> list:  # fmt: skip
    """Every figure the records (and, for Figures 1-2 and the training curves, the
    checkpoint folders and data) allow: a `Drawn` or a `Skipped` for each. `m`:
    measured.Measured; `folders`: run_folders(results, m.runs, preset) when already read."""
    aggregated = m.aggregated[m.aggregated["preset"] == preset]
    folders = run_folders(results, m.runs, preset) if folders is None else folders
    out: list = []
    table = coefficient_table(folders)
    if table.empty:
        out.append(Skipped("fig1_coefficients", "no finished In-ResNet or λ-In-ResNet run with scalar coefficients"))
    else:
        out += _coefficient_figures(table, preset)
    out += _landscapes(results, data_dir, config, folders)
    severity = severity_table(m.frame, m.kept[m.kept["preset"] == preset])
    training = training_table(folders)
    for dataset in sorted(set(aggregated["dataset"]) | set(training["dataset"])):
        name = dataset_label(dataset)
        runs = ", ".join(dict.fromkeys(aggregated.loc[aggregated["dataset"] == dataset, "run"]))
        for stem, figure, caption in (
            (f"fig3_ensemble_gain_{dataset}", gain_figure(aggregated, dataset),
             f"Fig. 3 ({name}): the ensemble's accuracy gain over the mean of its single models, per perturbation."),
            (f"robustness_{dataset}", robustness_figure(aggregated, dataset),
             f"Accuracy against the radius per attack on {name}, mean ± std over seeds, worst case and AutoAttack "
             f"points in the PGD panel (runs: {runs})."),
            (f"severity_{dataset}", severity_figure(severity, dataset),
             f"Accuracy against the severity of each noise group on {name}, mean ± std over seeds."),
            (f"training_{dataset}", training_figure(training, dataset),
             f"Training curves on {name} from each run's epochs.csv, mean over seeds: training loss, test accuracy "
             f"(the whole test set after each epoch) and, for the damped runs, the median of act(λ_n) over the damped "
             f"blocks with its 10-90% band (gating rules: each block's median over {GATE_IMAGES:,} test images)."),
        ):  # fmt: skip
            out.append(render(figure, stem, caption) if figure is not None else Skipped(stem, "nothing of it recorded"))
    return out


def _landscapes(results: Path, data_dir, config: FigureConfig, folders: list[RunFolder]) -> list:
    """Fig. 2 for the first data set with a finished ResNet and interpolated model of the
    same architecture and seed: each model along its own directions."""
    from bench.eval.sanity import plain_counterpart

    present = {(f.dataset, f.run, f.seed) for f in folders}
    for f in folders:
        plain = plain_counterpart(f.model) if rule_of(f.model) in ("in", "lambda-in") else None
        preset, length, n_train = f.recipe  # the ResNet has no λ, so no @lambda part
        partner = run_tag(plain, preset, length, None, n_train) if plain else None
        if partner is None or (f.dataset, partner, f.seed) not in present:
            continue
        dataset, seed = f.dataset, f.seed
        images = landscape_images(dataset, data_dir, config)
        if isinstance(images, Skipped):
            return [images]
        pair = [(partner, plain), (f.run, f.model)]
        nets = [(model_label(name), zoo_defense(tag, dataset, seed, results).model) for tag, name in pair]
        examples, notes = [], []
        for n, (title, x, y) in enumerate(images, 1):
            panels, right = [], []
            for name, net in nets:
                d_fgsm, d_orth = directions(net, x, y, config.landscape_seed)  # each model its own
                offsets, loss, classes = landscape(net, x, y, d_fgsm, d_orth, config.landscape_radius,
                                                   config.landscape_points, config.landscape_batch)  # fmt: skip
                panels.append((name, offsets, loss, classes))
                with torch.no_grad():
                    right.append(bool(net(x).argmax(1) == y))
            examples.append((title, int(y), panels))
            notes.append(f"({n}) {title}: {_agreement([name for name, _ in nets], right)}")
        caption = (f"Fig. 2: loss and predicted class on x + a·d_fgsm + b·d_orth ({dataset_label(dataset)}, seed {seed}; "
                   f"runs {pair[0][0]}, {pair[1][0]}), each model along its own FGSM direction d_fgsm and its own "
                   f"random direction d_orth orthogonal to it, as the paper draws it. " + "; ".join(notes) + ".")  # fmt: skip
        return [render(landscape_figure(examples), "fig2_landscape", caption)]
    return [Skipped("fig2_landscape", "no finished ResNet and In-ResNet (or λ-In-ResNet) of one depth and seed")]


# The paper's Fig. 2 images: "the 3rd image of the shot-noise group" and "the 8th of the
# speckle-noise group" of CIFAR-10-C. A group file starts with severity 1, so these are
# its rows 2 and 7: test images 2 and 7 at severity 1. Without the files: those two clean.
PAPER_LANDSCAPE_IMAGES = (("shot_noise", 2), ("speckle_noise", 7))


def landscape_images(dataset: str, data_dir, config: FigureConfig) -> list[tuple[str, torch.Tensor, torch.Tensor]] | Skipped:
    """(title, x 1 x C x H x W in [0, 1], y of shape (1,)) of each Fig. 2 example: the
    clean test image `config.landscape_index`, else the paper's noise images when the noise
    files are on disk (figures never generate or download anything), else the same two
    test images clean."""
    from bench.data.datasets import dataset_info
    from bench.data.splits import generation_folder, load_noise, load_test

    try:
        test = load_test(dataset, data_dir) if _data_present(dataset_info(dataset), data_dir) else None
    except UserError:
        test = None
    if test is None:
        return Skipped("fig2_landscape", f"the {dataset} test set is not in the data dir")

    def one(images: np.ndarray, labels: np.ndarray, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(images[row : row + 1])).permute(0, 3, 1, 2).float() / 255, torch.tensor([int(labels[row])])

    if config.landscape_index is not None:
        row = config.landscape_index
        check_landscape_index(row, len(test), dataset)
        return [(f"clean test image {row}", *one(test.images, test.labels, row))]
    if generation_folder(dataset, data_dir, "auto") is None:  # the noise files are there: read them
        out = []
        for group, row in PAPER_LANDSCAPE_IMAGES:
            noise = load_noise(dataset, group, data_dir, "auto", test=test)
            title = f"{noise.source} {group.replace('_', ' ')} #{row + 1} (severity 1, test image {row})"
            out.append((title, *one(noise.images, noise.labels, row)))
        return out
    return [(f"clean test image {row} (no noise files)", *one(test.images, test.labels, row))
            for _, row in PAPER_LANDSCAPE_IMAGES]  # fmt: skip


def check_landscape_index(index: int | None, images: int, dataset: str) -> None:
    """One error line for a Fig. 2 image beyond the test set (never another image drawn)."""
    if index is not None and index >= images:
        raise UserError(f"--landscape-index {index} is beyond the {images:,} test images of {dataset}: give 0 to "
                        f"{images - 1}, or leave it out for the paper's two images")  # fmt: skip


def _agreement(names: list[str], right: list[bool]) -> str:
    if all(right):
        return "both models right"
    if not any(right):
        return "both models wrong"
    return "only " + " and ".join(n for n, r in zip(names, right, strict=True) if r) + " right"


def _data_present(spec, data_dir) -> bool:
    """Whether the test split is on disk (figures never download)."""
    from bench.data.cifar import data_root

    folder = data_root(data_dir) / spec.folder
    return not spec.files or all((folder / name).is_file() for name, _ in spec.files["test"])
