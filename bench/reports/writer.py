"""Reports, regenerated in seconds from the records alone (`--stage report`).

Writes under the results dir: `records.csv`; `tables/table<k>.{md,csv,tex}` with the
Appendix-D view (`table<k>_std.md`) and the measured-vs-paper view
(`table<k>_vs_paper.md`); the leaderboard (`leaderboard.csv`, `leaderboard.md` with its
RobustBench section, and RobustBench's files `leaderboard/<dataset>/<threat model>/<name>.json`
for the runs of its protocol); and REPORT.md: the headline results first (the
leaderboard's top rows, Tables 1-3 against the paper, the claims' verdicts), then the
sanity checks, links to every table and the figures, and the provenance of every number
last."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.attacks.perturbations import DEFAULT_STEPS, file_groups
from bench.core.files import write_all
from bench.core.presets import preset as preset_info
from bench.core.presets import test_selected_note
from bench.data.datasets import dataset_info, dataset_label
from bench.records import sanity, stats
from bench.records.aggregate import GROUP
from bench.records.schema import NO_TRAINING_DIGEST, SNAPSHOT_FILE, LandscapeConfig
from bench.reports import figures, plotting, stability
from bench.reports.claims import (
    claim_rows,
    closest_rows,
    closest_sentence,
    presets_with_runs,
    render_claims,
    render_closest,
    render_shares,
    share_claim_rows,
)
from bench.reports.leaderboard import (
    failed_run_lines,
    leaderboard,
    leaderboard_texts,
    left_out_note,
    left_out_phrases,
    render_board,
)
from bench.reports.measured import (
    NOT_JUDGED,
    REHEARSAL_STAMP,
    Evidence,
    Measured,
    measured,
    rehearsal_marked,
    relaxed_legend,
)
from bench.reports.robustbench import render_robustbench, robustbench_board, robustbench_entries
from bench.reports.tables import (
    TABLES,
    TITLES,
    all_attacks_slots,
    fill,
    render,
    select_intervals,
    table_slots,
    table_texts,
    vs_paper_text,
    with_failed_runs,
)

SELECTION_RULES = (
    "A number averages only cells that measured the same thing: the same checkpoints, test "
    "subset, data files, attack parameters and ensemble. Where a cell was measured several ways, "
    "one measurement is shown, chosen per run in this order: the largest test subset; the largest "
    "ensemble; released data first (then unofficial files; released noise, then generated); for "
    "IFGSM and PGD the step count asked for ({steps}) at the preset's step size, else the most steps; "
    "per seed the checkpoint measured last. A table row shows one run of its model: the one trained "
    "with the paper's full recipe, then the largest test subset, then the most seeds. Rows of "
    "checkpoints that were retrained, replaced or failed on retraining are never shown. Lines under "
    "the tables name what was left out."
)


def digest_lines(kept: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """What the shown cells (`kept`: select_measurements') read, per data set: the test
    images (records.data_sha256), each noise file (its digest), and the training images of
    their checkpoints (meta.json's data.sha256; load_runs' train_sha256), 12 hex digits each,
    with the runs named where runs read different files."""
    noise = kept["perturbation"].isin(file_groups())
    clean = [
        f"{dataset_label(d)}: {_digests(rows, 'data_sha256')}" for d, rows in kept[~noise].groupby("dataset")
    ]
    lines = ["Test images read (sha256 of images and labels): " + "; ".join(clean) + "."]
    files = [
        f"{dataset_label(d)}: "
        + ", ".join(f"{g} {_digests(r, 'data_sha256', every='')}" for g, r in rows.groupby("perturbation"))
        for d, rows in kept[noise].groupby("dataset")
    ]
    if files:
        lines.append(
            "Noise files read (sha256 of the md5s of each file and its labels; runs named where they differ): "
            + "; ".join(files)
            + "."
        )
    shown = kept[["run", "dataset", "seed"]].drop_duplicates()
    trained = runs[runs["status"] == "finished"].merge(shown, on=["run", "dataset", "seed"])
    if len(trained):
        lines.append(
            "Training images read (sha256 of images and labels, from each checkpoint's meta.json): "
            + "; ".join(
                f"{dataset_label(d)}: {_digests(r, 'train_sha256')}" for d, r in trained.groupby("dataset")
            )
            + "."
        )
    return lines


def _digests(rows: pd.DataFrame, column: str, every: str = " (every run)") -> str:
    by_digest = rows.groupby(column)["run"].agg(lambda r: sorted(set(r)))
    named = {NO_TRAINING_DIGEST: "not known (no meta.json, or none naming it)"}
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
    shares: dict | None = None,
    mechanism: pd.DataFrame | None = None,
    board: pd.DataFrame | None = None,
    robustbench: pd.DataFrame | None = None,
) -> str:
    """REPORT.md: what a reader came for first (the leaderboard's top rows, Tables 1-3
    against the paper, the claims' verdicts), then the checks, links and figures, and the
    provenance (data read, how numbers are chosen, the gates' definitions) last."""
    lines = ["# inres-bench report" + (" (rehearsal)" if m.rehearsal else ""), "", *_summary(m, preset)]
    lines += _headline(tables, board)
    if robustbench is not None and len(robustbench):
        lines += ["", "#" + render_robustbench(robustbench).rstrip()]  # a subsection of the headline
    lines += _claims(m, preset, evidence, shares, mechanism)
    lines += [
        "",
        "## Sanity checks",
        "",
        render_sanity(m.sanity, preset),
        "",
        "Each gate is defined under [Provenance](#provenance).",
    ]
    lines += failed_run_lines(m.runs)
    lines += ["", "## Tables", "", *_table_links(tables, presets_with_runs(m.aggregated, preset)[1:])]
    lines += ["", "## Figures", ""]
    if drawn is None:
        lines += [
            "Not drawn in this run (`--no-figures`): `python run_bench.py --stage figures` draws them.",
            "",
        ]
    for item in drawn or []:
        if isinstance(item, plotting.Drawn):
            lines += [
                f"![{item.name}](figures/{item.name}.png)",
                "",
                f"{item.caption} ([PDF](figures/{item.name}.pdf))",
                "",
            ]
        else:
            lines += [f"- {item.name} skipped: {item.reason}.", ""]
    lines += _provenance(m, preset, steps)
    return "\n".join(lines).rstrip() + "\n"


HEADLINE_ROWS = 10  # leaderboard rows shown in REPORT.md (leaderboard.md holds all)
HEADLINE_TABLES = (1, 2, 3)  # the tables shown against the paper in REPORT.md


def _summary(m: Measured, preset: str) -> list[str]:
    """What the numbers below are: how many records, what is not reported, what is not on disk."""
    stale = int(m.everything["stale"].sum())
    lines = [
        f"Generated from {len(m.everything) - stale} current records (preset `{preset}` in the tables)"
        + (f"; {stale} records of replaced or retrained checkpoints are not reported." if stale else ".")
    ]
    absent = not_on_disk(m)
    if absent:
        lines[0] += (
            f" {absent} of the checkpoints these records measured {'is' if absent == 1 else 'are'} not on "
            "disk (their weights.pt or folder was deleted or not copied): their records stand, and "
            "measuring them again needs the weights."
        )
    if any(dataset_info(d).synthetic for d in set(m.frame["dataset"])):
        lines += [
            "",
            "Synthetic-data numbers check the pipeline only: they are never compared with the paper's "
            "CIFAR numbers.",
        ]
    lines += [
        "",
        "Where the numbers come from (data read, how each number is chosen, the sanity gates' "
        "definitions): [Provenance](#provenance), at the end.",
    ]
    return lines


def not_on_disk(m: Measured) -> int:
    """How many checkpoints behind the kept records have no weights.pt on disk now."""
    if "on_disk" not in m.runs or m.kept.empty:
        return 0
    shown = m.kept[m.kept["members"] == 1][["run", "dataset", "seed"]].drop_duplicates()
    runs = m.runs.merge(shown, on=["run", "dataset", "seed"])
    return int((~runs["on_disk"].astype(bool)).sum())


def _headline(tables: dict, board: pd.DataFrame | None) -> list[str]:
    """The leaderboard's top rows, then each of Tables 1-3 that holds a number the paper published."""
    lines = ["", "## Headline results"]
    if board is not None and len(board):
        top = min(HEADLINE_ROWS, len(board))
        lines += [
            "",
            f"The leaderboard's top {top} of {len(board)} entries (accuracy in %; all in "
            "[leaderboard.md](leaderboard.md), with each entry's model, data and flags):",
            "",
            render_board(board.head(top), brief=True),
        ]
    compared = [
        n
        for n in HEADLINE_TABLES
        if n in tables and (tables[n]["mean"].notna() & tables[n]["paper"].notna()).any()
    ]
    for number in compared:
        lines += [
            "",
            f"### {TITLES[number]}",
            "",
            "Measured [95% interval] / published (measured - published).",
            "",
            render(tables[number], "paper"),
        ]
    if not compared:
        lines += [
            "",
            "No cell of Tables 1-3 compares with a published number (only the paper's models on the "
            "official CIFAR data do): the tables are linked under [Tables](#tables).",
        ]
    return lines


def _claims(
    m: Measured, preset: str, evidence: Evidence | None, shares: dict | None, mechanism: pd.DataFrame | None
) -> list[str]:
    """The paper's claims judged per preset, the closest preset, and the mechanism's claims."""
    frame, aggregated = m.frame, m.aggregated
    lines = ["", "## The paper's claims"]
    claims = {p: claim_rows(frame, aggregated, p, evidence) for p in presets_with_runs(aggregated, preset)}
    shares = shares or {}
    if m.rehearsal:  # judged on nothing: a verdict would read as a finding
        claims = {p: c.assign(verdict=NOT_JUDGED) for p, c in claims.items()}
        shares = {p: c.assign(verdict=NOT_JUDGED) for p, c in shares.items()}
        mechanism = None if mechanism is None else mechanism.assign(verdict=NOT_JUDGED)
    for name, rows in claims.items():
        lines += ["", f"### Preset `{name}`: {preset_info(name).source}", ""]
        lines += [test_selected_note(name), ""] if test_selected_note(name) else []
        lines += [render_claims(rows)]
        if len(shares.get(name, ())):
            lines += ["", render_shares(shares[name]), "", SHARE_LEGEND]
    lines += ["", CLAIMS_LEGEND]
    if evidence is not None:
        closest = closest_rows(aggregated, evidence, list(claims))
        lines += [
            "",
            "### Which preset comes closest",
            "",
            closest_sentence(closest),
            "",
            render_closest(closest, claims),
            "",
            CLOSEST_LEGEND,
        ]
    if mechanism is not None and len(mechanism):
        lines += [
            "",
            "## The paper's mechanism: stability through depth",
            "",
            stability.render_claims(mechanism),
            "",
            stability.CLAIMS_LEGEND,
        ]
    return lines


def _table_links(tables: dict, other_presets: list[str]) -> list[str]:
    lines = []
    for number, filled in tables.items():
        measured = int(filled["mean"].notna().sum())
        lines.append(
            f"- [Table {number}](tables/table{number}.md): {measured} of {len(filled)} cells measured "
            f"([± std](tables/table{number}_std.md), [vs paper](tables/table{number}_vs_paper.md))"
        )
    for other in other_presets:
        links = ", ".join(f"[{n}](tables/table{n}_vs_paper_{other}.md)" for n in tables)
        lines.append(f"- Tables {links} against the paper under preset `{other}`")
    return lines + [
        "- [Table 3, every attack](tables/table3_all.md): the sanity and reference attacks and the worst case too",
        "- [Stability diagnostics](tables/stability.md): amplification, block spectral norms, input gradients",
        "- [Sanity checks](sanity.md) and the [leaderboard](leaderboard.md)",
    ]


def _provenance(m: Measured, preset: str, steps: int) -> list[str]:
    """The data read, how numbers are chosen, what was measured but not shown, the gates."""
    sources = m.frame.groupby("dataset")["data_source"].agg(lambda s: ", ".join(sorted(set(s))))
    sizes = {d: subset_sizes(rows) for d, rows in m.frame.groupby("dataset")}
    lines = [
        "",
        "## Provenance",
        "",
        "Data (data set: sources of its cells): "
        + "; ".join(f"{dataset_label(d)}: {s} ({sizes[d]})" for d, s in sources.items())
        + ".",
    ]
    for line in digest_lines(m.kept, m.runs) if len(m.kept) else []:
        lines += ["", line]
    lines += ["", "### How numbers are chosen", "", SELECTION_RULES.format(steps=steps)]
    left_out = m.left_out[m.left_out["preset"] == preset]
    phrases = left_out_phrases(left_out, lambda r: f"{r['run']} ({r['kind']}, {r['dataset']})")
    if phrases:
        lines += ["", "Measured but not shown: " + "; ".join(phrases) + "."]
    lines += ["", "### The sanity gates", "", SANITY_LEGEND]
    return lines + (["", relaxed_legend(m.rehearsal)] if m.rehearsal else [])


SHARE_LEGEND = (
    "Fig. 1's claim, judged on the trained checkpoints of its panels (the full recipe at the default "
    "initialisation): the share of coefficients act(λ_n) above 0.01 in percent, counted as the release's "
    "print_ks logs them (all blocks, the never-trained first and projection blocks at their initial value: "
    "the published 79.6% and 72.2% are 43 and 39 of 54), the mean over seeds with its 95% interval over "
    "seeds, and beside it the share of the damped blocks alone. It reproduces when the interval holds the "
    "paper's share (to its printed 0.1%), and is contradicted when it does not."
)
CLAIMS_LEGEND = (
    "Differences in accuracy points (first model minus second), with their 95% interval from a bootstrap "
    "over seeds and test examples (paired: both models saw the same examples), for each preset that has "
    "runs: each is a protocol that could have made the published tables (docs/PROTOCOL.md). A claim "
    "reproduces only when the interval excludes 0 in the paper's direction, contradicts it when it excludes "
    "0 the other way, and is inconclusive otherwise; runs not made with the full recipe (full length, all "
    "training images) on the official data are not compared with the published numbers."
)
CLOSEST_LEGEND = (
    "Each preset's distance from the published numbers: the root of the mean squared gap (measured - "
    "published, accuracy points) over the published single-model cells of Tables 1-3 (clean, the four noise "
    "groups, the attacks) that every compared preset measured with comparable runs, each cell's sampling "
    "variance taken out (a noisy cell's squared gap is too large by that variance on average), with its 95% "
    "interval (bootstrap over seeds and test examples); 0.00 means within sampling noise of the paper. A "
    "preset is closer than another only when the difference of their mean squared gaps has an interval "
    "clear of zero. Last column: how many of its judged claims reproduce."
)


def subset_sizes(cells: pd.DataFrame) -> str:
    """The test subsets of a data set's cells, in words: '100 test images', and the
    perturbations measured on a smaller subset (AutoAttack), e.g. ', autoattack on 50'."""

    def sizes(rows: pd.DataFrame) -> str:
        return "/".join(str(n) for n in sorted(set(rows["n"])))

    main = cells[cells["perturbation"] == "clean"] if (cells["perturbation"] == "clean").any() else cells
    text = f"{sizes(main)} test images"
    for name, rows in cells.groupby("perturbation"):
        if set(rows["n"]) - set(main["n"]):
            text += f", {name} on {sizes(rows)}"
    return text


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
        shown.append(
            [
                name,
                dataset_label(row["dataset"]),
                *cells,
                row["flags"] or "-",
                sanity.verdict_text(row["unreliable"], row["unchecked"]),
            ]
        )
    return tabulate(
        shown,
        headers=["entry", "data", *gates, "flags", "unreliable"],
        tablefmt="github",
        disable_numparse=True,
    )


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


log = logging.getLogger(__name__)
# What the writer writes under a results dir, so that a run checks every path before any
# work (bench.run.checks): files at its top, and folders only it writes, with how deep
# their own subfolders go (leaderboard/<data set>/<threat model>/).
WRITTEN_FILES = ("REPORT.md", SNAPSHOT_FILE, "leaderboard.csv", "leaderboard.md")
SANITY_FILES = ("sanity.md", "sanity.csv")
REPORT_FOLDERS = {"tables": 0, "leaderboard": 2}
FIGURE_FOLDERS = {"figures": 0}


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
    at_preset = m.aggregated[m.aggregated["preset"] == preset]
    left_at_preset = m.left_out[m.left_out["preset"] == preset]
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
            table_texts(
                results / "tables",
                number,
                filled,
                left_out_note(specs, at_preset, left_at_preset),
                preset,
                others,
            )
        )
        for other in presets_with_runs(m.aggregated, preset)[1:]:  # every other preset's, against the paper
            theirs, rest = select_intervals(
                fill(specs, m.aggregated, other, number, evidence.intervals(specs, m.aggregated, other)),
                number,
            )
            texts[results / "tables" / f"table{number}_vs_paper_{other}.md"] = vs_paper_text(
                number, theirs, other, others=rest
            )
    specs = all_attacks_slots(m.frame, at_preset)
    filled = fill(specs, m.aggregated, preset, None, evidence.intervals(specs, m.aggregated, preset))
    texts.update(
        table_texts(
            results / "tables", "3_all", filled, left_out_note(specs, at_preset, left_at_preset), preset
        )
    )
    texts.update(sanity_texts(results, m, preset))
    checkpoints = stability.per_checkpoint(m.stability)
    texts.update(
        stability.table_texts(
            results / "tables", stability.stability_table(checkpoints, m.aggregated, preset)
        )
    )
    mechanism = stability.claim_rows(checkpoints, preset, evidence.bootstrap)
    folders = plotting.run_folders(results, m.runs, preset)
    drawn = None
    if draw:
        with plotting.stamped(REHEARSAL_STAMP if m.rehearsal else ""):
            drawn = figures.draw_all(m, results, preset, landscape, folders)
            drawn += stability.drawn(m.stability, preset)
        texts.update(_figure_files(results, drawn))
    shares = {
        p: share_claim_rows(
            plotting.coefficient_table(folders if p == preset else plotting.run_folders(results, m.runs, p)),
            set(m.frame["dataset"]),
            p,
            evidence,
            evidence.bootstrap,
        )
        for p in presets_with_runs(m.aggregated, preset)
    }
    board = leaderboard(m.kept, m.aggregated, preset, rank_by, m.sanity, stability.amplification(checkpoints))
    theirs = _robustbench_board(m, preset)
    texts[results / "REPORT.md"] = render_report(
        m, tables, preset, steps, evidence, drawn, shares, mechanism, board, theirs
    )
    board_texts = leaderboard_texts(results, board, left_at_preset)
    if len(theirs):  # RobustBench's section under the leaderboard, and its files
        board_texts[results / "leaderboard.md"] += "\n" + render_robustbench(theirs)
        board_texts.update(robustbench_entries(results / "leaderboard", theirs, m.rehearsal is not None))
    texts.update(board_texts)
    return write_all(rehearsal_marked(texts) if m.rehearsal else texts)


def _robustbench_board(m: Measured, preset: str) -> pd.DataFrame:
    """RobustBench's rows (bench.reports.robustbench) of the entries under `preset`."""
    rb = m.robustbench
    if rb is None:
        return pd.DataFrame()
    evidence = Evidence(rb, stats.Bootstrap())

    def interval(entry: tuple, metric: str) -> tuple[float, float]:
        """The bootstrap's 95% interval over seeds and test images, as the tables' cells."""
        at = dict(zip(GROUP, entry, strict=True))
        what = (at["dataset"], at["run"], at["kind"], at["preset"], metric)
        seeded = evidence.seeded(*what)
        return evidence.bootstrap.interval(list(seeded.values()), (*what, tuple(seeded)))

    return robustbench_board(
        rb.kept[rb.kept["preset"] == preset],
        rb.aggregated[rb.aggregated["preset"] == preset],
        rb.sanity[rb.sanity["preset"] == preset],
        interval,
    )


def write_figures(
    results_dir: str | os.PathLike,
    preset: str = "paper",
    steps: int = DEFAULT_STEPS,
    landscape: LandscapeConfig | None = None,
) -> list[Path]:
    """The figures alone (`--stage figures`), under results/figures/."""
    m = measured(results_dir, steps)
    drawn = figures.draw_all(m, Path(results_dir), preset, landscape)
    drawn += stability.drawn(m.stability, preset)
    for item in drawn:
        if isinstance(item, plotting.Skipped):
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


def sanity_texts(results: Path, m: Measured, preset: str) -> dict[Path, str]:
    """sanity.md (the table and its legend) and sanity.csv (the figures as numbers)."""
    table = m.sanity[m.sanity["preset"] == preset]
    text = "# Sanity checks\n\n" + render_sanity(m.sanity, preset) + "\n\n" + SANITY_LEGEND + "\n"
    return {results / "sanity.md": text, results / "sanity.csv": table.to_csv(index=False)}
