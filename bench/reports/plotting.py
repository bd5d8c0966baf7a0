"""What every figure shares: colours and line styles per skip rule, the panel grid, and
rendering to PNG and PDF bytes without timestamps (matplotlib's object API, Agg)."""

from __future__ import annotations

import io
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from models import list_models, model_entry, model_label

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


def ordered(pairs) -> list[tuple[str, str]]:
    """(run, model) pairs, without repeats, in the paper's order."""
    return sorted(dict.fromkeys(pairs), key=lambda p: (rule_rank(p[1]), p[1], p[0]))


def colour(model: str) -> str:
    return RULE_COLOURS.get(rule_of(model), OTHER_COLOUR)


def styles(models) -> dict[str, str]:
    """A line style per depth (the digits in a model's name; the first depth solid)."""
    depths = sorted({"".join(c for c in m if c.isdigit()) for m in models}, key=lambda d: (len(d), d))
    return {m: STYLES[depths.index("".join(c for c in m if c.isdigit())) % len(STYLES)] for m in models}


_STAMP: ContextVar[str] = ContextVar("stamp", default="")


@contextmanager
def stamped(text: str):
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
    mine: pd.DataFrame, panels: list, rows_of, curve, size: tuple[float, float]
) -> tuple[Figure, list]:
    """A row of panels, a line per (run, model) of `mine` with a band: `rows_of(rows,
    panel)` picks a run's rows of a panel, `curve(rows)` gives (x, middle, low, high)."""
    figure, axes = panel_grid(len(panels), columns=len(panels), size=size)
    runs = ordered(zip(mine["run"], mine["model"], strict=True))
    line = styles({m for _, m in runs})
    one_run_each = len({m for _, m in runs}) == len(runs)
    for ax, panel in zip(axes, panels, strict=True):
        for run, model in runs:
            rows = rows_of(mine[mine["run"] == run], panel)
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
