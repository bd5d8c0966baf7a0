"""Reports never mix unlike cells: the selection of one measurement per cell, and which
records are current."""

import itertools
import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from bench.attacks.perturbations import params_text
from bench.data.noise import NOISE_GROUPS
from bench.records.aggregate import ENTRY, aggregate, per_seed
from bench.records.checkpoints import ensemble_digest
from bench.records.load import stale_rows
from bench.records.schema import COLUMNS, MEMBER_COLUMNS, RUN_COLUMNS
from bench.records.selection import chosen_runs, select_measurements
from bench.reports.leaderboard import left_out_note
from bench.reports.tables import fill, render, table_slots

PRESET_ALPHA = {"paper": 2.0, "authors-code": 1.0}


def cell(
    run,
    seed,
    perturbation,
    correct,
    n,
    *,
    eps=0.0,
    severity=0,
    members=1,
    source="released",
    steps=0,
    alpha=0.0,
    preset="paper",
    model="resnet110",
    dataset="cifar10",
    digest=None,
    time=0,
):
    return {
        **dict.fromkeys(COLUMNS),
        "model": model,
        "run": run,
        "family": "preact-resnet",
        "dataset": dataset,
        "data_source": source,
        "data_sha256": "d" * 64,
        "seed": seed,
        "members": members,
        "perturbation": perturbation,
        "eps_255": eps,
        "severity": severity,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "preset": preset,
        "params": params_text({"alpha_255": alpha, "steps": steps}) if steps else "{}",
        "checkpoint_sha256": digest or f"{run}-{seed}-{members}",
        "timestamp": f"2026-11-27T00:00:{time:02d}+00:00",
    }


def random_records(rng: random.Random) -> pd.DataFrame:
    """Records of two runs of one model (and their ensembles), each cell measured in some of
    many ways: test subsets, data sources, step counts and sizes, ensemble sizes."""
    rows = []
    for run, (seed, members) in itertools.product(
        ("resnet110", "resnet110@smoke"), [(0, 1), (1, 1), (2, 1), (-1, 2), (-1, 3)]
    ):
        for n, source in itertools.product((20, 50), ("released", "unofficial", "generated")):
            if rng.random() < 0.5:  # this seed was not measured this way
                continue
            base = {"members": members, "time": rng.randrange(60)}
            if source == "generated":  # noise cells
                for group in NOISE_GROUPS:
                    if rng.random() < 0.9:
                        rows += [
                            cell(run, seed, group, rng.randrange(n + 1), n, severity=s, source=source, **base)
                            for s in range(1, 6)
                        ]
                continue
            for group in NOISE_GROUPS if source == "released" else ():
                if rng.random() < 0.9:
                    rows += [
                        cell(run, seed, group, rng.randrange(n + 1), n, severity=s, source=source, **base)
                        for s in range(1, 6)
                    ]
            if rng.random() < 0.9:
                rows.append(cell(run, seed, "clean", rng.randrange(n + 1), n, source=source, **base))
            for eps in (1.0, 2.0):
                rows.append(cell(run, seed, "fgsm", rng.randrange(n + 1), n, eps=eps, source=source, **base))
                for attack, steps, alpha in itertools.product(("ifgsm", "pgd"), (1, 5, 20), (1.0, 2.0)):
                    if rng.random() < 0.4:
                        rows.append(
                            cell(
                                run,
                                seed,
                                attack,
                                rng.randrange(n + 1),
                                n,
                                eps=eps,
                                source=source,
                                steps=steps,
                                alpha=alpha,
                                **base,
                            )
                        )
    return pd.DataFrame(rows).assign(stale=False)


def variant_means(frame: pd.DataFrame) -> dict:
    """(entry, metric) -> {variant: (mean over seeds in %, seeds)} computed directly from the
    records, one variant being one way of measuring (n, members, source, steps, alpha)."""
    out: dict = {}
    frame = frame.assign(kind=np.where(frame["members"] > 1, "ensemble", "single"))
    noise = frame["perturbation"].isin(NOISE_GROUPS)
    for keys, rows in frame[noise].groupby(
        ["run", "kind", "seed", "members", "n", "data_source", "perturbation"]
    ):
        if rows["severity"].nunique() == 5:
            run, kind, seed, members, n, source, group = keys
            out.setdefault((run, kind, group), {}).setdefault((n, members, source, 0, 0.0), []).append(
                100 * rows["correct"].sum() / rows["n"].sum()
            )
    for row in frame[~noise].itertuples():
        metric = row.perturbation if row.perturbation == "clean" else f"{row.perturbation}@{row.eps_255:g}"
        params = json.loads(row.params)
        variant = (row.n, row.members, row.data_source, params.get("steps", 0), params.get("alpha_255", 0.0))
        out.setdefault((row.run, row.kind, metric), {}).setdefault(variant, []).append(100 * row.accuracy)
    return {k: {v: (float(np.mean(a)), len(a)) for v, a in d.items()} for k, d in out.items()}


@pytest.mark.parametrize("steps", [20, 5])
def test_no_reported_number_mixes_measurements(steps):
    """Property: over many random record sets, every aggregated number is the mean over
    seeds of cells measured one single way, that way is the one the rules prefer (largest
    test subset first, then the asked or else strongest attack), and nothing measured
    disappears without a left-out row."""
    rng = random.Random(10)
    checked = 0
    for _ in range(40):
        frame = random_records(rng)
        kept, left_out = select_measurements(frame, steps)
        aggregated = aggregate(per_seed(kept))
        truth = variant_means(frame)
        assert not kept.duplicated([*ENTRY, "seed", "metric"]).any()
        for row in aggregated.itertuples():
            if row.metric == "noise":
                continue
            variants = truth[(row.run, row.kind, row.metric)]
            attack = row.metric.split("@")[0]
            assert row.n_test == max(
                v[0]
                for k, d in truth.items()
                if k[:2] == (row.run, row.kind) and k[2].split("@")[0] == attack
                for v in d
            )  # the largest test subset the entry measured this perturbation on
            matches = [
                v
                for v, (mean, seeds) in variants.items()
                if math.isclose(mean, row.mean, abs_tol=1e-4)
                and v[0] == row.n_test
                and (v[1] == row.n if row.kind == "ensemble" else seeds == row.n)  # all its seeds averaged
            ]
            assert matches, (row, variants)  # a mean of one variant, never a blend
            if row.metric.startswith(("ifgsm", "pgd")):  # the asked attack parameters, else the strongest

                def preferred(match, variants=variants) -> bool:
                    pool = [v[3:] for v in variants if v[:3] == match[:3]]
                    return match[3:] == ((steps, 2.0) if (steps, 2.0) in pool else max(pool))

                assert any(preferred(m) for m in matches)
            checked += 1
        measured = {(r, k, m) for r, k, m in truth}
        shown = set(zip(kept["run"], kept["kind"], kept["metric"], strict=True))
        dropped = set(zip(left_out["run"], left_out["kind"], left_out["metric"], strict=True))
        assert measured - shown <= dropped
    assert checked > 1000


def test_each_entry_takes_one_test_size_ensemble_size_and_step_count():
    rows = [cell("r", s, "clean", 40 + s, 50) for s in (0, 1)]  # two seeds at n = 50
    rows += [cell("r", 0, "clean", 5, 20)]  # a rerun at n = 20: never pooled with them
    rows += [cell("r", -1, "clean", 30, 50, members=2), cell("r", -1, "clean", 45, 50, members=3)]
    rows += [cell("r", s, "pgd", 10 + s, 50, eps=4.0, steps=1, alpha=2.0, time=1) for s in (0, 1)]
    rows += [cell("r", s, "pgd", 30 + s, 50, eps=4.0, steps=5, alpha=2.0, time=0) for s in (0, 1)]
    frame = pd.DataFrame(rows).assign(stale=False)
    wide = aggregate(per_seed(select_measurements(frame, steps=5)[0])).set_index(["kind", "metric"])
    assert wide.loc[("single", "clean"), ["mean", "n", "n_test"]].tolist() == [81.0, 2, 50]
    assert wide.loc[("ensemble", "clean"), ["mean", "n"]].tolist() == [90.0, 3]  # the 3-member one
    assert wide.loc[("single", "pgd@4"), "mean"] == 61.0  # steps 5 asked: (30 + 31) / 50
    one = aggregate(per_seed(select_measurements(frame, steps=1)[0])).set_index(["kind", "metric"])
    assert one.loc[("single", "pgd@4"), "mean"] == 21.0
    most = aggregate(per_seed(select_measurements(frame, steps=20)[0])).set_index(["kind", "metric"])
    assert most.loc[("single", "pgd@4"), "mean"] == 61.0  # 20 not measured: the most steps
    _, left_out = select_measurements(frame, steps=5)
    assert sorted(left_out["rule"].unique()) == [
        "asked parameters",
        "largest ensemble",
        "largest test subset",
    ]


def test_released_data_before_generated_noise_and_unofficial_files():
    rows = []
    for source, correct in (("generated", 10), ("released", 30)):
        rows += [
            cell("r", 0, g, correct, 50, severity=s, source=source) for g in NOISE_GROUPS for s in range(1, 6)
        ]
    rows += [cell("r", 0, "clean", 5, 50, source="unofficial"), cell("r", 0, "clean", 45, 50)]
    frame = pd.DataFrame(rows).assign(stale=False)
    wide = aggregate(per_seed(select_measurements(frame)[0])).set_index("metric")
    assert wide.loc["noise", "mean"] == 60.0 and wide.loc["clean", "mean"] == 90.0


def test_tables_show_one_run_per_model_and_name_the_rest():
    rows = [cell("resnet110@smoke", s, "clean", 20 + s, 100, time=5) for s in range(3)]
    rows += [cell("resnet110", 0, "clean", 90, 100), cell("resnet110", 0, "clean", 60, 50)]
    frame = pd.DataFrame(rows).assign(stale=False)
    kept, left_out = select_measurements(frame)
    aggregated = aggregate(per_seed(kept))
    runs = chosen_runs(aggregated).set_index("run")
    assert runs.loc["resnet110", "chosen"] and not runs.loc["resnet110@smoke", "chosen"]  # the paper's recipe
    specs = [s for s in table_slots(2, frame) if s.model == "resnet110" and s.dataset == "cifar10"]
    filled = fill(specs, aggregated, "paper", 2)
    assert render(filled).splitlines()[2] == "| ResNet-110 | 90.00 (n=1) |"
    assert left_out_note(specs, aggregated, left_out) == (
        "Measured but not shown (one measurement per cell, chosen by the rules in REPORT.md): "
        "ResNet-110: n=50 (clean); ResNet-110: run resnet110@smoke (n=100, 3 seeds)."
    )


# --- which records are current --------------------------------------------------------------


def runs_frame(*rows):
    keys = ["run", "dataset", "seed", "status", "checkpoint_sha256"]
    return pd.DataFrame([{**dict.fromkeys(RUN_COLUMNS), **dict(zip(keys, r, strict=True))} for r in rows])


def test_stale_rows_follow_the_checkpoint_folders_and_the_ensemble_members():
    cells = pd.DataFrame(
        [
            cell("m", 0, "clean", 1, 2, digest="old0"),  # seed 0 retrained, then the retrain failed
            cell("m", 1, "clean", 1, 2, digest="a1"),  # current
            cell("m", 2, "clean", 1, 2, digest="a2"),  # its folder was deleted
            cell("m", -1, "clean", 1, 2, members=2, digest="ens01"),  # built on old0: stale
            cell("m", -1, "clean", 1, 2, members=2, digest="ens12", time=1),  # built on a1, a2: a2 gone
            cell("ext", 0, "clean", 1, 2, digest="x-old"),  # a defense of the user's, re-evaluated
            cell("ext", 0, "clean", 1, 2, digest="x-new", time=9),
        ]
    )
    runs = runs_frame(
        ("m", "cifar10", 0, "failed", "new0"),
        ("m", "cifar10", 1, "finished", "a1"),
        ("m", "cifar10", 2, "gone", None),
    )
    members = pd.DataFrame(
        [
            ("ens01", "m", "cifar10", 0, "old0"),
            ("ens01", "m", "cifar10", 1, "a1"),
            ("ens12", "m", "cifar10", 1, "a1"),
            ("ens12", "m", "cifar10", 2, "a2"),
        ],
        columns=list(MEMBER_COLUMNS),
    )
    assert stale_rows(cells, runs, members).tolist() == [True, False, True, True, True, True, False]
    runs.loc[2, ["status", "checkpoint_sha256"]] = "finished", "a2"
    assert stale_rows(cells, runs, members).tolist() == [True, False, False, True, False, True, False]


def test_an_ensemble_recorded_without_its_members_is_current_only_on_current_checkpoints():
    current = [("m", "cifar10", s, "finished", f"a{s}") for s in range(3)]
    cells = pd.DataFrame(
        [
            cell("m", -1, "clean", 1, 2, members=2, digest=ensemble_digest(["a1", "a0"])),  # any order
            cell("m", -1, "clean", 1, 2, members=3, digest=ensemble_digest(["a0", "a1", "a2"])),
            cell(
                "m", -1, "clean", 1, 2, members=2, digest=ensemble_digest(["a0", "old"])
            ),  # retrained member
        ]
    )
    none = pd.DataFrame(columns=list(MEMBER_COLUMNS))
    assert stale_rows(cells, runs_frame(*current), none).tolist() == [False, False, True]
