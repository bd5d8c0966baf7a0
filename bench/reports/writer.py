"""Reports, regenerated in seconds from the records alone (`--stage report`).

Writes under the results dir: `records.csv`; `tables/table<k>.{md,csv,tex}` with the
Appendix-D view (`table<k>_std.md`) and the measured-vs-paper view
(`table<k>_vs_paper.md`); `REPORT.md` (which of the paper's claims reproduce); and the
leaderboard (`leaderboard.csv`, `leaderboard.md`, `leaderboard/<dataset>/<name>.json`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from bench.attacks.perturbations import DEFAULT_STEPS
from bench.core.files import write_all
from bench.core.presets import test_selected_note
from bench.records import stats
from bench.records.schema import SNAPSHOT_FILE, LandscapeConfig
from bench.reports import figures, plotting, stability_report
from bench.reports.claims import share_claim_rows
from bench.reports.comparison import presets_with_runs
from bench.reports.intervals import refusals, select_intervals, with_failed_runs
from bench.reports.leaderboard import leaderboard, leaderboard_texts
from bench.reports.left_out import left_out_note
from bench.reports.measured import Evidence, Measured, measured
from bench.reports.rehearsals import REHEARSAL_STAMP, rehearsal_marked
from bench.reports.report_page import SANITY_LEGEND, render_report, render_sanity
from bench.reports.tables import TABLES, TITLES, all_attacks_slots, fill, missing, render, table_slots

log = logging.getLogger(__name__)


def write_reports(
    results_dir: str | os.PathLike,
    preset: str = "paper",
    rank_by: str = "pgd@2",
    steps: int = DEFAULT_STEPS,
    landscape: LandscapeConfig | None = None,
    draw: bool = True,
) -> list[Path]:
    """Regenerate every report and figure from the records (and the checkpoint folders'
    meta.json and training logs; `landscape`: Fig. 2's grid); returns the paths written. Without `draw`, no figure is drawn (and
    none is written). Everything is computed before the first file is written: a mistake
    leaves the old reports whole."""
    results = Path(results_dir)
    m = measured(results, steps)
    mine = m.aggregated[m.aggregated["preset"] == preset]
    left_mine = m.left_out[m.left_out["preset"] == preset]
    texts: dict[Path, str | bytes] = {results / SNAPSHOT_FILE: m.everything.to_csv(index=False)}
    evidence = Evidence(m, stats.Bootstrap())
    tables = {}
    for number in (key for key in TABLES if isinstance(key, int)):  # the paper's six; "3_all" below
        specs = table_slots(number, m.frame, m.runs)
        filled = fill(specs, m.aggregated, preset, number, evidence.intervals(specs, m.aggregated, preset))
        if TABLES[number].failed_runs:
            filled = with_failed_runs(filled, m.runs)
        filled, others = select_intervals(filled, number)
        tables[number] = filled
        texts.update(
            _table_texts(
                results / "tables", number, filled, left_out_note(specs, mine, left_mine), preset, others
            )
        )
        for other in presets_with_runs(m.aggregated, preset)[1:]:  # every other preset's, against the paper
            theirs, rest = select_intervals(
                fill(specs, m.aggregated, other, number, evidence.intervals(specs, m.aggregated, other)),
                number,
            )
            texts[results / "tables" / f"table{number}_vs_paper_{other}.md"] = _vs_paper_text(
                number, theirs, other, others=rest
            )
    specs = all_attacks_slots(m.frame, mine)
    filled = fill(specs, m.aggregated, preset, None, evidence.intervals(specs, m.aggregated, preset))
    texts.update(
        _table_texts(results / "tables", "3_all", filled, left_out_note(specs, mine, left_mine), preset)
    )
    texts.update(sanity_texts(results, m, preset))
    checkpoints = stability_report.per_checkpoint(m.stability)
    texts.update(
        stability_report.table_texts(
            results / "tables", stability_report.stability_table(checkpoints, m.aggregated, preset)
        )
    )
    mechanism = stability_report.claim_rows(checkpoints, preset, evidence.bootstrap)
    folders = figures.run_folders(results, m.runs, preset)
    drawn = None
    if draw:
        with plotting.stamped(REHEARSAL_STAMP if m.rehearsal else ""):
            drawn = figures.draw_all(m, results, preset, landscape, folders)
            drawn += stability_report.drawn(m.stability, preset)
        texts.update(_figure_files(results, drawn))
    shares = {
        p: share_claim_rows(
            figures.coefficient_table(folders if p == preset else figures.run_folders(results, m.runs, p)),
            set(m.frame["dataset"]),
            p,
            evidence,
            evidence.bootstrap,
        )
        for p in presets_with_runs(m.aggregated, preset)
    }
    board = leaderboard(
        m.kept, m.aggregated, preset, rank_by, m.sanity, stability_report.amplification(checkpoints)
    )
    texts[results / "REPORT.md"] = render_report(
        m, tables, preset, steps, evidence, drawn, shares, mechanism, board
    )
    texts.update(leaderboard_texts(results, board, left_mine))
    return write_all(rehearsal_marked(texts) if m.rehearsal else texts)


def write_figures(
    results_dir: str | os.PathLike,
    preset: str = "paper",
    steps: int = DEFAULT_STEPS,
    landscape: LandscapeConfig | None = None,
) -> list[Path]:
    """The figures alone (`--stage figures`), under results/figures/."""
    m = measured(results_dir, steps)
    drawn = figures.draw_all(m, Path(results_dir), preset, landscape)
    drawn += stability_report.drawn(m.stability, preset)
    for item in drawn:
        if isinstance(item, figures.Skipped):
            log.info("figure %s skipped: %s", item.name, item.reason)
    return write_all(_figure_files(Path(results_dir), drawn))


def _figure_files(results: Path, drawn: list) -> dict[Path, bytes]:
    return {
        results / "figures" / name: data
        for item in drawn
        if isinstance(item, plotting.Drawn)
        for name, data in item.files.items()
    }


def write_sanity(
    results_dir: str | os.PathLike, preset: str = "paper", steps: int = DEFAULT_STEPS
) -> list[Path]:
    """The sanity section alone (`--stage check`): sanity.md and sanity.csv."""
    m = measured(results_dir, steps)
    return write_all(sanity_texts(Path(results_dir), m, preset))


def _table_texts(
    folder: Path,
    number: int | str,
    filled: pd.DataFrame,
    left: str,
    preset: str,
    others: pd.DataFrame | None = None,
) -> dict[Path, str]:
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
        folder / f"table{number}_vs_paper.md": _vs_paper_text(number, filled, preset, footer, rest),
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


def _vs_paper_text(
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


def sanity_texts(results: Path, m: Measured, preset: str) -> dict[Path, str]:
    """sanity.md (the table and its legend) and sanity.csv (the figures as numbers)."""
    table = m.sanity[m.sanity["preset"] == preset]
    text = "# Sanity checks\n\n" + render_sanity(m.sanity, preset) + "\n\n" + SANITY_LEGEND + "\n"
    return {results / "sanity.md": text, results / "sanity.csv": table.to_csv(index=False)}
