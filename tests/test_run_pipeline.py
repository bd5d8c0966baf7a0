"""The whole pipeline: suites, plans, the smoke suite end to end, resuming after SIGKILL."""

import json
import logging
import math
import random
import re
import shutil
import signal
import subprocess
from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import run_bench
from bench.data.datasets import DATASETS
from bench.records.load import load_checks, load_correct, load_records, load_runs, load_stability
from bench.records.schema import KEY, STABILITY_KEY
from bench.run import pipeline, plan
from bench.run.executors import DONE
from bench.run.pipeline import RunOptions, plan_jobs
from bench.run.suites import SUITES
from bench.run.todo import ToDo
from models import model_entry

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
SMOKE_MODELS = {"resnet14", "in-resnet14", "lambda-in-resnet14"}


def test_paper_suite_plan_merges_its_studies():
    jobs = plan_jobs(SUITES["paper"], RunOptions(suite="paper"))
    assert len(jobs) == 9 * 2 + 2 * 5 + 2 * 4  # Tables 1-3 on both data sets, Table 4's grid, Table 5's sweep
    by_key = {(j.name, j.dataset, j.lambda_init): j for j in jobs}
    assert by_key["in-resnet110", "cifar10", None].radii_255 == (1.0, 2.0, 4.0)
    assert by_key["in-resnet110", "cifar10", None].ensemble_radii_255 == (2.0,)
    assert by_key["in-resnet110", "cifar100", None].ensemble_radii_255 == ()
    assert by_key["in-resnet110", "cifar10", (0.3, 0.4)].radii_255 == (2.0,)
    gated = model_entry("in-resnet-gating-sig110").init_for((0.2, 0.25))  # the default interval, as its d
    assert by_key["in-resnet-gating-sig110", "cifar10", gated].radii_255 == (2.0,)
    assert not any(j.ensemble_radii_255 for j in jobs if "resnext" in j.name)


def test_models_option_restricts_or_extends_a_suite():
    one = plan_jobs(SUITES["paper"], RunOptions(suite="paper", models="in-resnet110"))
    assert sorted((j.dataset, j.lambda_init or (0.2, 0.25)) for j in one) == [
        ("cifar10", (0.0, 0.1)),
        ("cifar10", (0.1, 0.2)),
        ("cifar10", (0.2, 0.25)),
        ("cifar10", (0.25, 0.3)),
        ("cifar10", (0.3, 0.4)),
        ("cifar100", (0.2, 0.25)),
    ]
    new = plan_jobs(SUITES["smoke"], RunOptions(models="resnet20", radii_255=(8.0,), datasets=("cifar10",)))
    assert [(j.name, j.dataset, j.radii_255, j.ensemble_radii_255) for j in new] == [
        ("resnet20", "cifar10", (8.0,), (8.0,))
    ]


@pytest.mark.parametrize("suite", ["smoke", "paper"])
def test_each_config_is_derived_once_on_the_plan(suite, tmp_path, monkeypatch, capsys):
    """A dry run derives every task's TrainConfig, EvalConfig and StabilityConfig once, in
    plan_tasks, and nothing else derives them again: the checks, the header and the
    estimate read them from the tasks (the seeds of a job share one EvalConfig)."""
    calls = Counter()
    for name in ("train_config", "eval_config", "stability_config"):
        real = getattr(plan, name)
        monkeypatch.setattr(
            plan, name, lambda *a, _real=real, _name=name, **k: calls.update([_name]) or _real(*a, **k)
        )
    options = RunOptions(
        suite=suite,
        dry_run=True,
        device="cuda" if suite == "paper" else "cpu",
        assume_tflops=100.0,
        results_dir=str(tmp_path / "results"),
        data_dir=str(tmp_path / "data"),
    )
    assert pipeline.run(options) == 0
    tasks = plan.plan_tasks(plan.plan_jobs(SUITES[suite], options), SUITES[suite], options, options.device)
    calls_of_one_plan = Counter(
        {
            "train_config": sum(t.kind == "train" for t in tasks),
            "eval_config": len({t.job for t in tasks}) + sum(t.kind == "ensemble" for t in tasks),
            "stability_config": 1,
        }
    )
    assert calls == calls_of_one_plan + calls_of_one_plan  # the run's plan, and the one made here
    stability = plan.stability_config(SUITES[suite], options)
    assert all(t.stability == stability for t in tasks)  # the run's, made once
    assert all((t.train is None) == (t.kind in ("ensemble", "defense")) for t in tasks)
    assert all(
        t.train == plan.train_config(t.job, t.seed, SUITES[suite], options, options.device)
        for t in tasks
        if t.kind in ("train", "measure")
    )
    assert "plan: suite " + suite in capsys.readouterr().out


@pytest.mark.slow
def test_the_estimate_the_dry_run_and_the_run_see_the_plans_configs(trained, tmp_path, monkeypatch):
    """Every task the dry run's estimate and the run decide (bench.run.todo) carries the
    plan's configs, and the work each sends to a worker is made from them: the same cells,
    protocol and stability settings in the estimate as in the run."""
    results = tmp_path / "results"
    shutil.copytree(trained / "results" / "checkpoints", results / "checkpoints")  # the two ResNet-8 seeds
    options = RunOptions(
        models="resnet8",
        n_train=1024,
        n_test=24,
        n_stability=10,
        radii_255=(2.0,),
        progress=False,
        stages=("train", "eval", "check", "stability"),
        device="cpu",
        data_dir=str(trained / "data"),
        results_dir=str(results),
    )
    seen: dict[str, dict] = {"dry": {}, "run": {}}
    real_decide = ToDo.decide

    def decide(self, task):
        decision = real_decide(self, task)
        seen["dry" if self.dry else "run"][task.name] = (task, decision.work)
        return decision

    class Recording:  # an executor that records the work it gets and says each task is done
        slots, events = 1, []

        def submit(self, name, work):
            self.events.append(name)

        def next_event(self):
            return self.events.pop(0), DONE

        def close(self):
            pass

    monkeypatch.setattr(ToDo, "decide", decide)
    monkeypatch.setattr(pipeline, "make_executor", lambda *a, **k: Recording())
    assert pipeline.run(replace(options, dry_run=True)) == 0
    assert pipeline.run(options) == 0
    planned = {
        t.name: t
        for t in plan.plan_tasks(plan.plan_jobs(SUITES["smoke"], options), SUITES["smoke"], options, "cpu")
    }
    measuring = {n for n, t in planned.items() if t.kind != "train"}
    assert set(seen["dry"]) == measuring and set(seen["run"]) == set(
        planned
    )  # the run asks of the trainings too
    for name, (task, work) in seen["run"].items():
        assert (task.train, task.eval, task.stability) == (
            planned[name].train,
            planned[name].eval,
            planned[name].stability,
        )
        if name in measuring:
            dry_task, dry_work = seen["dry"][name]
            assert dry_task == task and work is not None
            # the same work, but for the run's id and which Fig. 2 images: a dry run generates no noise
            # files, so it plans the two clean ones where the run reads the two noise images it generated
            assert replace(dry_work, run_id="", landscapes=()) == replace(work, run_id="", landscapes=())
            assert (
                len(dry_work.landscapes) == len(work.landscapes) == (2 if task.kind == "measure" else 0)
            )  # seeds alone
            assert work.task == task and work.cells
        else:
            assert work is None  # trained already


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    argv = ["--dry-run", "--results-dir", str(tmp_path / "results"), "--data-dir", str(tmp_path / "data")]
    assert run_bench.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: suite smoke (the whole pipeline on synthetic data")
    assert re.search(
        r"^\| resnet14@smoke@n2048 +\| synthetic \| +2 \| 28 cells +\| +2 \| +96 \| +0 \|", out, re.M
    )
    assert (
        "total: 6 checkpoints to train, 288 cells to run, 0 cached; 45 stability units to run, 0 cached; estimated"
        in out
    )
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_eval_errors_are_one_line_and_record_nothing(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    offline = replace(DATASETS["cifar10"], url="file:///nonexistent/cifar-10-python.tar.gz")
    monkeypatch.setitem(DATASETS, "cifar10", offline)
    results = tmp_path / "results"
    cases = [  # each: what its one line must say (the value, the place, the fix)
        (["--datasets", "cifar10", "--data-dir", str(tmp_path / "empty")], ("cifar-10-python.tar.gz",)),
        (
            ["--stage", "train,evil"],
            ("unknown stage 'evil' in --stage", "train, eval, check, stability, report"),
        ),
        (["--radii", "1,x"], ("--radii", "'1,x'", "'x' is not a decimal number", "ASCII digits")),
        (["--models", "resnet8", "--n-test", "0"], ("--n-test 0", "must be positive")),
    ]
    for extra, parts in cases:
        assert run_bench.main(["--results-dir", str(results), "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and all(p in err for p in parts), err
    assert len(load_records(results)) == 0 and not any(results.glob("checkpoints/**/meta.json"))


@pytest.mark.slow
def test_smoke_suite_end_to_end(smoke_run):
    results, run = smoke_run
    assert run.returncode == 0, run.stderr[-3000:]
    frame = load_records(results, include_stale=True)
    assert len(frame) == 3 * 2 * 34 + 3 * 28 and not frame["stale"].any()
    assert set(frame["model"]) == SMOKE_MODELS and set(frame["data_source"]) == {"synthetic"}
    assert (frame["n"] == 100).all() and not frame.duplicated(list(KEY)).any()
    iterative = frame[frame["perturbation"].isin(["ifgsm", "pgd"])]
    assert (iterative["params"] == '{"alpha_255":2.0,"steps":20}').all()
    ensembles = frame[frame["members"] == 2]
    assert len(ensembles) == 3 * 28 and set(ensembles["seed"]) == {-1}
    assert set(ensembles.loc[ensembles["perturbation"] == "pgd", "eps_255"]) == {2.0}
    runs = load_runs(results)
    assert len(runs) == 6 and set(runs["status"]) == {"finished"}
    clean = frame[(frame["perturbation"] == "clean") & (frame["members"] == 1)]
    assert (clean["accuracy"] > 0.2).all()  # two epochs learn something (chance: 0.1)
    assert (
        len(re.findall(r"synthetic seed \d: clean [\d.]+ \| noise [\d.]+ \| fgsm@1/2/4/255", run.stderr)) == 6
    )
    assert len(re.findall(r"synthetic ensemble of 2: clean", run.stderr)) == 3
    for name in (
        "records.csv",
        "REPORT.md",
        "leaderboard.md",
        "leaderboard.csv",
        "tables/table6.md",
        "sanity.md",
    ):
        assert (results / name).is_file(), name
    assert set(frame["perturbation"]) >= {"uniform", "apgd-ce-lite"} and "autoattack" not in set(
        frame["perturbation"]
    )
    board = pd.read_csv(results / "leaderboard.csv")
    assert (
        board["autoattack@2"].isna().all() and board["worst@2"].notna().all()
    )  # the lite one is not AutoAttack
    assert (board["worst@2"] <= board[["fgsm@2", "ifgsm@2", "pgd@2"]].min(axis=1)).all()
    checks = load_checks(results)
    assert len(checks) == 9 * 6 and checks["passed"].all()  # 6 model checks of each seed and ensemble
    report = (results / "REPORT.md").read_text()
    assert "## Sanity checks" in report and "| resnet14@smoke@n2048 (ensemble)" in report
    stable = load_stability(results)  # the stability stage: 6 checkpoints x 7 units, 3 ensembles' gradients
    units = stable.groupby(["run", "seed", "members", "quantity", "perturbation"]).ngroups
    assert units == 6 * 7 + 3 and (stable["n"] == 10).all() and stable["mean"].notna().all()
    assert len(re.findall(r"synthetic seed \d: stability spectral_norm on 10 images", run.stderr)) == 6
    ensemble = board["name"].str.endswith("(ensemble)")
    assert (
        board.loc[ensemble, "amplification"].isna().all()
        and (board.loc[~ensemble, "amplification"] > 0).all()
    )
    assert "## The paper's mechanism: stability through depth" in report and "tables/stability.md" in report
    # what every number read: the test images (cells and stability), each noise file, the training images
    (clean,) = frame.loc[frame["perturbation"] == "clean", "data_sha256"].unique()
    assert set(stable["data_sha256"]) == {clean}
    assert f"Test images read (sha256 of images and labels): synthetic: {clean[:12]} (every run)." in report
    (shot,) = frame.loc[frame["perturbation"] == "shot_noise", "data_sha256"].unique()
    assert f", shot_noise {shot[:12]}, " in report and shot != clean
    (trained,) = {
        json.loads(p.read_text())["data"]["sha256"] for p in results.glob("checkpoints/**/meta.json")
    }
    assert (
        f"Training images read (sha256 of images and labels, from each checkpoint's meta.json): synthetic: {trained[:12]} (every run)."
        in report
    )
    for name in (
        "tables/stability.md",
        "tables/stability.csv",
        "figures/stability_growth_synthetic.png",
        "figures/stability_spectral_synthetic.pdf",
    ):
        assert (results / name).is_file(), name


@pytest.mark.slow
def test_smoke_suite_rerun_is_all_cached(smoke_run, capsys):
    results, _ = smoke_run
    data = results.parent / "data"
    assert run_bench.main(["--dry-run", "--results-dir", str(results), "--data-dir", str(data)]) == 0
    assert (
        "total: 0 checkpoints to train, 0 cells to run, 288 cached; 0 stability units to run, 45 cached;"
        in (capsys.readouterr().out)
    )


@pytest.mark.slow
def test_a_cached_rerun_does_no_work_and_rewrites_no_report(smoke_run, tmp_path, caplog):
    """Everything cached: no cell, unit or report is made again, and no report file is
    touched; a changed option, or a report file removed, writes the reports again."""
    caplog.set_level(logging.INFO)
    results = shutil.copytree(smoke_run[0], tmp_path / "results")  # times kept: the copy is as written
    argv = ["--results-dir", str(results), "--data-dir", str(smoke_run[0].parent / "data"), "--no-progress"]

    def written() -> dict:
        return {
            p: p.stat().st_mtime_ns
            for p in results.rglob("*")
            if p.is_file()
            and "checkpoints" not in p.parts
            and p.name != "records.sqlite"
            and ".locks" not in p.parts
        }

    before = written()
    assert run_bench.main(argv) == 0
    assert (
        "reports: up to date" in caplog.text
        and "0 cells evaluated, 288 cached; 0 stability units measured, 45 cached" in caplog.text
    )
    assert written() == before
    caplog.clear()
    assert run_bench.main([*argv, "--rank-by", "fgsm@2"]) == 0  # another ranking: the reports are made again
    assert re.search(r"reports: \d+ files under", caplog.text)
    assert written()[results / "leaderboard.md"] != before[results / "leaderboard.md"]
    (results / "REPORT.md").unlink()
    caplog.clear()
    assert run_bench.main([*argv, "--rank-by", "fgsm@2"]) == 0
    assert re.search(r"reports: \d+ files under", caplog.text) and (results / "REPORT.md").is_file()


@pytest.mark.slow
def test_killed_runs_resume_to_the_records_of_an_uninterrupted_run(mini_run, tmp_path):
    """SIGKILL a real run_bench.py at random moments (in training, evaluation or the report)
    up to four times, starting it again each time, then let it finish; its records must equal
    those of an uninterrupted run: the same cells, the same numbers, no duplicates."""
    command, reference = mini_run
    rng, kills, finished = random.Random(5), 0, None
    for _ in range(4):
        process = subprocess.Popen(
            [*command, "--results-dir", str(tmp_path / "killed")],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            finished = process.wait(timeout=rng.uniform(3.0, 9.0))  # the whole run takes ~15 s
            break
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
    if finished is None:  # a slow machine: finish without interruption
        finished = subprocess.run([*command, "--results-dir", str(tmp_path / "killed")], cwd=REPO).returncode
    assert finished == 0 and kills >= 2, (finished, kills)
    volatile = ["seconds", "timestamp"]
    ours = load_records(tmp_path / "killed", include_stale=True).drop(columns=volatile).sort_values(list(KEY))
    theirs = load_records(reference, include_stale=True).drop(columns=volatile).sort_values(list(KEY))
    assert len(theirs) == 2 * 26 + 26  # 2 seeds and their ensemble, 26 cells each (radius 2/255)
    assert ours.reset_index(drop=True).equals(theirs.reset_index(drop=True))
    for row in theirs.itertuples():
        key = {
            "seed": row.seed,
            "perturbation": row.perturbation,
            "eps_255": row.eps_255,
            "severity": row.severity,
        }
        assert np.array_equal(load_correct(tmp_path / "killed", **key), load_correct(reference, **key))
    # the stability stage, killed or not, records the same figures (its draws are seeded)
    ours, theirs = (
        load_stability(r).drop(columns=volatile).sort_values(list(STABILITY_KEY)).reset_index(drop=True)
        for r in (tmp_path / "killed", reference)
    )
    # per seed: 4 δ x 5 levels, 3 spectral norms, 1 square block's eigenvalue, the gradient; the ensemble's gradient
    assert len(theirs) == 2 * (4 * 5 + 3 + 1 + 1) + 1
    assert ours.drop(columns="values").equals(theirs.drop(columns="values"))
    assert all(np.array_equal(a, b) for a, b in zip(ours["values"], theirs["values"], strict=True))


def test_the_paper_plan_trains_table4s_variants_at_every_interval_and_refuses_the_relu_gate(caplog):
    """Table 4's selection needs every interval of its grid, each variant at the d that starts
    its coefficients there; In-ResNet-gating-110 is left out with one line, and naming it is
    one error line."""
    from bench.reports.tables import VARIANT_GRID
    from models import UserError

    with caplog.at_level("INFO", logger="bench.run.plan"):
        jobs = plan_jobs(SUITES["paper"], RunOptions(suite="paper"))
    for name in ("in-resnet-sig110", "in-resnet-gating-sig110"):
        inits = [j.lambda_init for j in jobs if j.name == name]
        assert inits == [model_entry(name).init_for(c) for c in VARIANT_GRID] and len(set(inits)) == 5
        assert all(j.radii_255 == (2.0,) and j.dataset == "cifar10" for j in jobs if j.name == name)
    assert inits[0] == (-6.0, pytest.approx(math.log(0.1 / 0.9)))  # the sigmoid's 0: He et al.'s bias
    assert [j.lambda_init for j in jobs if j.name == "in-resnet110" and j.radii_255 == (2.0,)][:1] == [
        (0.0, 0.1)
    ]
    assert "in-resnet-gating110" not in {j.name for j in jobs}
    lines = [r.message for r in caplog.records if "left out of the plan" in r.message]
    assert lines == [
        f"in-resnet-gating110 left out of the plan: {model_entry('in-resnet-gating110').refused} "
        "(docs/PROTOCOL.md, Table 4)"
    ]
    chosen = plan_jobs(
        SUITES["paper"], RunOptions(suite="paper", models="variants")
    )  # a group: left out, no error
    assert {j.name for j in chosen} == {"in-resnet-sig110", "in-resnet-gating-sig110"} and len(chosen) == 10
    with pytest.raises(
        UserError, match=r"^in-resnet-gating110 is not trained by the benchmark: its ReLU gate"
    ):
        plan_jobs(SUITES["paper"], RunOptions(suite="paper", models="resnet110,in-resnet-gating110"))
