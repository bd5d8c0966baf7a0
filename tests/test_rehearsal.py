"""`--rehearse`: a suite's whole plan on tiny data, its stand-in data, its relaxed gates by
rule, its tags, its own results folder, and outputs that can never be shown as real numbers."""

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import run_bench
from bench.data.datasets import CIFAR10, CIFAR100, load_split
from bench.eval.protocol import protocol_cells
from bench.records import sanity
from bench.records.checkpoints import run_tag
from bench.records.load import load_checks, load_records, load_runs, load_stability
from bench.run import rates, rehearsal
from bench.run.options import RunOptions
from bench.run.plan import ENSEMBLE, MEASURE, TRAIN, eval_config, plan_jobs, plan_tasks, stability_config
from bench.run.rehearsal import REHEARSAL, prepare_data, rehearsal_suite, write_standin
from bench.run.suites import SUITES
from bench.train.loop import chance_gate
from bench.train.recipes import recipe_for

REPO = Path(__file__).resolve().parents[1]


def _rehearsed(run: str) -> bool:
    """A zoo run tag of a rehearsal's length."""
    return "rehearsal" in run.split("@")[1:]


def _plan(suite_name: str, **given):
    suite = rehearsal_suite(SUITES[suite_name])
    options = RunOptions(suite=suite_name, rehearse=True, **given)
    return suite, options, plan_tasks(plan_jobs(suite, options), suite, options, "cpu")


def test_the_paper_rehearsal_is_the_paper_plan_with_one_seed_per_job_but_an_ensembles_two():
    real_suite, options = SUITES["paper"], RunOptions(suite="paper")
    real = plan_tasks(plan_jobs(real_suite, options), real_suite, options, "cpu")
    suite, options, tasks = _plan("paper")
    assert {t.job.name for t in tasks} == {
        t.job.name for t in real
    }  # every model, at its real depth and width
    assert len({t.job for t in tasks}) == 36 and {t.job.dataset for t in tasks} == {"cifar10", "cifar100"}
    assert Counter(t.kind for t in tasks) == {TRAIN: 42, MEASURE: 42, ENSEMBLE: 6}  # 30 jobs x 1 seed + 6 x 2
    assert {t.seeds for t in tasks if t.kind == ENSEMBLE} == {(0, 1)}
    assert all(_rehearsed(t.run_tag) for t in tasks) and not any(_rehearsed(t.run_tag) for t in real)
    # the protocol is the suite's: the same perturbations, radii, checks and stability units, on fewer images
    job = next(t.job for t in tasks if t.job.name == "in-resnet110" and t.job.ensemble_radii_255)
    config, full = (
        eval_config(job, suite, options, "cpu"),
        eval_config(job, real_suite, RunOptions(suite="paper"), "cpu"),
    )
    assert (config.radii_255, config.extra, config.steps) == (full.radii_255, full.extra, full.steps)
    assert (config.n_test, config.n_test_of("autoattack"), stability_config(suite, options).n) == (4, 2, 2)
    assert suite.checks == real_suite.checks and suite.studies == real_suite.studies and not suite.needs_gpu
    recipe = recipe_for("preact-resnet", "cifar10", length="rehearsal")
    assert (recipe.epochs, recipe.milestones, recipe.lr) == (
        2,
        (1, 2),
        0.1,
    )  # the schedule's milestone is crossed
    assert (
        next(t.run_tag for t in tasks if t.job.name == "resnext29-8x64d") == "resnext29-8x64d@rehearsal@n64"
    )


def test_given_seeds_are_kept_and_a_rehearsal_is_tagged_with_its_length():
    _, _, tasks = _plan("smoke", seeds=(3,))
    assert {t.seeds for t in tasks} == {(3,)} and not [t for t in tasks if t.kind == ENSEMBLE]
    assert run_tag("resnet14", length="rehearsal", n_train=64) == "resnet14@rehearsal@n64"


def test_the_chance_gate_is_relaxed_for_a_rehearsal_alone():
    assert chance_gate(0.05, 10, rehearsal=False) == ("failed", "test accuracy 0.0500 at chance level")
    assert chance_gate(0.05, 10, rehearsal=True) == (
        "finished",
        "test accuracy 0.0500 at chance level (gate relaxed: rehearsal)",
    )
    assert chance_gate(0.5, 10, rehearsal=False) == ("finished", "")


def _gates(run: str, large_eps: float) -> pd.DataFrame:
    entry = {
        "dataset": "cifar10",
        "model": "resnet110",
        "run": run,
        "lambda_low": np.nan,
        "lambda_high": np.nan,
        "kind": "single",
        "preset": "paper",
    }
    rows = [
        ("large-eps", large_eps, sanity.CHANCE_MARGIN),
        ("iterative-vs-fgsm", 0.0, 0.5),
        ("noise-vs-pgd", 0.0, 0.5),
        ("reference-gap", 0.0, 5.0),
        ("nonfinite-gradients", 0.0, 0.0),
        ("randomized", 0.0, 0.0),
        ("probabilities", 0.0, 0.0),
        ("classes", 0.0, 0.0),
        ("dynamic", 0.0, 0.0),
    ]
    return pd.DataFrame([{**entry, "gate": g, "value": v, "limit": lim, "detail": ""} for g, v, lim in rows])


def test_gates_that_need_a_trained_network_are_relaxed_by_rule_in_a_rehearsal():
    assert (
        list(rehearsal_suite(SUITES["smoke"]).relaxed_gates)
        == sanity.training_gates()
        == [
            "eps-monotone",
            "iterative-vs-fgsm",
            "large-eps",
            "noise-vs-pgd",
            "reference-gap",
            "zero-gradients",
            "transfer",
        ]
    )
    real = sanity.summary(_gates("resnet110", 40.0)).iloc[0]
    assert real["flags"] == "large-eps-above-chance" and real["unreliable"] == True  # noqa: E712
    relaxed = frozenset(rehearsal_suite(SUITES["smoke"]).relaxed_gates)
    rehearsed = sanity.summary(_gates("resnet110@rehearsal@n64", 40.0), relaxed=relaxed).iloc[0]
    assert (
        rehearsed["flags"] == "large-eps-above-chance (relaxed)" and rehearsed["unreliable"] == False  # noqa: E712 (a numpy bool: `is False` would not hold)
    )
    # a model check is never relaxed
    broken = _gates("resnet110@rehearsal@n64", 0.0)
    broken.loc[broken["gate"] == "randomized", "value"] = 1.0
    assert sanity.summary(broken, relaxed=relaxed).iloc[0]["unreliable"] == True  # noqa: E712


def test_standins_have_the_data_sets_files_shapes_and_classes(tmp_path):
    for info in (CIFAR10, CIFAR100):
        write_standin(info, tmp_path / info.folder)
        assert sorted(p.name for p in (tmp_path / info.folder).iterdir()) == sorted(
            [n for files in info.files.values() for n, _ in files]
            + ["batches.meta" if info is CIFAR10 else "meta"]
        )
        for split, count in (("train", REHEARSAL.standin_train), ("test", REHEARSAL.standin_test)):
            images = load_split(info, split, tmp_path)
            assert images.images.shape == (count, 32, 32, 3) and images.images.dtype == np.uint8
            assert not images.official and set(np.bincount(images.labels, minlength=info.num_classes)) <= {
                count // info.num_classes,
                -(-count // info.num_classes),
            }  # balanced over every class


def test_a_rehearsal_uses_the_data_that_is_there_and_stand_ins_for_what_is_not(tmp_path, caplog):
    root = tmp_path / "data"
    assert prepare_data(["synthetic"], root) == str(root)  # made here: never missing
    write_standin(CIFAR10, root / CIFAR10.folder)  # "the real files" of CIFAR-10 (any files in its layout)
    assert prepare_data(["cifar10"], root) == str(root)
    assert prepare_data(["cifar10", "cifar100"], root, dry=True) == str(root / "rehearsal")
    assert not (root / "rehearsal").exists()  # a dry run writes nothing
    with caplog.at_level("INFO"):
        folder = Path(prepare_data(["cifar10", "cifar100"], root))
    assert (folder / CIFAR10.folder).is_symlink() and (folder / CIFAR10.folder).resolve() == (
        root / CIFAR10.folder
    ).resolve()
    assert not (folder / CIFAR100.folder).is_symlink() and len(load_split(CIFAR100, "test", folder)) == 200
    assert (
        "CIFAR-100 is not in" in caplog.text
        and "stand-ins" in caplog.text
        and "CIFAR-10 is not" not in caplog.text
    )
    write_standin(CIFAR100, root / CIFAR100.folder, seed=1)  # CIFAR-100 arrives: it replaces the stand-ins
    assert prepare_data(["cifar10", "cifar100"], root) == str(root)
    (
        root / CIFAR10.folder / "test_batch"
    ).unlink()  # now CIFAR-10 is missing: the stand-ins' folder, CIFAR-100 linked in
    folder = Path(prepare_data(["cifar10", "cifar100"], root))
    assert (folder / CIFAR100.folder).is_symlink() and not (folder / CIFAR10.folder).is_symlink()
    assert not (
        root / CIFAR10.folder / "test_batch"
    ).exists()  # the stand-ins went beside the user's files, not into them
    assert (load_split(CIFAR100, "test", folder).images == load_split(CIFAR100, "test", root).images).all()


def test_probes_are_shared_by_equal_flops_and_replaced_by_flops_when_slow(monkeypatch):
    flops = {"small": 1e8, "same": 1.01e8, "big": 1e11}
    probed = []
    monkeypatch.setattr(rates, "forward_flops", lambda model, shape: flops[model])
    monkeypatch.setattr(
        rates,
        "probe",
        lambda model, device, shape: probed.append(model) or rates.Rates(100, 400, 200, "probe"),
    )
    monkeypatch.setattr(rates, "_PROBED", {})
    assert rates.probed_rates("small", "cpu").source == "probe"
    assert (
        rates.probed_rates("same", "cpu").forward == 400
    )  # one architecture, another skip rule: the same probe
    big = rates.probed_rates(
        "big", "cpu"
    )  # its probe: 5 batches x 32 x (1/0.1 + 1/0.4 + 1/0.2) s, far above budget
    assert probed == ["small"] and big.forward == pytest.approx(0.4) and big.train == pytest.approx(0.1)
    assert big.source == "100.00 GFLOPs at the throughput small's probe achieved"


def test_the_last_line_sets_each_stage_beside_its_estimate():
    nan = float("nan")
    rehearsed = rehearsal.StageSeconds(
        {"train": 60.0, "eval": 200.0, "stability": 0.0, "check": nan, "report": nan}, {}
    )
    real = rehearsal.StageSeconds(
        {"train": 7200.0, "eval": 3600.0, "stability": 360.0, "check": nan, "report": nan},
        {1: 11160.0, 4: 3000.0, 16: 900.0},
    )
    measured = {"train": 90.0, "eval": 100.0, "stability": 5.0, "check": 30.0, "report": 12.0}
    assert rehearsal.last_line(rehearsed, real, measured) == (
        "rehearsal measured: train 90 s (estimated 60 s, x1.5); eval 100 s (estimated 3 min, x0.5); stability 5 s "
        "(estimated 0 s); check 30 s (not estimated); report 12 s (not estimated). The real run: estimated 3.1 h of "
        "work (train 2.0 h, eval 60 min, stability 6 min; checks and reports not estimated), wall time 1 worker 3.1 h, "
        "4 workers 50 min, 16 workers 15 min"
    )


# --- integration: rehearsals run, their records and outputs ----------------------------------------


def _rehearse(results: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "run_bench.py",
        "--rehearse",
        "--no-progress",
        "--results-dir",
        str(results),
        "--data-dir",
        str(data),
        *extra,
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _every_stage_recorded(results: Path, suite, options, tasks) -> None:
    """Every training finished, and every measuring task recorded all its cells, checks and stability units."""
    runs, cells = load_runs(results), load_records(results)
    checks, stability = load_checks(results), load_stability(results)
    for task in tasks:
        mine = (
            (cells["run"] == task.run_tag)
            & (cells["dataset"] == task.job.dataset)
            & (cells["seed"] == task.seed)
        )
        if task.kind == TRAIN:
            row = runs[
                (runs["run"] == task.run_tag)
                & (runs["seed"] == task.seed)
                & (runs["dataset"] == task.job.dataset)
            ]
            assert list(row["status"]) == ["finished"], task.name
            continue
        asked = protocol_cells(eval_config(task.job, suite, options, "cpu", task.kind == ENSEMBLE))
        assert mine.sum() == len(asked), task.name
        assert ((checks["run"] == task.run_tag) & (checks["seed"] == task.seed)).any(), task.name
        assert ((stability["run"] == task.run_tag) & (stability["seed"] == task.seed)).any(), task.name
    assert set(cells["run"].map(_rehearsed)) == {True} and set(cells["n"]) <= {2, 4}


def _outputs_say_rehearsal(results: Path) -> None:
    for path in [
        results / "REPORT.md",
        results / "sanity.md",
        results / "leaderboard.md",
        *results.glob("tables/*.md"),
    ]:
        assert "**Rehearsal** (`--rehearse`)" in path.read_text(), path
    for path in results.glob("tables/*.csv"):
        frame = pd.read_csv(path)
        assert (
            len(frame) == 0
            or ("rehearsal" in frame and frame["rehearsal"].all())
            or frame["run"].map(_rehearsed).all()
        ), path
    board = pd.read_csv(results / "leaderboard.csv")
    assert len(board) and board["name"].str.contains("@rehearsal").all()
    report = (results / "REPORT.md").read_text()
    assert report.startswith("# inres-bench report (rehearsal)")
    verdicts = [line for line in report.splitlines() if line.startswith("| ") and "not judged" in line]
    assert verdicts and not re.search(r"\| (reproduces|contradicted|inconclusive)", report)
    captions = [line for line in report.splitlines() if line.endswith(".pdf))")]
    assert captions and all(line.startswith("REHEARSAL: not measurements.") for line in captions)
    for entry in results.glob("leaderboard/*/*/*.json"):
        assert "@rehearsal" in entry.name


@pytest.mark.slow
def test_the_smoke_rehearsal_runs_every_stage_and_every_output_names_itself_a_rehearsal(tmp_path):
    data = tmp_path / "data"
    run = _rehearse(tmp_path / "results", data)
    results = tmp_path / "results" / "rehearsal"  # its own folder
    suite, options, tasks = _plan("smoke")
    _every_stage_recorded(results, suite, options, tasks)
    _outputs_say_rehearsal(results)
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"rehearsal measured: train .* \(estimated .*\); eval .*; report .* \(not estimated\)\. The real "
        r"run: estimated .* of work \(train .*, eval .*, stability .*\), wall time 1 worker .*",
        last,
    ), last
    again = _rehearse(tmp_path / "results", data)  # everything cached: nothing measured again
    assert "0 cells evaluated, " in again.stderr and "stability units measured, 0 cached" not in again.stderr


NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))
"""


@pytest.mark.slow
def test_a_defense_rehearses_and_its_last_line_estimates_the_real_run(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    weights = {"fc.weight": torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(0)) / 50}
    torch.save(weights | {"fc.bias": torch.zeros(10)}, tmp_path / "net.pt")
    defense = ["--defense", f"{tmp_path / 'net.py'}:Net", "--weights", str(tmp_path / "net.pt")]
    run = _rehearse(tmp_path / "results", tmp_path / "data", *defense, "--dataset", "synthetic")
    cells = load_records(tmp_path / "results" / "rehearsal")
    assert set(cells["run"]) == {"net"} and set(cells["n"]) <= {2, 4}
    last = run.stderr.strip().splitlines()[-1]
    # the defense built once, kept for the probe that both estimates share
    assert re.fullmatch(
        r"rehearsal measured: train 0 s \(estimated 0 s\); eval .*\. The real run: estimated .* of work "
        r"\(train 0 s, eval (?!0 s).*",
        last,
    ), last


@pytest.mark.slow
def test_a_paper_study_rehearses_at_full_depth_with_ensembles_transfer_and_autoattack(tmp_path):
    data = tmp_path / "data"
    results = tmp_path / "results" / "rehearsal"
    # one interval of Table 4's grid (--lambda-init): the study's five would rehearse five runs
    picked = (
        "--suite",
        "paper",
        "--device",
        "cpu",
        "--models",
        "resnet110,in-resnet-sig110",
        "--datasets",
        "cifar10",
        "--lambda-init",
        "0.2,0.25",
    )
    run = _rehearse(results.parent, data, *picked)
    assert "CIFAR-10 is not in" in run.stderr and "stand-ins" in run.stderr  # no CIFAR here
    suite, options, tasks = _plan(
        "paper", models="resnet110,in-resnet-sig110", datasets=("cifar10",), lambda_init=(0.2, 0.25)
    )
    assert Counter(t.kind for t in tasks) == {TRAIN: 3, MEASURE: 3, ENSEMBLE: 1}
    _every_stage_recorded(results, suite, options, tasks)
    checks = load_checks(results)
    assert set(checks[checks["run"] == "in-resnet-sig110@rehearsal@lambda0.2-0.25@n64"]["check"]) >= {
        "transfer",
        "randomized",
    }
    cells = load_records(results)
    assert {"autoattack", "pgd50"} <= set(cells["perturbation"]) and set(cells["n"]) == {2, 4}
    meta = (results / "checkpoints/cifar10/resnet110@rehearsal@n64/seed0/meta.json").read_text()
    assert (
        '"model": "resnet110"' in meta and '"length": "rehearsal"' in meta
    )  # the real network, its layout tagged
    _outputs_say_rehearsal(results)


@pytest.mark.slow
def test_a_rehearsal_has_a_folder_of_its_own_and_measurements_never_share_it(mini_run, tmp_path, capsys):
    command, reference = mini_run
    results = tmp_path / "results"
    shutil.copytree(reference, results)
    before = {p.relative_to(results): p.read_bytes() for p in results.rglob("*") if p.is_file()}
    data = Path(command[command.index("--data-dir") + 1])
    _rehearse(results, data, "--models", "resnet8", "--radii", "2")
    after = {p.relative_to(results): p.read_bytes() for p in results.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0] != "rehearsal"} == before  # not a byte of it changed
    own = results / "rehearsal"
    assert load_records(own)["run"].map(_rehearsed).all() and (own / "REPORT.md").is_file()
    assert json.loads((own / "rehearsal.json").read_text())["relaxed_gates"] == sanity.training_gates()
    base = ["--no-progress", "--data-dir", str(data), "--models", "resnet8", "--radii", "2"]
    assert run_bench.main([*base, "--results-dir", str(own)]) == 2  # a run that measures
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and all(
        p in said for p in (str(own), "rehearsal's results folder", "--results-dir")
    )
    assert run_bench.main([*base, "--results-dir", str(own), "--stage", "report"]) == 0  # its reports again
    assert (own / "REPORT.md").read_text().startswith("# inres-bench report (rehearsal)")
    capsys.readouterr()
    assert (
        run_bench.main([*base, "--results-dir", str(tmp_path), "--rehearse", "--dry-run"]) == 0
    )  # results/ is not it
    shutil.copytree(reference, tmp_path / "y" / "rehearsal")  # measurements where a rehearsal would go
    assert run_bench.main([*base, "--results-dir", str(tmp_path / "y"), "--rehearse"]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds measurements, not a rehearsal's records" in said and "--results-dir" in said
