"""What every figure shares: colours and line styles per skip rule, the panel grid, and
rendering to PNG and PDF bytes without timestamps (matplotlib's object API, Agg); and the
figures read from the checkpoint folders: Fig. 1's interpolation coefficients per run
(with the paper's shares), and the training curves from each run's epochs.csv."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bench.data.datasets import dataset_label
from bench.records.checkpoints import EPOCHS_FILE, META_FILE, read_meta, zoo_checkpoint_dir
from models import SkipRule, create_model, list_models, model_entry, model_label

matplotlib.use("Agg")  # no display, whatever the user's matplotlibrc says

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


@dataclass
class Drawn:
    name: str  # file stem under results/figures/
    caption: str
    files: dict[str, bytes] = field(default_factory=dict)  # file name -> contents


@dataclass
class Skipped:
    name: str
    reason: str


def rule_of(model: str) -> str:
    """A registered model's skip rule, or '' for a defense of the user's."""
    return model_entry(model).rule if model in list_models() else ""


def rule_rank(model: str) -> int:
    """The paper's order: ResNet, In-, λ-In-, the variants, then other defenses."""
    return list(RULE_COLOURS).index(rule_of(model)) if rule_of(model) in RULE_COLOURS else len(RULE_COLOURS)


def ordered(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(run, model) pairs, without repeats, in the paper's order."""
    return sorted(dict.fromkeys(pairs), key=lambda p: (rule_rank(p[1]), p[1], p[0]))


def colour(model: str) -> str:
    return RULE_COLOURS.get(rule_of(model), OTHER_COLOUR)


def styles(models: Iterable[str]) -> dict[str, str]:
    """A line style per depth (the digits in a model's name; the first depth solid)."""
    depths = sorted({"".join(c for c in m if c.isdigit()) for m in models}, key=lambda d: (len(d), d))
    return {m: STYLES[depths.index("".join(c for c in m if c.isdigit())) % len(STYLES)] for m in models}


_STAMP: ContextVar[str] = ContextVar("stamp", default="")


@contextmanager
def stamped(text: str) -> Iterator[None]:
    """Figures rendered inside say `text` across their top, and their captions begin with
    it (a rehearsal's: its numbers are not measurements); '' stamps nothing."""
    token = _STAMP.set(text)
    try:
        yield
    finally:
        _STAMP.reset(token)


def render(figure: Figure, name: str, caption: str) -> Drawn:
    """The figure as PNG and PDF bytes, without timestamps (the same inputs give the same
    bytes)."""
    stamp = _STAMP.get()
    if stamp:
        figure.suptitle(stamp, color="tab:red", fontweight="bold")
        caption = f"{stamp}. {caption}"
    files = {}
    for fmt, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, dpi=100, metadata=metadata)  # constrained layout: nothing clipped
        files[f"{name}.{fmt}"] = buffer.getvalue()
    return Drawn(name, caption, files)


def panel_grid(count: int, columns: int = 3, size: tuple[float, float] = (4.2, 3.2)) -> tuple[Figure, list]:
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(count)]
    return figure, axes


def line_panels(
    frame: pd.DataFrame,
    panels: list,
    rows_of: Callable[[pd.DataFrame, str], pd.DataFrame],
    curve: Callable[[pd.DataFrame], tuple],
    size: tuple[float, float],
) -> tuple[Figure, list]:
    """A row of panels, a line per (run, model) of `frame` with a band: `rows_of(rows,
    panel)` picks a run's rows of a panel, `curve(rows)` gives (x, middle, low, high)."""
    figure, axes = panel_grid(len(panels), columns=len(panels), size=size)
    runs = ordered(zip(frame["run"], frame["model"], strict=True))
    line = styles({m for _, m in runs})
    one_run_each = len({m for _, m in runs}) == len(runs)
    for ax, panel in zip(axes, panels, strict=True):
        for run, model in runs:
            rows = rows_of(frame[frame["run"] == run], panel)
            if rows.empty:
                continue
            x, middle, low, high = curve(rows)
            ax.plot(
                x,
                middle,
                color=colour(model),
                linestyle=line[model],
                marker="o",
                markersize=2,
                label=model_label(model) if one_run_each else run,
            )
            ax.fill_between(x, low, high, color=colour(model), alpha=0.15, linewidth=0)
    return figure, axes


PUBLISHED = Path(__file__).with_name("published_figures.csv")


SHARE_THRESHOLD = 0.01  # the paper counts coefficients above this


@functools.cache
def never_trained_blocks(model: str) -> int:
    """Blocks of a registered model that the release's `print_ks` logs a coefficient for but
    never trains: those its rule leaves undamped (the first block and the projections; 3 of
    54 in In-ResNet-110 and -164). The release keeps one scalar per block, and an unused one
    keeps its initial value, so the log counts them at their initial draw."""
    with torch.device("meta"):  # the structure only: no weights
        net = create_model(model)
    return sum(isinstance(m, SkipRule) for m in net.modules()) - len(net.damped_skips())


def seed_shares(rows: pd.DataFrame) -> pd.DataFrame:
    """Per seed of one run's coefficient rows: `damped`, the share (%) of the damped
    blocks whose act(λ_n) exceeds 0.01, and `logged`, the share as the release counts it,
    over every block print_ks logs, the never-trained ones at their initial draw from
    U[a, b] (above 0.01 when a is; NaN when the draw could lie either side of it)."""
    never = never_trained_blocks(rows["model"].iloc[0]) if len(rows) else 0
    init_above = rows["lambda_low"].iloc[0] > SHARE_THRESHOLD if len(rows) else True
    out = []
    for seed, seed_rows in rows.groupby("seed"):
        above, blocks = int((seed_rows["coefficient"] > SHARE_THRESHOLD).sum()), len(seed_rows)
        logged = 100 * (above + never) / (blocks + never) if init_above or never == 0 else math.nan
        out.append(
            {"seed": int(seed), "damped": 100 * above / blocks, "logged": logged, "blocks": blocks + never}
        )
    return pd.DataFrame(out, columns=["seed", "damped", "logged", "blocks"])


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
    """Every finished run of `preset` (its meta.json says which) whose folder is on disk, read once."""
    out = []
    finished = runs[runs["status"] == "finished"]
    for run, dataset, seed, model, low, high in zip(
        finished["run"],
        finished["dataset"],
        finished["seed"],
        finished["model"],
        finished["lambda_low"],
        finished["lambda_high"],
        strict=True,
    ):
        folder = zoo_checkpoint_dir(results_dir, dataset, run, seed)
        if not (folder / META_FILE).is_file():  # not on disk: its records stand, its curves are not there
            continue
        meta = read_meta(folder / META_FILE)
        if meta.get("preset", "paper") != preset:
            continue
        init = None if pd.isna(low) else (float(low), float(high))
        recipe = (meta.get("preset", "paper"), meta.get("length", "full"), meta.get("n_train"))
        out.append(
            RunFolder(
                dataset,
                run,
                model,
                int(seed),
                init,
                tuple(meta.get("interpolation_coefficients") or ()),
                read_epochs(folder),
                recipe,
            )
        )
    return out


def coefficient_table(folders: list[RunFolder]) -> pd.DataFrame:
    """act(d_n) per damped block of every run with scalar coefficients (In-, λ-In-, sig
    rules): dataset, run, model, lambda_low, lambda_high, seed, block (from 1), coefficient."""
    rows = [
        {
            "dataset": f.dataset,
            "run": f.run,
            "model": f.model,
            "lambda_low": f.lambda_init[0],
            "lambda_high": f.lambda_init[1],
            "seed": f.seed,
            "block": i + 1,
            "coefficient": c,
        }
        for f in folders
        if f.lambda_init is not None
        for i, c in enumerate(f.coefficients)
    ]
    return pd.DataFrame(
        rows, columns=["dataset", "run", "model", "lambda_low", "lambda_high", "seed", "block", "coefficient"]
    )


def paper_panels(table: pd.DataFrame, published: pd.DataFrame, preset: str) -> pd.Series:
    """Which rows of the coefficient table are the paper's Fig. 1: the models and data sets
    it draws (published_figures.csv), trained with the paper's full recipe at the model's
    default initialisation."""
    from bench.records.selection import paper_recipe_tags

    panels = published[published["figure"] == 1]
    wanted = {
        (d, r)
        for d, m in zip(panels["dataset"], panels["model"], strict=True)
        for r in paper_recipe_tags(m, preset, None)
    }
    return pd.Series(
        [(d, r) in wanted for d, r in zip(table["dataset"], table["run"], strict=True)],
        index=table.index,
        dtype=bool,
    )


def coefficients_figure(table: pd.DataFrame, published: pd.DataFrame | None) -> Figure:
    """One panel per run: each seed's coefficients as points, their mean as a line, the
    share above 0.01 measured and, for the paper's panels (`published` given), published;
    without `published` the titles name the initialisation and nothing is compared."""
    runs = sorted(
        dict.fromkeys(zip(table["dataset"], table["run"], table["model"], strict=True)),
        key=lambda t: (t[0], rule_rank(t[2]), t[2], t[1]),
    )
    figure, axes = panel_grid(len(runs))
    for ax, (dataset, run, model) in zip(axes, runs, strict=True):
        run_rows = table[(table["dataset"] == dataset) & (table["run"] == run)]
        for seed, points in run_rows.groupby("seed"):
            ax.scatter(
                points["block"],
                points["coefficient"],
                s=9,
                alpha=0.45,
                color=colour(model),
                label="seeds" if seed == run_rows["seed"].min() else None,
            )
        mean = run_rows.groupby("block")["coefficient"].mean()
        ax.plot(mean.index, mean.values, color="black", linewidth=1.2, label="mean over seeds")
        shares = seed_shares(run_rows)
        damped, logged, blocks = (
            shares["damped"].mean(),
            shares["logged"].mean(),
            int(shares["blocks"].iloc[0]),
        )
        counted = f"{damped:.1f}% of damped" + ("" if math.isnan(logged) else f", {logged:.1f}% of {blocks}")
        name = model_label(model) + ("" if run == model else f" ({run})")
        if published is None:
            low, high = run_rows["lambda_low"].iloc[0], run_rows["lambda_high"].iloc[0]
            title = f"{name}, λ~U[{low:.4g}, {high:.4g}], {dataset_label(dataset)}: > 0.01: {counted}"
        else:
            paper = published[(published["dataset"] == dataset) & (published["model"] == model)]["value"]
            quoted = f"; paper {paper.iloc[0]:.1f}% of {blocks}" if len(paper) else ""
            title = f"{name}, {dataset_label(dataset)}: > 0.01: {counted}{quoted}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("damped block (depth order)")
        ax.set_ylabel("coefficient act(λ_n)")
        ax.axhline(SHARE_THRESHOLD, color="gray", linewidth=0.6, linestyle=":")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper right")
    return figure


def coefficient_figures(table: pd.DataFrame, preset: str) -> list:
    """Fig. 1 (the paper's panels) and the coefficients of every other damped run."""
    published = pd.read_csv(PUBLISHED)
    paper = paper_panels(table, published, preset)
    wanted = published[published["figure"] == 1]
    names = " and ".join(
        f"{model_label(m)} on {dataset_label(d)}"
        for d, m in zip(wanted["dataset"], wanted["model"], strict=True)
    )
    out: list[Drawn | Skipped] = []
    if paper.any():
        runs = ", ".join(dict.fromkeys(table.loc[paper, "run"]))
        caption = (
            f"Fig. 1: interpolation coefficients act(λ_n) per damped block of {names} (the paper's panels: its "
            f"full recipe, default initialisation), each seed and their mean. Titles give two shares above "
            f"0.01: of the damped blocks, and of all blocks as the release's print_ks logs them (the published "
            f"count: the never-trained first and projection blocks at their initial value, above 0.01), "
            f"against the published share (runs: {runs})."
        )
        out.append(render(coefficients_figure(table[paper], published), "fig1_coefficients", caption))
    else:
        out.append(
            Skipped(
                "fig1_coefficients",
                f"no finished run of {names} with the paper's full recipe at the default initialisation",
            )
        )
    if (~paper).any():
        runs = ", ".join(dict.fromkeys(table.loc[~paper, "run"]))
        caption = (
            f"Interpolation coefficients act(λ_n) per damped block of the other damped runs, each seed and their "
            f"mean, with the shares above 0.01 (of the damped blocks; of all blocks as the release counts, where "
            f"the initialisation decides the never-trained ones); each panel names its initialisation and data set, and none is "
            f"compared with the paper (runs: {runs})."
        )
        out.append(render(coefficients_figure(table[~paper], None), "coefficients_other", caption))
    return out


def training_table(folders: list[RunFolder]) -> pd.DataFrame:
    """Per run, seed and epoch of the training logs: dataset, run, model, seed, epoch,
    train_loss, test_accuracy (%), and the coefficients' median, 10th and 90th percentile
    over the damped blocks (NaN for the rules without λ; the per-block median for gates)."""
    rows = []
    for f in folders:
        if f.epochs is None:
            continue
        coefficients = f.epochs[
            [
                c
                for c in f.epochs.columns
                if c.startswith("coefficient_") and (c.count("_") == 1 or c.endswith("_median"))
            ]
        ]
        for i, epoch in enumerate(f.epochs.to_dict("records")):
            values = coefficients.iloc[i].to_numpy(dtype=float) if len(coefficients.columns) else np.array([])
            low, mid, high = np.percentile(values, [10, 50, 90]) if values.size else (np.nan,) * 3
            rows.append(
                {
                    "dataset": f.dataset,
                    "run": f.run,
                    "model": f.model,
                    "seed": f.seed,
                    "epoch": int(epoch["epoch"]),
                    "train_loss": epoch["train_loss"],
                    "test_accuracy": 100 * epoch["test_accuracy"],
                    "coefficient_p10": low,
                    "coefficient_median": mid,
                    "coefficient_p90": high,
                }
            )
    columns = [
        "dataset",
        "run",
        "model",
        "seed",
        "epoch",
        "train_loss",
        "test_accuracy",
        "coefficient_p10",
        "coefficient_median",
        "coefficient_p90",
    ]
    return pd.DataFrame(rows, columns=columns)


def training_figure(table: pd.DataFrame, dataset: str) -> Figure | None:
    """Per run (mean over seeds): the training loss and test accuracy per epoch, and for the
    damped runs the coefficients' median per epoch with their 10-90% band over blocks."""
    on_dataset = table[table["dataset"] == dataset]
    if on_dataset.empty:
        return None
    damped = on_dataset["coefficient_median"].notna().any()
    figure, axes = panel_grid(3 if damped else 2, columns=3, size=(4.0, 3.2))
    runs = ordered(zip(on_dataset["run"], on_dataset["model"], strict=True))
    line = styles({m for _, m in runs})
    for run, model in runs:
        curve = on_dataset[on_dataset["run"] == run].groupby("epoch").mean(numeric_only=True)
        label = model_label(model) if len({m for _, m in runs}) == len(runs) else run
        style = {"color": colour(model), "linestyle": line[model], "marker": "o", "markersize": 2}
        axes[0].plot(curve.index, curve["train_loss"], label=label, **style)
        axes[1].plot(curve.index, curve["test_accuracy"], label=label, **style)
        if damped and curve["coefficient_median"].notna().any():
            axes[2].plot(curve.index, curve["coefficient_median"], label=label, **style)
            axes[2].fill_between(
                curve.index,
                curve["coefficient_p10"],
                curve["coefficient_p90"],
                color=colour(model),
                alpha=0.15,
                linewidth=0,
            )
    for ax, ylabel in zip(
        axes, ("training loss", "test accuracy (%)", "act(λ_n): median, 10-90% of blocks"), strict=False
    ):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"Training curves, {dataset_label(dataset)} (mean over seeds)", fontsize=10)
    return figure
