"""Reports, regenerated in seconds from the records alone (`--stage report`).

Writes under the results dir: `records.csv`; `tables/table<k>.{md,csv,tex}` with the
Appendix-D view (`table<k>_std.md`) and the measured-vs-paper view
(`table<k>_vs_paper.md`); `REPORT.md` (which of the paper's claims reproduce); and the
leaderboard (`leaderboard.csv`, `leaderboard.md`, `leaderboard/<dataset>/<name>.json`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.attacks.perturbations import DEFAULT_STEPS, pooled_noise
from bench.core.files import write_all
from bench.data.datasets import dataset_info, dataset_label
from bench.eval import sanity
from bench.records import stats
from bench.records.schema import SNAPSHOT_FILE, UNKNOWN_DATA
from bench.reports import figures, plotting, stability_report
from bench.reports.claims import claim_rows, share_claim_rows
from bench.reports.leaderboard import check_metric, leaderboard, leaderboard_texts
from bench.reports.left_out import left_out_note, left_out_phrases
from bench.reports.measured import Evidence, Measured, measured
from bench.reports.rehearsals import NOT_JUDGED, REHEARSAL_STAMP, RELAXED_LEGEND, rehearsal_marked
from bench.reports.tables import (
    TABLES,
    TITLES,
    all_attacks_slots,
    fill,
    missing,
    render,
    table_slots,
    with_failed_runs,
)

log = logging.getLogger(__name__)


def write_reports(
    results_dir: str | os.PathLike,
    preset: str = "paper",
    rank_by: str = "pgd@2",
    steps: int = DEFAULT_STEPS,
    data_dir: str | os.PathLike | None = None,
    figure_config: figures.FigureConfig | None = None,
    draw: bool = True,
) -> list[Path]:
    """Regenerate every report and figure from the records (and, for Fig. 2, checkpoints
    and `data_dir`); returns the paths written. Without `draw`, no figure is drawn (and
    none is written). Everything is computed before the first file is written: a mistake
    leaves the old reports whole."""
    results = Path(results_dir)
    m = measured(results, steps)
    mine = m.aggregated[m.aggregated["preset"] == preset]
    left_mine = m.left_out[m.left_out["preset"] == preset]
    rank_by = check_metric(rank_by, set(m.aggregated["metric"]))
    texts: dict[Path, str] = {results / SNAPSHOT_FILE: (m.everything if m.snapshot is None else m.snapshot).to_csv(index=False)}
    evidence = Evidence(m, stats.Bootstrap())
    tables = {}
    for number in (key for key in TABLES if isinstance(key, int)):  # the paper's six; "3_all" below
        specs = table_slots(number, m.frame, m.runs)
        filled = fill(specs, m.aggregated, preset, number, evidence.intervals(specs, m.aggregated, preset))
        if TABLES[number].failed_runs:
            filled = with_failed_runs(filled, m.runs)
        tables[number] = filled
        texts.update(_table_texts(results / "tables", number, filled, left_out_note(specs, mine, left_mine)))
    specs = all_attacks_slots(m.frame, mine)
    filled = fill(specs, m.aggregated, preset, None, evidence.intervals(specs, m.aggregated, preset))
    texts.update(_table_texts(results / "tables", "3_all", filled, left_out_note(specs, mine, left_mine)))
    texts.update(sanity_texts(results, m, preset))
    checkpoints = stability_report.per_checkpoint(m.stability)
    texts.update(stability_report.table_texts(results / "tables", stability_report.stability_table(checkpoints, m.aggregated, preset)))
    mechanism = stability_report.claim_rows(checkpoints, preset, evidence.bootstrap)
    folders = figures.run_folders(results, m.runs, preset)
    drawn = None
    if draw:
        with plotting.stamped(REHEARSAL_STAMP if m.rehearsal else ""):
            drawn = figures.draw_all(m, results, preset, data_dir, figure_config or figures.FigureConfig(), folders)
            drawn += stability_report.drawn(m.stability, preset)
        texts.update(_figure_files(results, drawn))
    shares = share_claim_rows(figures.coefficient_table(folders), set(m.frame["dataset"]), preset, evidence,
                              evidence.bootstrap)  # fmt: skip
    texts[results / "REPORT.md"] = render_report(m, tables, preset, steps, evidence, drawn, shares, mechanism)
    board = leaderboard(m.kept, m.aggregated, preset, rank_by, m.sanity, stability_report.amplification(checkpoints))
    texts.update(leaderboard_texts(results, board, left_mine))
    return write_all(rehearsal_marked(texts) if m.rehearsal else texts)


def write_figures(
    results_dir: str | os.PathLike,
    preset: str = "paper",
    steps: int = DEFAULT_STEPS,
    data_dir=None,
    figure_config: figures.FigureConfig | None = None,
) -> list[Path]:
    """The figures alone (`--stage figures`), under results/figures/."""
    m = measured(results_dir, steps)
    drawn = figures.draw_all(m, Path(results_dir), preset, data_dir, figure_config or figures.FigureConfig())
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


def write_sanity(results_dir: str | os.PathLike, preset: str = "paper", steps: int = DEFAULT_STEPS) -> list[Path]:
    """The sanity section alone (`--stage check`): sanity.md and sanity.csv."""
    m = measured(results_dir, steps)
    return write_all(sanity_texts(Path(results_dir), m, preset))


def _table_texts(folder: Path, number: int | str, filled: pd.DataFrame, left: str) -> dict[Path, str]:
    footer = "".join("\n\n" + line for line in (missing(filled), left) if line) + "\n"
    title = f"# {TITLES[number]}\n\n"
    return {
        folder / f"table{number}.md": title + render(filled) + footer,
        folder / f"table{number}_std.md": title
        + "Mean ± sample std over seeds (Appendix D).\n\n"
        + render(filled, "std")
        + footer,
        folder / f"table{number}_vs_paper.md": title
        + "Measured / published (measured - published).\n\n"
        + render(filled, "paper")
        + footer,
        folder / f"table{number}.csv": filled.to_csv(index=False),
        folder / f"table{number}.tex": render(filled, fmt="latex_booktabs") + "\n",
    }


# --- REPORT.md --------------------------------------------------------------------------------


SELECTION_RULES = (
    "A number averages only cells that measured the same thing: the same checkpoints, test "
    "subset, data files, attack parameters and ensemble. Where a cell was measured several ways, "
    "one measurement is shown, chosen per run in this order: the largest test subset; the largest "
    "ensemble; released data first (then unofficial files; released noise, then generated); for "
    "IFGSM and PGD the step count asked for ({steps}) at the preset's step size, else the most steps; "
    "per seed the checkpoint measured last. A table row shows one run of its model: the one trained "
    "with the paper's full recipe, then the largest test subset, then the most seeds. Rows of "
    "checkpoints that were retrained, failed on retraining or deleted are never shown. Lines under "
    "the tables name what was left out."
)


def digest_lines(kept: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """What the shown cells (`kept`: select_measurements') read, per data set: the test
    images (records.data_sha256), each noise file (its digest), and the training images of
    their checkpoints (meta.json's data.sha256; load_runs' train_sha256), 12 hex digits each,
    with the runs named where runs read different files."""
    noise = kept["perturbation"].isin(pooled_noise())
    clean = [f"{dataset_label(d)}: {_digests(rows, 'data_sha256')}" for d, rows in kept[~noise].groupby("dataset")]
    lines = ["Test images read (sha256 of images and labels): " + "; ".join(clean) + "."]
    files = [f"{dataset_label(d)}: " + ", ".join(f"{g} {_digests(r, 'data_sha256', every='')}" for g, r in rows.groupby("perturbation"))
             for d, rows in kept[noise].groupby("dataset")]  # fmt: skip
    if files:
        lines.append("Noise files read (sha256 of the md5s of each file and its labels; runs named where they differ): "
                     + "; ".join(files) + ".")  # fmt: skip
    shown = kept[["run", "dataset", "seed"]].drop_duplicates()
    trained = runs[runs["status"] == "finished"].merge(shown, on=["run", "dataset", "seed"])
    if len(trained):
        lines.append("Training images read (sha256 of images and labels, from each checkpoint's meta.json): "
                     + "; ".join(f"{dataset_label(d)}: {_digests(r, 'train_sha256')}" for d, r in trained.groupby("dataset"))
                     + ".")  # fmt: skip
    return lines


def _digests(rows: pd.DataFrame, column: str, every: str = " (every run)") -> str:
    by_digest = rows.groupby(column)["run"].agg(lambda r: sorted(set(r)))
    named = {UNKNOWN_DATA: "unknown (recorded before digests)"}
    if len(by_digest) == 1:
        return f"{named.get(by_digest.index[0], by_digest.index[0][:12])}{every}"
    return ", ".join(f"{named.get(d, d[:12])} ({', '.join(r)})" for d, r in by_digest.items())


def render_report(
    m: Measured,
    tables: dict,
    preset: str,
    steps: int = DEFAULT_STEPS,
    evidence: Evidence | None = None,
    drawn: list | None = None,
    shares: pd.DataFrame | None = None,
    mechanism: pd.DataFrame | None = None,
) -> str:
    frame, aggregated = m.frame, m.aggregated
    lines = ["# inres-bench report" + (" (rehearsal)" if m.rehearsal else ""), ""]
    sources = frame.groupby("dataset")["data_source"].agg(lambda s: ", ".join(sorted(set(s))))
    sizes = {d: subset_sizes(rows) for d, rows in frame.groupby("dataset")}
    stale = int(m.everything["stale"].sum())
    lines += [
        f"Generated from {len(m.everything) - stale} current records (preset `{preset}` in the tables)"
        + (f"; {stale} records of replaced or deleted checkpoints are not reported." if stale else "."),
        "",
        "Data (data set: sources of its cells): "
        + "; ".join(f"{dataset_label(d)}: {s} ({sizes[d]})" for d, s in sources.items())
        + ".",
    ]
    for line in digest_lines(m.kept, m.runs) if len(m.kept) else []:
        lines += ["", line]
    if m.rehearsal_left_out:
        lines += ["", f"{m.rehearsal_left_out} records of rehearsal runs (`--rehearse`, run tags with `@rehearsal`) "
                  "are not shown: a rehearsal checks that the plan runs, and its numbers are never mixed with "
                  "measurements (a results dir of rehearsals alone is reported as one)."]  # fmt: skip
    if any(dataset_info(d).synthetic for d in set(frame["dataset"])):
        lines += [
            "",
            "Synthetic-data numbers check the pipeline only: they are never compared with the paper's CIFAR numbers.",
        ]
    lines += ["", "## How numbers are chosen", "", SELECTION_RULES.format(steps=steps)]
    left_out = m.left_out[m.left_out["preset"] == preset]
    phrases = left_out_phrases(left_out, lambda r: f"{r['run']} ({r['kind']}, {r['dataset']})")
    if phrases:
        lines += ["", "Measured but not shown: " + "; ".join(phrases) + "."]
    lines += ["", "## Sanity checks", "", render_sanity(m.sanity, preset), "", SANITY_LEGEND]
    if m.rehearsal:
        lines += ["", RELAXED_LEGEND]
    claims = claim_rows(frame, aggregated, preset, evidence)
    if m.rehearsal:  # judged on nothing: a verdict would read as a finding
        claims = claims.assign(verdict=NOT_JUDGED)
        shares = None if shares is None else shares.assign(verdict=NOT_JUDGED)
        mechanism = None if mechanism is None else mechanism.assign(verdict=NOT_JUDGED)
    shown = claims.assign(
        measured=[_with_interval(v, lo, hi) for v, lo, hi in zip(claims["measured"], claims["low"], claims["high"], strict=True)],
        paper=claims["paper"].map(lambda v: "-" if math.isnan(v) else f"{v:+.2f}"),
        dataset=claims["dataset"].map(lambda d: dataset_label(d)),
    )[["claim", "table", "dataset", "measured", "paper", "verdict"]]
    lines += [
        "",
        "## The paper's claims",
        "",
        "Differences in accuracy points (first model minus second), with their 95% interval from a "
        "bootstrap over seeds and test examples (paired: both models saw the same examples). A claim "
        "reproduces only when the interval excludes 0 in the paper's direction, contradicts it when it "
        "excludes 0 the other way, and is inconclusive otherwise; runs not made with the paper's recipe "
        "(full length, official data, paper preset) are not compared with the published numbers.",
        "",
    ]
    lines += [
        tabulate(
            shown.values.tolist(),
            headers=["claim", "table", "data", "measured", "paper", "verdict"],
            tablefmt="github",
            disable_numparse=True,
        )
    ]
    if shares is not None and len(shares):
        lines += ["", SHARE_LEGEND, "", render_shares(shares)]
    if mechanism is not None and len(mechanism):
        lines += ["", "## The paper's mechanism: stability through depth", "", stability_report.CLAIMS_LEGEND, "",
                  stability_report.render_claims(mechanism)]  # fmt: skip
    lines += ["", "## Tables", ""]
    for number, filled in tables.items():
        measured = int(filled["mean"].notna().sum())
        lines.append(
            f"- [Table {number}](tables/table{number}.md): {measured} of {len(filled)} cells measured "
            f"([± std](tables/table{number}_std.md), [vs paper](tables/table{number}_vs_paper.md))"
        )
    lines += [
        "- [Table 3, every attack](tables/table3_all.md): the sanity and reference attacks and the worst case too",
        "- [Stability diagnostics](tables/stability.md): amplification, block spectral norms, input gradients",
        "- [Sanity checks](sanity.md) and the [leaderboard](leaderboard.md)",
    ]
    lines += ["", "## Figures", ""]
    if drawn is None:
        lines += ["Not drawn in this run (`--no-figures`): `python run_bench.py --stage figures` draws them.", ""]
    for item in drawn or []:
        if isinstance(item, plotting.Drawn):
            lines += [f"![{item.name}](figures/{item.name}.png)", "", f"{item.caption} ([PDF](figures/{item.name}.pdf))", ""]
        else:
            lines += [f"- {item.name} skipped: {item.reason}.", ""]
    return "\n".join(lines).rstrip() + "\n"


SHARE_LEGEND = (
    "Fig. 1's claim, judged on the trained checkpoints of its panels (the paper's full recipe at the "
    "default initialisation): the share of damped blocks whose coefficient act(λ_n) exceeds 0.01, in "
    "percent, the mean over seeds with its 95% interval over seeds. It reproduces when the interval "
    "holds the paper's share, and is contradicted when it does not."
)


def subset_sizes(cells: pd.DataFrame) -> str:
    """The test subsets of a data set's cells, in words: '100 test images', and the
    perturbations measured on a smaller subset (AutoAttack), e.g. ', autoattack on 50'."""
    def sizes(rows) -> str:
        return "/".join(str(n) for n in sorted(set(rows["n"])))

    main = cells[cells["perturbation"] == "clean"] if (cells["perturbation"] == "clean").any() else cells
    text = f"{sizes(main)} test images"
    for name, rows in cells.groupby("perturbation"):
        if set(rows["n"]) - set(main["n"]):
            text += f", {name} on {sizes(rows)}"
    return text


def render_shares(shares: pd.DataFrame) -> str:
    """Fig. 1's claims as a table: claim, data, seeds, measured share [interval], paper, verdict."""
    rows = [
        [claim, dataset_label(dataset), f"{seeds}",
         "-" if math.isnan(value) else f"{value:.1f}" + ("" if math.isnan(low) else f" [{low:.1f}, {high:.1f}]"),
         f"{paper:.1f}", verdict]
        for claim, dataset, seeds, value, low, high, paper, verdict in zip(
            shares["claim"], shares["dataset"], shares["seeds"], shares["measured"], shares["low"], shares["high"],
            shares["paper"], shares["verdict"], strict=True)
    ]  # fmt: skip
    return tabulate(rows, headers=["claim", "data", "seeds", "measured (%)", "paper (%)", "verdict"], tablefmt="github",
                    disable_numparse=True)  # fmt: skip


def _with_interval(value: float, low: float, high: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.2f}" + ("" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]")


# --- sanity checks -----------------------------------------------------------------------------

SANITY_LEGEND = (
    "Each column is a gate's figure (accuracy points unless a share): "
    + "; ".join(f"**{name}**: {gate.figure}" for name, gate in sanity.GATES.items())
    + ". A ✗ marks a failed gate; `unreliable` is yes when a critical one failed (all but eps-monotone and "
    "zero-gradients), no when every critical gate that applies was measured and passed, and `not checked` "
    "(naming the gates not measured) otherwise. Gates whose figures were not measured are blank."
)


def render_sanity(table: pd.DataFrame, preset: str) -> str:
    """The sanity table: one row per entry of `preset`, each gate's figure, ✗ where it failed."""
    rows = table[table["preset"] == preset]
    if rows.empty:
        return "No entry measured yet."
    gates = [g for g in sanity.GATES if g in rows.columns and rows[g].notna().any()]
    shown = []
    for row in rows.to_dict("records"):
        failed = {f.removesuffix(sanity.RELAXED) for f in row["flags"].split(";")} if row["flags"] else set()
        cells = [_sanity_figure(g, row[g], sanity.GATES[g].flag in failed) for g in gates]
        name = row["run"] + (" (ensemble)" if row["kind"] == "ensemble" else "")
        shown.append([name, dataset_label(row["dataset"]), *cells, row["flags"] or "-",
                      sanity.verdict_text(row["unreliable"], row["unchecked"])])  # fmt: skip
    return tabulate(shown, headers=["entry", "data", *gates, "flags", "unreliable"], tablefmt="github", disable_numparse=True)


def _sanity_figure(gate: str, value: float, failed: bool) -> str:
    if pd.isna(value):
        return ""
    if gate in ("zero-gradients", "nonfinite-gradients"):
        text = f"{100 * value:.1f}%"
    elif gate in ("randomized", "probabilities", "dynamic"):
        text = "yes" if value else "no"
    elif gate == "classes":
        text = f"{value:g}"
    else:
        text = f"{value:+.2f}"
    return text + (" ✗" if failed else "")


def sanity_texts(results: Path, m: Measured, preset: str) -> dict[Path, str]:
    """sanity.md (the table and its legend) and sanity.csv (the figures as numbers)."""
    table = m.sanity[m.sanity["preset"] == preset]
    text = "# Sanity checks\n\n" + render_sanity(m.sanity, preset) + "\n\n" + SANITY_LEGEND + "\n"
    return {results / "sanity.md": text, results / "sanity.csv": table.to_csv(index=False)}


