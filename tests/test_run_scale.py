"""Scale-out: the plan graph, the estimate, and executors with several workers and faults."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import run_bench
from bench.core.environment import device_name
from bench.data import splits
from bench.data.cifar import write_batch
from bench.data.splits import TrainingSets, load_train
from bench.data.synthetic import make_synthetic
from bench.eval.protocol import protocol_cells
from bench.records.load import load_checks, load_correct, load_records
from bench.records.schema import COLUMNS, KEY
from bench.records.store import RecordStore
from bench.run.estimate import plan_header, wall_time
from bench.run.options import RunOptions
from bench.run.plan import (
    ENSEMBLE,
    MEASURE,
    TRAIN,
    Resources,
    Task,
    eval_config,
    plan_jobs,
    plan_tasks,
    stability_config,
)
from bench.run.rates import flop_rates, recorded_rates
from bench.run.suites import SUITES
from bench.run.work import checkpoint_files, place_files

REPO = Path(__file__).resolve().parents[1]


def test_the_paper_suite_is_a_graph_of_tasks_with_the_expected_counts():
    spec, options = SUITES["paper"], RunOptions(suite="paper")
    jobs = plan_jobs(spec, options)
    tasks = plan_tasks(jobs, spec, options, "cuda")
    kinds = Counter(t.kind for t in tasks)
    # training runs: Tables 1-3 (9 models x 2 data sets), Table 4 (2 variants x 5 intervals: the
    # ReLU gate is refused), Table 5 (8 more λ initialisations), 5 seeds each; one measurement
    # per run; Table 6's 6 ensembles
    assert kinds == {TRAIN: (18 + 10 + 8) * 5, MEASURE: 180, ENSEMBLE: 6}
    assert len({t.name for t in tasks}) == len(tasks)
    cells = {
        t.name: len(protocol_cells(eval_config(t.job, spec, options, "cuda", t.kind == ENSEMBLE)))
        for t in tasks
        if t.kind != TRAIN
    }
    main = [t for t in tasks if t.kind == MEASURE and t.job.radii_255 == (1.0, 2.0, 4.0)]
    assert len(main) == 90 and {cells[t.name] for t in main} == {
        36
    }  # clean, 20 noise, 3 x 4 attacks, PGD-50 x 2, AA
    assert sum(cells.values()) == 90 * 36 + (50 + 40) * 28 + 6 * 30  # an ensemble: 28 and PGD-50 at 16, 64
    for task in (
        t for t in tasks if t.kind == ENSEMBLE
    ):  # its large-eps gate can pass: on the AutoAttack subset
        config = eval_config(task.job, spec, options, "cuda", True)
        assert (
            dict(config.extra)["pgd50"] == (16.0, 64.0)
            and config.n_test_of("pgd50") == config.n_test_of("autoattack") == 1000
        )
    fewer = RunOptions(suite="paper", n_autoattack=200)
    assert (
        eval_config(next(t for t in tasks if t.kind == ENSEMBLE).job, spec, fewer, "cuda", True).n_test_of(
            "pgd50"
        )
        == 200
    )
    single = next(t for t in tasks if t.kind == MEASURE)
    assert (
        eval_config(single.job, spec, options, "cuda").n_test_of("pgd50") is None
    )  # single models: every image
    order = [t.name for t in tasks]
    for task in tasks:
        assert all(order.index(a) < order.index(task.name) for a in task.after)
        if task.kind == MEASURE:
            assert task.after == (f"train {task.job.dataset} {task.run_tag} seed{task.seed}",)
        if task.kind == ENSEMBLE:  # waits for every seed's training
            assert task.after == tuple(f"train cifar10 {task.run_tag} seed{s}" for s in range(5))
    assert {t.resources for t in tasks} == {Resources(1.0, 4, 8.0)}
    smoke = SUITES["smoke"]
    assert {t.resources for t in plan_tasks(plan_jobs(smoke, RunOptions()), smoke, RunOptions(), "cpu")} == {
        Resources(0.0, 1, 2.0)
    }
    evaluate_only = RunOptions(suite="paper", stages=("eval",))
    alone = plan_tasks(jobs, spec, evaluate_only, "cuda")
    assert not any(t.kind == TRAIN or t.after for t in alone) and len(alone) == 186


def test_wall_time_follows_the_graph_and_the_worker_count():
    suite, options = SUITES["smoke"], RunOptions(models="resnet8")
    job = plan_jobs(suite, options)[0]
    r = Resources(0, 1, 1)
    configs = (eval_config(job, suite, options, "cpu"), stability_config(suite, options))
    tasks = [
        Task(TRAIN, job, "a", (0,), (), r, *configs),
        Task(TRAIN, job, "a", (1,), (), r, *configs),
        Task(MEASURE, job, "a", (0,), ("train synthetic a seed0",), r, *configs),
        Task(MEASURE, job, "a", (1,), ("train synthetic a seed1",), r, *configs),
        Task(ENSEMBLE, job, "a", (0, 1), ("train synthetic a seed0", "train synthetic a seed1"), r, *configs),
    ]
    seconds = dict(zip([t.name for t in tasks], [10.0, 30.0, 5.0, 5.0, 20.0], strict=True))
    assert wall_time(tasks, seconds, 1) == 70.0
    assert wall_time(tasks, seconds, 2) == 50.0  # the ensemble waits for the 30 s training
    assert wall_time(tasks, seconds, 16) == 50.0
    free = [Task(TRAIN, job, "b", (s,), (), r, *configs) for s in range(3)]
    assert [wall_time(free, dict.fromkeys([t.name for t in free], 10.0), n) for n in (1, 2, 3)] == [
        30.0,
        20.0,
        10.0,
    ]


def test_the_estimate_counts_the_data_dirs_training_images(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    images = np.zeros((11, 32, 32, 3), np.uint8)
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", images[: 6 + i], np.arange(6 + i) % 10)
    write_batch(folder / "test_batch", images[:10], np.arange(10))
    reads = []
    monkeypatch.setattr(splits, "load_train", lambda *a: reads.append(a) or load_train(*a))
    sets = TrainingSets(tmp_path)
    assert sets.per_epoch("cifar10", None) == 7 + 8 + 9 + 10 + 11
    assert sets.per_epoch("cifar10", 20) == 20
    assert len(reads) == 1  # every training task of the estimate asks: the files are read once
    assert (
        TrainingSets(tmp_path / "elsewhere").per_epoch("cifar10", None) == 50_000
    )  # not there yet: the release's
    assert not (tmp_path / "elsewhere").exists()


def test_the_estimate_uses_recorded_seconds_once_a_run_has_finished(tmp_path):
    results = tmp_path / "results"
    assert recorded_rates("resnet8", "cpu", results) is None
    folder = results / "checkpoints" / "synthetic" / "resnet8" / "seed0"
    folder.mkdir(parents=True)
    meta = {
        "model": "resnet8",
        "sha256": "ab" * 32,
        "model_kwargs": {},
        "status": "finished",
        "epochs_done": 2,
        "data": {"images": 1000},
        "wall_seconds": 10.0,
        "device": device_name("cpu"),
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    base = {
        **dict.fromkeys(COLUMNS),
        "model": "resnet8",
        "run": "resnet8",
        "family": "preact-resnet",
        "dataset": "synthetic",
        "data_source": "synthetic",
        "data_sha256": "d" * 64,
        "seed": 0,
        "members": 1,
        "severity": 0,
        "n": 100,
        "correct": 50,
        "accuracy": 0.5,
        "preset": "paper",
        "checkpoint_sha256": "ab" * 32,
        "device": device_name("cpu"),
        "timestamp": "2026-11-27T00:00:00+00:00",
        "batch_size": 256,
    }
    rows = [
        {**base, "perturbation": "clean", "eps_255": 0.0, "params": "{}", "seconds": 0.5},
        {
            **base,
            "perturbation": "pgd",
            "eps_255": 2.0,
            "params": '{"alpha_255":2.0,"steps":20}',
            "seconds": 10.5,
        },
        # any iterative attack's steps count (the registry's Iterative): 50 steps of 100 images at 400/s
        {
            **base,
            "perturbation": "pgd50",
            "eps_255": 16.0,
            "params": '{"alpha_255":0.8,"steps":50}',
            "seconds": 13.0,
        },
    ]
    RecordStore(results).add_cells(rows, [np.ones(100, bool)] * 3)
    rates = recorded_rates("resnet8", "cpu", results)
    assert (rates.train, rates.forward, round(rates.gradient, 6)) == (
        200.0,
        200.0,
        300.0,
    )  # the median of 200, 400
    assert rates.source == "recorded (1 runs, 3 cells)"
    assert recorded_rates("resnet14", "cpu", results) is None  # another model: probed
    flops = flop_rates("resnet110", 10.0)
    assert flops.forward == pytest.approx(10e12 / 0.51e9, rel=0.02) and flops.train == pytest.approx(
        flops.forward / 3
    )


@pytest.mark.slow
def test_a_paper_dry_run_under_the_june_preset_lists_each_ensembles_gate_cells_and_tags_its_runs(
    tmp_path, capsys
):
    """`--preset release-2020-06` is accepted; each row is its run's tag (the checkpoints'
    and records' name) and each of Table 6's six ensembles lists its PGD-50 cells."""
    assert (
        run_bench.main(
            [
                "--suite",
                "paper",
                "--preset",
                "release-2020-06",
                "--device",
                "cuda",
                "--assume-tflops",
                "10",
                "--dry-run",
                "--no-progress",
                "--results-dir",
                str(tmp_path / "r"),
                "--data-dir",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and not line.startswith("| run ")
    ]
    assert len(rows) == 36 and all(row[0].split("@")[1] == "release-2020-06" for row in rows)
    ensembles = {row[0] for row in rows if row[3]}
    assert ensembles == {
        f"{m}@release-2020-06"
        for m in (
            "resnet110",
            "in-resnet110",
            "lambda-in-resnet110",
            "resnet164",
            "in-resnet164",
            "lambda-in-resnet164",
        )
    }
    assert {row[3] for row in rows if row[3]} == {"30 cells (PGD-50 at 16, 64/255 on 1000 images)"}
    assert "in-resnet110@release-2020-06@lambda0.3-0.4" in {row[0] for row in rows}


@pytest.mark.slow
def test_a_dry_run_finds_exactly_the_cells_the_run_finds_cached(tmp_path, capsys, caplog):
    """On a CIFAR-10-format folder (unofficial files: the synthetic set) of 2,000 test
    images: after a run with --n-test 50, a dry run with --n-test 50 says all cached; with
    --n-test 100 none is, and the run then computes exactly what the plan said."""
    make_synthetic(tmp_path / "data" / "cifar-10-batches-py")
    results = tmp_path / "results"
    base = [
        "--models",
        "resnet8",
        "--datasets",
        "cifar10",
        "--seeds",
        "0",
        "--n-train",
        "1024",
        "--radii",
        "2",
        "--steps",
        "2",
        "--stage",
        "train,eval",
        "--no-progress",
        "--results-dir",
        str(results),
        "--data-dir",
        str(tmp_path / "data"),
    ]
    assert run_bench.main([*base, "--n-test", "50"]) == 0
    capsys.readouterr()
    assert run_bench.main([*base, "--n-test", "50", "--dry-run"]) == 0
    assert "total: 0 checkpoints to train, 0 cells to run, 26 cached" in capsys.readouterr().out
    assert run_bench.main([*base, "--n-test", "100", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "total: 0 checkpoints to train, 26 cells to run, 0 cached" in out
    assert re.search(r"throughput: resnet8: recorded \(1 runs, 26 cells\)", out), out
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert run_bench.main([*base, "--n-test", "100"]) == 0
    assert re.search(r"done in \d+ s: 26 cells evaluated, 0 cached", caplog.text), caplog.text


def test_checkpoints_travel_to_a_results_dir_that_is_not_shared(tmp_path):
    folder = tmp_path / "a" / "checkpoints" / "cifar10" / "resnet8" / "seed0"
    folder.mkdir(parents=True)
    (folder / "weights.pt").write_bytes(b"weights")
    (folder / "meta.json").write_text(
        json.dumps({"model": "resnet8", "sha256": "cd" * 32, "model_kwargs": {}})
    )
    files = {"checkpoints/cifar10/resnet8/seed0": checkpoint_files(folder)}
    place_files(str(tmp_path / "b"), files)
    placed = tmp_path / "b" / "checkpoints" / "cifar10" / "resnet8" / "seed0"
    assert (placed / "weights.pt").read_bytes() == b"weights" and (placed / "meta.json").is_file()
    before = (placed / "weights.pt").stat().st_mtime_ns
    place_files(str(tmp_path / "b"), files)  # the same checkpoint: left alone
    assert (placed / "weights.pt").stat().st_mtime_ns == before


@pytest.mark.slow
def test_executor_options_are_checked(capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a)
    )
    for argv, message in [
        (["--executor", "ray"], "error: --executor ray needs Ray: pip install -e '.[cluster]'\n"),
        (["--workers", "0"], "error: --workers must be positive, got 0\n"),
        (["--ray-address", "auto"], "error: --ray-address needs --executor ray\n"),
        (["--assume-tflops", "-1"], "error: --assume-tflops must be a positive number, got -1\n"),
    ]:
        assert run_bench.main(argv) == 2
        assert capsys.readouterr().err == message


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _same_records(ours: Path, theirs: Path) -> None:
    volatile = ["seconds", "timestamp"]
    a = (
        load_records(ours, include_stale=True)
        .drop(columns=volatile)
        .sort_values(list(KEY))
        .reset_index(drop=True)
    )
    b = (
        load_records(theirs, include_stale=True)
        .drop(columns=volatile)
        .sort_values(list(KEY))
        .reset_index(drop=True)
    )
    assert len(a) == len(b) and not a.duplicated(list(KEY)).any()
    assert a.equals(b)
    for row in b.itertuples():
        key = {
            "run": row.run,
            "seed": row.seed,
            "perturbation": row.perturbation,
            "eps_255": row.eps_255,
            "severity": row.severity,
        }
        assert np.array_equal(load_correct(ours, **key), load_correct(theirs, **key)), key


def _run_and_kill(command: list[str], find_worker, find_within: float = 150) -> tuple[str, int | None]:
    """Run `command`; once a worker is busy, SIGKILL it (once); returns stderr and the pid."""
    run = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.monotonic() + find_within, None
    while killed is None and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.5)
        killed = find_worker(run.pid)
        if killed is not None:
            os.kill(killed, signal.SIGKILL)
    _, err = run.communicate()  # no timeout: CI's bounds the whole run
    assert run.returncode == 0, err[-3000:]
    return err, killed


@pytest.mark.slow
def test_local_workers_give_the_sequential_records_even_when_one_is_killed(mini_run, tmp_path):
    """Two worker processes evaluate the reference's checkpoints; one is SIGKILLed mid-run:
    its task is retried, and the records equal those of one process, bit for bit.
    (Training in workers: the Ray test below.)"""
    command, reference = mini_run
    results = tmp_path / "results"
    shutil.copytree(reference / "checkpoints", results / "checkpoints")

    def busy_worker(pid: int) -> int | None:
        workers = _children(pid)
        return max(workers) if len(workers) >= 2 and (results / "records.sqlite").exists() else None

    err, killed = _run_and_kill(
        [*command, "--results-dir", str(results), "--workers", "2", "--stage", "eval"], busy_worker
    )
    assert killed is not None and re.search(r"exited with code -9; trying again \(attempt 2 of 3\)", err), (
        err[-3000:]
    )
    _same_records(results, reference)


def _ray_worker(_: int) -> int | None:
    found = subprocess.run(["pgrep", "-f", "ray::_ray_task"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


@pytest.mark.slow
def test_ray_with_two_workers_gives_the_sequential_records_even_when_one_dies(mini_run, tmp_path):
    pytest.importorskip("ray")
    command, reference = mini_run
    results = tmp_path / "results"
    run = [
        *command,
        "--results-dir",
        str(results),
        "--executor",
        "ray",
        "--workers",
        "2",
        "--stage",
        "train,eval,check",
    ]
    err, killed = _run_and_kill(run, _ray_worker)
    assert killed is not None and "trying again (attempt 2 of 3)" in err, err[-3000:]
    _same_records(results, reference)
    columns = ["run", "seed", "members", "check", "value", "passed"]
    ours = load_checks(results)[columns].sort_values(columns[:4]).reset_index(drop=True)
    assert len(ours) == 3 * 6 and ours.equals(
        load_checks(reference)[columns].sort_values(columns[:4]).reset_index(drop=True)
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("INRES_BENCH_FULL_TESTS"), reason="minutes of training: INRES_BENCH_FULL_TESTS=1"
)
def test_the_smoke_suite_on_ray_gives_the_sequential_records_even_when_a_worker_dies(smoke_run, tmp_path):
    pytest.importorskip("ray")
    results, sequential = smoke_run
    assert sequential.returncode == 0
    ours = tmp_path / "results"
    command = [
        sys.executable,
        "run_bench.py",
        "--executor",
        "ray",
        "--workers",
        "2",
        "--no-progress",
        "--stage",
        "train,eval,check",
        "--results-dir",
        str(ours),
        "--data-dir",
        str(results.parent / "data"),
    ]
    err, killed = _run_and_kill(command, _ray_worker, find_within=600)
    assert killed is not None and "trying again (attempt 2 of 3)" in err, err[-3000:]
    _same_records(ours, results)
    columns = ["run", "seed", "members", "check", "value", "passed"]
    mine = load_checks(ours)[columns].sort_values(columns[:4]).reset_index(drop=True)
    assert mine.equals(load_checks(results)[columns].sort_values(columns[:4]).reset_index(drop=True))


def _listening(pids: set[int]) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets in LISTEN
    state that `pids` hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # gone meanwhile, or not ours to read
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


LOOPBACK = {
    "0100007F",
    "0000000000000000FFFF00000100007F",
    "00000000000000000000000001000000",
}  # 127.0.0.1, ::ffff:127.0.0.1, ::1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads /proc/net (Linux)")
def test_a_local_ray_is_reachable_from_this_machine_only():
    """Before: Ray swapped 127.0.0.1 for the machine's outward address and its GCS, raylet and
    workers listened on every interface (docs/SCALING.md said otherwise)."""
    ray = pytest.importorskip("ray")
    from bench.run.executors import RayExecutor
    from bench.run.plan import Resources
    from bench.run.reaper import descendants

    before = set(descendants())
    executor = RayExecutor(None, 1, Resources(gpus=0, cpus=1, memory_gib=1), 0)
    try:
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        listening = _listening(set(descendants()) - before)
        assert listening and set(listening) <= LOOPBACK, listening
    finally:
        executor.close()
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # undone after the start


def test_the_plan_header_calls_only_the_suites_own_subset_capped():
    """--n-autoattack equal to --n-test is the user's size, not the suite's 1,000 capped."""
    suite = SUITES["paper"]
    for n_autoattack, said in (
        (None, "autoattack on 50 (the suite's 1000, capped at the 50 test images)"),
        (50, "autoattack on 50, "),
    ):
        options = RunOptions(models="resnet110", datasets=("cifar10",), n_test=50, n_autoattack=n_autoattack)
        header = plan_header(
            suite, options, "cuda", plan_tasks(plan_jobs(suite, options), suite, options, "cuda")
        )
        assert said in header, header
