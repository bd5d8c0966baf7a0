"""The paper's Tables 1-6: which cells they hold, filled from aggregated records, rendered
beside the published numbers (published.csv: mean and std per cell as printed).

A table is a list of `TableCell`s (block, row, column -> which data set, model, λ init, single
or ensemble, metric). On CIFAR the rows are the paper's models; on other data (the
synthetic smoke set) the same tables are built for the depths found in the records, and
never compared with the paper. Tables 4 and 5 have a row per initialisation interval:
Table 4 shows each variant at the interval the paper's rule chooses (Sec. 4.4), Table 5
counts each interval's failed runs. Formatting happens only in the `render_*` functions."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.attacks.perturbations import ATTACK, DERIVED, PERTURBATIONS, metric_name, metric_radius
from bench.core.presets import test_selected_note
from bench.data.datasets import dataset_info, dataset_label, paper_datasets
from bench.records.selection import best_groups, lambda_key
from models import ModelEntry, find_model, list_models, model_entries, model_entry, model_label
from models.zoo import VARIANT_RULES

PUBLISHED = Path(__file__).with_name("published.csv")


def published() -> pd.DataFrame:
    return pd.read_csv(PUBLISHED)


def published_value(
    paper: pd.DataFrame, dataset: str, model: str, init: tuple[float, float] | None, kind: str, metric: str
) -> float:
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


# The initialisations of the paper's Table 5 study, as intervals of the starting coefficient
# act(λ_n) (None: each model's default, U[0.2, 0.25]).
LAMBDA_SWEEP = ((0.0, 0.1), (0.1, 0.2), None, (0.25, 0.3), (0.3, 0.4))
# Table 4's grid: the paper "elaborately tune[s] the initialization intervals" of the variants
# and reports, per variant, the one with the largest clean + noise accuracy (Sec. 4.4), but
# gives no grid. Ours is Table 5's intervals of the starting coefficient, mapped into each
# rule's d (ModelEntry.init_for: logits for the sigmoid rules).
VARIANT_GRID = ((0.0, 0.1), (0.1, 0.2), (0.2, 0.25), (0.25, 0.3), (0.3, 0.4))
SELECTION_SCORE = ("clean", "noise")  # the metrics whose means add up to an interval's score (Sec. 4.4)
FULL_SEEDS = 5  # the paper's; fewer are shown as (n=k)
NOISE_COLUMNS = (
    ("Impulse", "impulse_noise"),
    ("Speckle", "speckle_noise"),
    ("Gaussian", "gaussian_noise"),
    ("Shot", "shot_noise"),
    ("Avg.", "noise"),
)
AT_2 = (("Acc.", "clean"), ("noise", "noise"), ("FGSM", "fgsm@2"), ("IFGSM", "ifgsm@2"), ("PGD", "pgd@2"))
ATTACKS_AT_124 = tuple(
    (f"{a.upper()} {e}/255", f"{a}@{e}") for a in ("fgsm", "ifgsm", "pgd") for e in (1, 2, 4)
)


@dataclass(frozen=True)
class Table:
    """One of the paper's tables, as data. Its rows are the registered models whose
    `tables` name it (in registration order: the paper's), on each of `datasets`; on any
    other data set, and for other architectures on these, the same rules are shown for
    whatever was measured, each row labelled with its own depth. `datasets=None`: the
    data sets are the columns (one column per data set, `columns` holds one metric)."""

    key: int | str
    title: str
    columns: tuple[tuple[str, str], ...]  # (header, metric)
    datasets: tuple[str, ...] | None = ("cifar10", "cifar100")
    rows_of: int | None = None  # the rows of another table (Table 3, every attack: Table 1's)
    lambda_sweep: tuple[tuple[float, float] | None, ...] = ()  # a row per starting-coefficient interval
    sweep_rules: tuple[str, ...] = ()  # the rules whose rows sweep `lambda_sweep` (): every rule with a λ
    selects: bool = False  # a swept model shows one row: the interval chosen by `select_intervals`
    ensemble: bool = False  # each row followed by the ensemble of its seeds
    failed_runs: bool = False  # a last column: failed training runs out of all runs

    @property
    def row_table(self) -> int:
        return self.rows_of or int(self.key)


TABLES: dict[int | str, Table] = {
    t.key: t
    for t in (
        Table(1, "Table 1: accuracy (%) on the stochastic noise groups, all five severities", NOISE_COLUMNS),
        Table(2, "Table 2: clean test accuracy (%)", (("", "clean"),), datasets=None),
        Table(
            3, "Table 3: accuracy (%) under FGSM, IFGSM and PGD at radius 1/255, 2/255, 4/255", ATTACKS_AT_124
        ),
        Table(
            4,
            "Table 4: the In-ResNet variants, attacks at 2/255",
            AT_2,
            ("cifar10",),
            lambda_sweep=VARIANT_GRID,
            sweep_rules=VARIANT_RULES,
            selects=True,
        ),
        Table(
            5,
            "Table 5: λ initialisation, attacks at 2/255",
            AT_2,
            ("cifar10",),
            lambda_sweep=LAMBDA_SWEEP,
            failed_runs=True,
        ),
        Table(
            6,
            "Table 6: single models (mean) against the ensemble of their seeds, attacks at 2/255",
            AT_2,
            ("cifar10",),
            ensemble=True,
        ),
        Table(
            "3_all",
            "Table 3, every attack measured: the paper's, the sanity and reference attacks, the worst case",
            (),  # the attacks and radii measured (all_attacks_table)
            rows_of=1,
            ensemble=True,
        ),
    )
}
TITLES = {key: table.title for key, table in TABLES.items()}


@dataclass(frozen=True)
class TableCell:
    block: str  # "" when the table has a single block
    row: str
    column: str
    dataset: str
    model: str
    lambda_init: tuple[float, float] | None
    kind: str  # "single" or "ensemble"
    metric: str
    paper_row: bool = False  # a row of the paper's table on its data set: shown even when empty


# --- which models a table shows ------------------------------------------------------------


def default_lambda(model: str) -> tuple[float, float] | None:
    """The λ initialisation a zoo model gets by default (None: no λ, or not a zoo model)."""
    return model_entry(model).damped_lambda_init if model in list_models() else None


def shown_datasets(frame: pd.DataFrame, paper: tuple[str, ...] | None = None) -> list[str]:
    """`paper` (default: every data set of the paper) when any record of a paper data set
    exists (or none at all), then the data sets the paper does not report on."""
    every = paper_datasets()
    present = set(frame["dataset"])
    cifar = bool(present & set(every)) or not present
    return [*((every if paper is None else paper) if cifar else ()), *sorted(present - set(every))]


def paper_rows(number: int) -> list[ModelEntry]:
    """The registered models Table `number` has a row for, in the paper's order."""
    return [e for e in model_entries() if number in e.tables]


def _templates(number: int) -> list[tuple[str, str]]:
    """(family, rule) of the table's rows, in their order: what a row is at another depth."""
    return list(dict.fromkeys((e.family, e.rule) for e in paper_rows(number)))


def measured_archs(frame: pd.DataFrame, dataset: str, number: int) -> list[str]:
    """Architectures of registered models measured on `dataset` that Table `number` can show
    beyond its own (other depths, other ResNeXt sizes), by family then depth."""
    templates = _templates(number)
    families = list(dict.fromkeys(f for f, _ in templates))
    own = {e.arch for e in paper_rows(number)} if dataset in paper_datasets() else set()
    found = {
        model_entry(name)
        for name in set(frame.loc[frame["dataset"] == dataset, "model"])
        if name in list_models() and (model_entry(name).family, model_entry(name).rule) in templates
    }
    archs = {(families.index(e.family), e.depth, e.arch) for e in found if e.arch not in own}
    return [arch for *_, arch in sorted(archs)]


def row_models(number: int, dataset: str, frame: pd.DataFrame) -> list[ModelEntry]:
    """The models Table `number` shows on `dataset`: on the paper's data sets its own rows,
    then those of every other architecture measured; elsewhere only the latter."""
    own = paper_rows(number) if dataset in paper_datasets() else []
    templates = _templates(number)
    others = [
        entry
        for arch in measured_archs(frame, dataset, number)
        for family, rule in templates
        if (entry := find_model(arch, rule)) is not None and entry.family == family
    ]
    return own + others


# --- the six tables -------------------------------------------------------------------------


def table_slots(number: int, frame: pd.DataFrame, runs: pd.DataFrame | None = None) -> list[TableCell]:
    """The cells of Table `number` for the data in `frame` (records or their per-seed view).
    The paper's own rows on its data sets are always shown; every other row only when its
    model (and, in Table 5, λ initialisation) was measured or, with `runs`, trained."""
    if number not in TABLES:
        raise ValueError(f"the paper has Tables 1-6, not {number}")
    table = TABLES[number]
    return table_slots_filter(_all_slots(table, frame), frame, runs, by_lambda=bool(table.lambda_sweep))


def table_slots_filter(
    slots: list[TableCell], frame: pd.DataFrame, runs: pd.DataFrame | None = None, by_lambda: bool = False
) -> list[TableCell]:
    """`slots` without the rows (block, row) that are not the paper's own and whose model
    (with `by_lambda`: with its λ initialisation) was neither measured nor trained."""
    seen = pd.concat(
        [f[["dataset", "model", "lambda_low", "lambda_high"]] for f in (frame, runs) if f is not None]
    )
    present = {
        (d, m, lambda_key((lo, hi)))
        for d, m, lo, hi in zip(
            seen["dataset"], seen["model"], seen["lambda_low"], seen["lambda_high"], strict=True
        )
    }
    models = {(d, m) for d, m, _ in present}

    def shown(s: TableCell) -> bool:
        if by_lambda:
            return s.paper_row or (s.dataset, s.model, lambda_key(s.lambda_init)) in present
        return s.paper_row or (s.dataset, s.model) in models

    keep = {(s.block, s.row) for s in slots if shown(s)}
    return [s for s in slots if (s.block, s.row) in keep]


def _all_slots(table: Table, frame: pd.DataFrame) -> list[TableCell]:
    if table.datasets is None:  # the data sets are the columns
        datasets = shown_datasets(frame)
        models = list(dict.fromkeys(e.name for d in datasets for e in row_models(table.row_table, d, frame)))
        return [
            slot
            for model in models
            for dataset in datasets
            for slot in _row(
                table, "", model_label(model), dataset, model, ((dataset_label(dataset), "clean"),)
            )
        ]
    slots: list[TableCell] = []
    for dataset in shown_datasets(frame, table.datasets):
        block = dataset_label(dataset)
        for entry in row_models(table.row_table, dataset, frame):
            if swept(table, entry):
                for coefficients in table.lambda_sweep:  # labelled by the starting coefficients
                    init = entry.init_for(coefficients) if coefficients else entry.damped_lambda_init
                    shown = coefficients or init
                    assert shown is not None  # a swept model has a λ (ModelEntry.damped_lambda_init)
                    row = f"{entry.label}, U[{shown[0]:.2f}, {shown[1]:.2f}]"
                    slots += _row(table, block, row, dataset, entry.name, table.columns, init)
                continue
            row = f"{entry.label}, -" if table.lambda_sweep and not table.selects else entry.label
            slots += _row(table, block, row, dataset, entry.name, table.columns)
            if table.ensemble:
                slots += _row(
                    table, block, row + ", ens", dataset, entry.name, table.columns, kind="ensemble"
                )
    return slots


def swept(table: Table, entry: ModelEntry) -> bool:
    """Whether `entry` has a row per interval of the table's sweep."""
    rules = table.sweep_rules or (entry.rule,)
    return bool(table.lambda_sweep) and entry.damped_lambda_init is not None and entry.rule in rules


def all_attacks_slots(frame: pd.DataFrame, aggregated: pd.DataFrame) -> list[TableCell]:
    """Table 3 extended to every attack measured (the registry's, in its order: the paper's,
    the sanity and reference attacks, the worst case) at every radius measured, for the
    main models (Table 1's rows) and their ensembles."""
    measured = set(aggregated["metric"])
    columns = tuple(
        (f"{p.label} {p.radius_text(eps)}", metric)
        for p in sorted(PERTURBATIONS.values(), key=lambda p: p.kind == DERIVED)  # the worst case last
        if p.kind in (ATTACK, DERIVED)
        for eps in sorted({metric_radius(m)[1] for m in measured if m.startswith(p.name + "@")})
        if (metric := metric_name(p.name, eps)) in measured
    )
    table = TABLES["3_all"]
    return table_slots_filter(_all_slots(replace(table, columns=columns), frame), frame)


def _row(
    table: Table,
    block: str,
    row: str,
    dataset: str,
    model: str,
    columns: tuple[tuple[str, str], ...],
    init: tuple[float, float] | None = None,
    kind: str = "single",
) -> list[TableCell]:
    own = dataset in paper_datasets() and table.row_table in model_entry(model).tables
    init = init if init is not None else default_lambda(model)
    return [
        TableCell(block, row, column, dataset, model, init, kind, metric, own) for column, metric in columns
    ]


# --- filling and comparing -----------------------------------------------------------------


FILLED_COLUMNS = [
    *("block", "row", "column", "dataset", "model", "kind", "metric", "lambda_low", "lambda_high"),
    *("mean", "std", "n", "low", "high", "paper", "delta"),
]


def fill(
    slots: list[TableCell],
    aggregated: pd.DataFrame,
    preset: str = "paper",
    table: int | None = None,
    intervals: dict | None = None,
) -> pd.DataFrame:
    """One row per slot (in order) with the measured mean, std and n (NaN when not
    measured), its 95% interval `low`, `high` (from `intervals`, keyed like best_groups),
    the published value for the same cell (Table `table`) and the delta."""
    chosen = best_groups(aggregated[aggregated["preset"] == preset])
    paper = published()
    if table is not None:
        paper = paper[paper["table"] == table]
    rows = []
    for slot in slots:
        found = chosen.get((slot.dataset, slot.model, lambda_key(slot.lambda_init), slot.kind, slot.metric))
        value = published_value(paper, slot.dataset, slot.model, slot.lambda_init, slot.kind, slot.metric)
        mean = found["mean"] if found is not None else math.nan
        low, high = (intervals or {}).get(
            (slot.dataset, slot.model, lambda_key(slot.lambda_init), slot.kind, slot.metric),
            (math.nan, math.nan),
        )
        rows.append(
            {
                **{
                    k: getattr(slot, k)
                    for k in ("block", "row", "column", "dataset", "model", "kind", "metric")
                },
                "lambda_low": slot.lambda_init[0] if slot.lambda_init else math.nan,
                "lambda_high": slot.lambda_init[1] if slot.lambda_init else math.nan,
                "mean": mean,
                "std": found["std"] if found is not None else math.nan,
                "n": found["n"] if found is not None else 0,
                "low": low,
                "high": high,
                "paper": value,
                "delta": mean - value,
            }
        )
    return pd.DataFrame(rows, columns=FILLED_COLUMNS)


# --- rendering -------------------------------------------------------------------------------


def render(filled: pd.DataFrame, view: str = "mean", fmt: str = "github") -> str:
    """`view`: "mean" (as the paper), "std" (mean ± sample std, Appendix D style) or
    "paper" (measured / published (delta)). Unmeasured cells show "-"."""
    if filled.empty:
        return "No model of this table was measured or trained."
    text = filled.apply(lambda r: _cell(r, view), axis=1)
    grid = filled.assign(text=text).pivot_table(
        index=["block", "row"], columns="column", values="text", aggfunc="first", sort=False
    )
    grid = grid[list(dict.fromkeys(filled["column"]))].reset_index()
    headers = ["Benchmark", "Model", *grid.columns[2:]]
    if (grid["block"] == "").all():
        grid, headers = grid.drop(columns="block"), headers[1:]
    return tabulate(grid.values.tolist(), headers=headers, tablefmt=fmt, disable_numparse=True)


def _cell(row: pd.Series, view: str) -> str:
    if row["metric"] == "failed":  # failed / all runs seen
        text = "-" if math.isnan(row["mean"]) else f"{int(row['mean'])}/{int(row['n'])}"
        return text + (
            f" / {int(row['paper'])}/{FULL_SEEDS}" if view == "paper" and not math.isnan(row["paper"]) else ""
        )
    if math.isnan(row["mean"]):
        return "-" if view != "paper" or math.isnan(row["paper"]) else f"- / {row['paper']:.2f}"
    text = f"{row['mean']:.2f}"
    if view == "std" and row["n"] >= 2 and not math.isnan(row["std"]):
        text += f" ± {row['std']:.2f}"
    if row["n"] < FULL_SEEDS:
        text += f" (n={int(row['n'])})"
    if view == "paper" and not math.isnan(row.get("low", math.nan)):
        text += f" [{row['low']:.2f}, {row['high']:.2f}]"
    if view == "paper" and not math.isnan(row["paper"]):
        text += f" / {row['paper']:.2f} ({row['delta']:+.2f})"
    return text


def missing(filled: pd.DataFrame) -> str:
    """One line naming what is not measured, row by row ('' when everything is)."""
    gaps = filled[filled["mean"].isna()]
    if gaps.empty:
        return ""
    parts = []
    for (block, row), cells in gaps.groupby(["block", "row"], sort=False):
        where = f"{block} {row}".strip()
        total = ((filled["block"] == block) & (filled["row"] == row)).sum()
        parts.append(f"{where} ({'all' if len(cells) == total else ', '.join(cells['column'])})")
    return f"Missing {len(gaps)} of {len(filled)} cells: " + "; ".join(parts) + "."


__all__ = [
    "TableCell",
    "fill",
    "missing",
    "published",
    "render",
    "table_slots",
    "published_value",
    "best_groups",
]


def select_intervals(filled: pd.DataFrame, number: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(shown, others): Table `number`'s filled cells with one row per swept model, the
    interval with the largest mean clean accuracy + mean noise-group accuracy (the paper's
    Sec. 4.4 rule; ties go to the earlier interval of the grid), and the other intervals'
    rows that measured anything. The chosen row is labelled as chosen on the test set,
    among how many of the grid's intervals had both numbers. A model with no such interval
    keeps its default interval's row (named by the model alone when it measured nothing).
    Tables that select nothing pass through."""
    table = TABLES[number]
    if not table.selects or filled.empty:
        return filled, filled.iloc[0:0]
    entries = {name: model_entry(name) for name in set(filled["model"]) if name in list_models()}
    shown, others = [], []
    for (_, model), cells in filled.groupby(["block", "model"], sort=False):
        rows = list(cells.groupby("row", sort=False))
        if model not in entries or not swept(table, entries[model]):
            shown += [c for _, c in rows]
            continue
        scores = [_score(c) for _, c in rows]
        scored = [i for i, v in enumerate(scores) if not math.isnan(v)]
        if not scored:
            default = lambda_key(entries[model].damped_lambda_init)
            keep = next((i for i, (_, c) in enumerate(rows) if _init_key(c) == default), 0)
        else:
            keep = max(scored, key=lambda i: (scores[i], -i))
        for i, (row, c) in enumerate(rows):
            if i == keep:
                label = (
                    f"{row} (chosen on the test set, {len(scored)} of {len(rows)} intervals)"
                    if scored
                    else row
                )
                shown.append(c.assign(row=label if c["mean"].notna().any() else entries[model].label))
            elif c["mean"].notna().any():
                others.append(c)
    return _concat(shown, filled), _concat(others, filled)


def _concat(parts: list[pd.DataFrame], like: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True) if parts else like.iloc[0:0]


def _score(cells: pd.DataFrame) -> float:
    means = cells.set_index("metric")["mean"]
    return float(sum(means.get(m, math.nan) for m in SELECTION_SCORE))


def _init_key(cells: pd.DataFrame) -> tuple | None:
    first = cells.iloc[0]
    return lambda_key((first["lambda_low"], first["lambda_high"]))


def refusals(filled: pd.DataFrame) -> str:
    """One line naming the table's models the plan refuses to train, and why ('' if none)."""
    names = [n for n in dict.fromkeys(filled["model"]) if n in list_models() and model_entry(n).refused]
    return " ".join(f"{model_label(n)} is not trained: {model_entry(n).refused}." for n in names)


def with_failed_runs(filled: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Table 5's last column: failed training runs out of all runs seen per row (mean =
    failed, n = runs), and the paper's (5 minus the seeds it averaged)."""
    seeds = (
        published().query("table == 5 and metric == 'clean'").assign(value=lambda f: FULL_SEEDS - f["seeds"])
    )
    keys = pd.Series(
        [lambda_key(p) for p in zip(runs["lambda_low"], runs["lambda_high"], strict=True)], index=runs.index
    )
    rows = []
    for _, cells in filled.groupby(["block", "row"], sort=False):
        first = cells.iloc[0].to_dict()
        init = lambda_key((first["lambda_low"], first["lambda_high"]))
        interval_runs = runs[
            (runs["dataset"] == first["dataset"])
            & (runs["model"] == first["model"])
            & keys.map(lambda key, init=init: key == init).astype(bool)
        ]
        # not running, nor deleted
        interval_runs = interval_runs[interval_runs["status"].isin(["finished", "failed"])]
        failed = float((interval_runs["status"] == "failed").sum()) if len(interval_runs) else math.nan
        paper = published_value(seeds, first["dataset"], first["model"], init, "single", "clean")
        rows.append(
            {
                **first,
                "column": "Failed",
                "metric": "failed",
                "mean": failed,
                "std": math.nan,
                "n": len(interval_runs),
                "paper": paper,
                "delta": failed - paper,
            }
        )
    return pd.concat([filled, pd.DataFrame(rows)], ignore_index=True)


def table_texts(
    folder: Path,
    number: int | str,
    filled: pd.DataFrame,
    left: str,
    preset: str,
    others: pd.DataFrame | None = None,
) -> dict[Path, str]:
    """A table's files: its Markdown (mean, and mean ± std), its view against the paper, CSV and LaTeX."""
    notes = (missing(filled), refusals(filled), left, test_selected_note(preset))
    footer = "".join("\n\n" + line for line in notes if line) + "\n"
    title = f"# {TITLES[number]}\n\n"
    rest = others if others is not None else filled.iloc[0:0]
    return {
        folder / f"table{number}.md": title + render(filled) + _others(rest) + footer,
        folder / f"table{number}_std.md": title
        + "Mean ± sample std over seeds (Appendix D).\n\n"
        + render(filled, "std")
        + _others(rest, "std")
        + footer,
        folder / f"table{number}_vs_paper.md": vs_paper_text(number, filled, preset, footer, rest),
        folder / f"table{number}.csv": pd.concat([filled, rest], ignore_index=True).to_csv(index=False),
        folder / f"table{number}.tex": render(filled, fmt="latex_booktabs") + "\n",
    }


def _others(rest: pd.DataFrame, view: str = "mean") -> str:
    """The intervals a selecting table did not choose, under it ('' when none was measured)."""
    if rest.empty:
        return ""
    return (
        "\n\nThe other initialisation intervals measured (not chosen; the interval is of the starting "
        "coefficients act(d)):\n\n" + render(rest, view)
    )


def vs_paper_text(
    number: int | str,
    filled: pd.DataFrame,
    preset: str,
    footer: str | None = None,
    others: pd.DataFrame | None = None,
) -> str:
    """One preset's measured-vs-published view of a table, labelled with the preset."""
    if footer is None:
        notes = (missing(filled), refusals(filled), test_selected_note(preset))
        footer = "".join("\n\n" + line for line in notes if line) + "\n"
    rest = _others(others) if others is not None else ""
    return (
        f"# {TITLES[number]}\n\nMeasured under preset `{preset}` / published (measured - published).\n\n"
        + render(filled, "paper")
        + rest
        + footer
    )
