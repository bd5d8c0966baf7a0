"""The main job's own paths and careless or hostile input: every mistake is one `error:`
line and exit 2, found before any work and recording nothing."""

import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import run_bench
from bench.core.files import atomic_write, temp_prefix, write_all
from bench.core.processes import LOCKS, run_lock
from bench.data.cifar import read_batch
from bench.data.noise_files import ensure_generated
from bench.eval.protocol import EvalConfig
from bench.records import sanity
from bench.records.checkpoints import read_meta
from bench.records.schema import COLUMNS
from bench.records.store import RecordStore
from bench.reports.leaderboard import leaderboard_texts
from bench.run import rates
from bench.run.options import RunOptions
from bench.run.plan import eval_config, plan_jobs
from bench.run.reaper import Reaper, descendants
from bench.run.suites import find_suite
from models import UserError

REPO = Path(__file__).resolve().parents[1]


def fails(argv: list[str], capsys) -> str:
    """The one error line of a refused run."""
    assert run_bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --- the paper suite on a machine without a GPU -----------------------------------------------


@pytest.mark.slow
def test_paper_suite_without_a_gpu_refuses_in_seconds_without_probing(tmp_path, capsys, monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("a model was probed for a refusal")

    monkeypatch.setattr(rates, "probe", no_probe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    began = time.perf_counter()
    line = fails(["--suite", "paper", "--results-dir", str(tmp_path / "r")], capsys)
    assert time.perf_counter() - began < 30  # 4 s on the 2-core CI machine, most of it imports
    assert line == (
        "error: suite 'paper' needs a GPU and none is visible: `--dry-run --device cpu` estimates its cost on "
        "this CPU; pass --device cpu to run it here anyway"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_run_and_the_dry_run_print_one_plan_header(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(rates, "probe", lambda *a, **k: rates.Rates(100.0, 300.0, 150.0, "stub"))
    common = [
        "--models",
        "resnet8",
        "--seeds",
        "0",
        "--n-test",
        "40",
        "--results-dir",
        str(tmp_path / "r"),
        "--data-dir",
        str(tmp_path / "d"),
        "--no-progress",
        "--stage",
        "eval",
    ]
    assert run_bench.main([*common, "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed == (
        "plan: suite smoke (the whole pipeline on synthetic data in minutes on a CPU: tiny ResNet / In-ResNet / "
        "λ-In-ResNet, 2 seeds, 2 epochs, a test subset, every perturbation at full step count), preset paper, "
        "device cpu; 1 job, 1 task (0 to train, 1 to evaluate, 0 ensembles); 40 test images"
    )
    caplog.set_level("INFO")
    assert run_bench.main(common) == 0  # no checkpoint: planning, data, then nothing
    said = [r.getMessage() for r in caplog.records]
    assert printed in said
    for phase in (
        "checking the builds of 1 planned checkpoints",
        "data: loading the synthetic test set",
        "data: the synthetic noise groups",
        "records: opening",
    ):
        assert any(m.startswith(phase) for m in said), phase
    assert said.index(printed) < min(i for i, m in enumerate(said) if m.startswith("data: loading"))


# --- test subsets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_test", "n_autoattack", "expected"),
    [(None, None, 1000), (200, None, 200), (200, 50, 50), (None, 300, 300)],
)
def test_no_smaller_subset_is_larger_than_the_test_subset(n_test, n_autoattack, expected):
    spec = find_suite("quick")
    options = RunOptions(suite="quick", n_test=n_test, n_autoattack=n_autoattack, device="cpu")
    config = eval_config(plan_jobs(spec, options)[0], spec, options, "cpu")
    assert config.n_test_of("autoattack") == expected
    assert config.n_test_of("pgd") == n_test
    with pytest.raises(
        UserError, match=r"subsets autoattack 1000: more than the 100 test images .* at most 100"
    ):
        EvalConfig(n_test=100, subsets=(("autoattack", 1000),))  # never shrunk in silence


@pytest.mark.slow
def test_the_autoattack_subset_is_in_the_plan(tmp_path, capsys):
    argv = [
        "--suite",
        "quick",
        "--device",
        "cpu",
        "--models",
        "resnet110",
        "--seeds",
        "0",
        "--n-test",
        "200",
        "--dry-run",
        "--assume-tflops",
        "50",
        "--results-dir",
        str(tmp_path),
        "--data-dir",
        str(tmp_path / "d"),
    ]
    assert run_bench.main(argv) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[0]
        .endswith(
            "; 200 test images, autoattack on 200 (the suite's 1000, capped at the 200 test images), stability on 200"
        )
    )
    assert run_bench.main([*argv, "--n-autoattack", "64", "--n-stability", "200"]) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[0]
        .endswith("; 200 test images, autoattack on 64, stability on 200")
    )
    assert (
        run_bench.main([*argv, "--n-stability", "32", "--stage", "train,eval"]) == 0
    )  # no stability stage: not said
    assert (
        capsys.readouterr()
        .out.splitlines()[0]
        .endswith("; 200 test images, autoattack on 200 (the suite's 1000, capped at the 200 test images)")
    )


# --- λ initialisation on models without λ -------------------------------------------------------


@pytest.mark.slow
def test_lambda_init_on_models_without_lambda(tmp_path, capsys, caplog):
    line = fails(["--models", "resnet8", "--lambda-init", "5,6", "--results-dir", str(tmp_path)], capsys)
    assert line == (
        "error: --lambda-init 5,6 sets λ's initialisation, and none of the models has a λ (resnet8): leave it "
        "out, or choose interpolated models (e.g. in-resnet*)"
    )
    caplog.set_level("INFO")
    jobs = plan_jobs(find_suite("smoke"), RunOptions(models="resnet8,in-resnet14", lambda_init=(0.5, 0.6)))
    assert {(j.name, j.lambda_init) for j in jobs} == {("resnet8", None), ("in-resnet14", (0.5, 0.6))}
    assert "--lambda-init 0.5,0.6 applies to the models with a λ; not to resnet8 (no λ)" in caplog.messages


# --- reliable only when checked -----------------------------------------------------------------


def gate_table(model: str, kind: str, gates: dict[str, float]) -> pd.DataFrame:
    entry = {
        "dataset": "cifar10",
        "model": model,
        "run": model,
        "lambda_low": np.nan,
        "lambda_high": np.nan,
        "kind": kind,
        "preset": "paper",
    }
    return pd.DataFrame(
        [{**entry, "gate": g, "value": v, "limit": 1.0, "detail": ""} for g, v in gates.items()]
    )


CRITICAL = [g for g, gate in sanity.GATES.items() if gate.critical]


@pytest.mark.parametrize(
    ("model", "kind", "measured", "verdict", "unchecked"),
    [
        (
            "resnet110",
            "single",
            [g for g in CRITICAL if g != "transfer"],
            False,
            "",
        ),  # no transfer for a ResNet
        ("in-resnet110", "single", [g for g in CRITICAL if g != "transfer"], pd.NA, "transfer"),
        ("in-resnet110", "single", CRITICAL, False, ""),
        ("in-resnet110", "ensemble", [g for g in CRITICAL if g != "transfer"], False, ""),
        (
            "grey",
            "single",
            ["iterative-vs-fgsm", "reference-gap"],
            pd.NA,
            "large-eps;noise-vs-pgd;nonfinite-gradients;randomized;probabilities;classes;dynamic",
        ),
    ],
)
def test_a_row_is_reliable_only_when_every_critical_gate_was_measured(
    model, kind, measured, verdict, unchecked
):
    table = sanity.summary(gate_table(model, kind, dict.fromkeys(measured, 0.0)))
    assert table.loc[0, "unchecked"] == unchecked
    assert table.loc[0, "unreliable"] is pd.NA if verdict is pd.NA else table.loc[0, "unreliable"] == verdict
    failed = sanity.summary(
        gate_table(model, kind, {"iterative-vs-fgsm": 5.0})
    )  # a failure needs nothing more
    assert failed.loc[0, "unreliable"] == True  # noqa: E712


def test_an_unchecked_row_is_empty_in_the_csv_and_null_in_json(tmp_path):
    board = pd.DataFrame(
        [
            {
                "rank": 1,
                "name": "grey",
                "model": "grey",
                "dataset": "cifar10",
                "data_source": "released",
                "preset": "paper",
                "n_test": 100,
                "seeds": 1,
                "clean": 70.0,
                "amplification": np.nan,
                "flags": "",
                "unchecked": "large-eps;dynamic",
                "unreliable": pd.NA,
                "checkpoints": ["ab"],
                "measured": {"clean": 70.0, "noise": 60.0},
                "kind": "single",
                "run": "grey",
                "lambda_low": np.nan,
                "lambda_high": np.nan,
            }
        ]
    )
    board["unreliable"] = board["unreliable"].astype("boolean")
    texts = leaderboard_texts(tmp_path, board, pd.DataFrame())
    assert texts[tmp_path / "leaderboard.csv"].splitlines()[1].endswith(",,large-eps;dynamic,")
    assert "| not checked (large-eps, dynamic) |" in texts[tmp_path / "leaderboard.md"]
    assert set(texts) == {tmp_path / "leaderboard.csv", tmp_path / "leaderboard.md"}  # no RobustBench file


# --- damaged records and metadata ---------------------------------------------------------------


def a_store(folder: Path) -> Path:
    row = {
        **dict.fromkeys(COLUMNS),
        "model": "resnet8",
        "run": "resnet8",
        "family": "preact-resnet",
        "dataset": "synthetic",
        "data_source": "synthetic",
        "data_sha256": "d" * 64,
        "seed": 0,
        "members": 1,
        "perturbation": "clean",
        "eps_255": 0.0,
        "severity": 0,
        "n": 10,
        "correct": 7,
        "accuracy": 0.7,
        "preset": "paper",
        "params": "{}",
        "checkpoint_sha256": "a" * 64,
        "torch_version": "2",
        "torchattacks_version": "3",
        "device": "cpu",
        "batch_size": 10,
        "seconds": 0.1,
        "timestamp": "2026-12-01T00:00:00+00:00",
    }
    store = RecordStore(folder)
    store.add_cells([row], [np.arange(10) < 7])
    store.add_run(
        {
            "model": "resnet8",
            "run": "resnet8",
            "dataset": "synthetic",
            "seed": 0,
            "lambda_low": None,
            "lambda_high": None,
            "status": "finished",
            "reason": "",
            "test_accuracy": 0.7,
            "checkpoint_sha256": "a" * 64,
            "timestamp": "2026-12-01T00:00:00+00:00",
        }
    )
    return store.path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ("UPDATE cells SET eps_255 = 'abc'", "cells row 1 holds eps_255 = 'abc', not a number in [0, 16320]"),
        ("UPDATE cells SET seed = NULL", "cells row 1 holds seed = NULL, not an integer"),
        (
            "UPDATE runs SET test_accuracy = 'abc'",
            "runs row 1 holds test_accuracy = 'abc', not a number in [0, 1] or NULL",
        ),
        (
            "UPDATE cells SET correct = 11",
            "cells row 1 (resnet8 synthetic seed 0, clean) holds correct = 11, not an integer in [0, n]",
        ),
        (
            "UPDATE cells SET correct_bits = x'00'",
            "cells row 1 (resnet8 synthetic seed 0, clean) holds correct_bits = 1 bytes, not n bits, packed",
        ),
        (
            "UPDATE cells SET accuracy = 0.9",
            "cells row 1 (resnet8 synthetic seed 0, clean) holds accuracy = 0.9, not a number in [0, 1] "
            "and equal to correct / n",
        ),
        (
            "UPDATE cells SET accuracy = 7.5",
            "cells row 1 (resnet8 synthetic seed 0, clean) holds accuracy = 7.5, not a number in [0, 1] "
            "and equal to correct / n",
        ),
        (
            "UPDATE cells SET n = -3",
            "cells row 1 (resnet8 synthetic seed 0, clean) holds n = -3, not an integer at least 1",
        ),
        (
            "UPDATE cells SET correct_bits = x'e000'",
            "cells row 1 (resnet8 synthetic seed 0, clean) holds correct_bits with 3 correct "
            "examples, not correct = 7",
        ),  # the right length, other bits: the worst case would read them
        (
            "UPDATE cells SET correct_bits = x'fe20'",
            "cells row 1 (resnet8 synthetic seed 0, clean) holds correct_bits with 8 correct "
            "examples, not correct = 7",
        ),  # a bit set past n
    ],
)
def test_a_hand_edited_store_row_is_one_line(tmp_path, capsys, edit, said):
    path = a_store(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute(edit)
    line = fails(["--stage", "report", "--results-dir", str(tmp_path)], capsys)
    assert line.startswith(f"error: records.sqlite has a damaged row: {said} (edited by hand?)")
    assert not (tmp_path / "REPORT.md").exists()


META = {
    "model": "resnet8",
    "sha256": "a" * 64,
    "status": "finished",
    "reason": "",
    "test_accuracy": 0.5,
    "model_kwargs": {"num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3, "lambda_init": [0.2, 0.25]},
}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"model_kwargs": []}, "model_kwargs must be an object, got []"),
        (
            {"model_kwargs": {**META["model_kwargs"], "num_classes": "ten"}},
            "model_kwargs.num_classes must be an integer",
        ),
        ({"model": 5}, "model must be a string, got 5"),
        ({"reason": ["a"]}, "reason must be a string, got ['a']"),
        ({"test_accuracy": "abc"}, "test_accuracy must be a number or null, got 'abc'"),
        ({"status": "done"}, "status must be one of finished, failed, running, got 'done'"),
        ({"sha256": "xyz"}, "sha256 must be 64 hex digits, got 'xyz'"),
    ],
)
def test_damaged_checkpoint_metadata_is_one_line(tmp_path, change, said):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({**META, **change}))
    with pytest.raises(
        UserError, match="^" + __import__("re").escape(f"{path} is not valid checkpoint metadata ({said}")
    ):
        read_meta(path)
    path.write_text(json.dumps(META))
    assert read_meta(path)["model"] == "resnet8"


# --- what stands where a file is written --------------------------------------------------------


def test_a_folder_where_a_file_is_written_is_one_line(tmp_path):
    (tmp_path / "REPORT.md").mkdir()
    with pytest.raises(UserError, match="a folder of that name is in its place"):
        atomic_write(tmp_path / "REPORT.md", lambda f: f.write(b"x"))
    with pytest.raises(UserError, match="a folder of that name is in its place"):
        write_all({tmp_path / "a.md": "a", tmp_path / "REPORT.md": "b"})
    assert not (tmp_path / "a.md").exists()  # refused before the first file is written
    (tmp_path / "tables").write_text("")
    with pytest.raises(UserError, match="tables is a file, not a folder"):
        write_all({tmp_path / "tables" / "table1.md": "t"})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_locks_that_cannot_be_taken_are_one_line(tmp_path, monkeypatch):
    (tmp_path / LOCKS).write_text("")
    with (
        pytest.raises(UserError, match=r"\.locks is a file, not a folder"),
        run_lock(tmp_path / LOCKS / "a.lock"),
    ):
        pass
    from bench.core import processes as checkpoints

    def denied(path, mode):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoints, "open", denied, raising=False)  # root ignores file modes: say it plainly
    with pytest.raises(UserError, match=r"cannot take the lock .*b\.lock \(Permission denied\)"):
        with run_lock(tmp_path / "locks" / "b.lock"):
            pass


@pytest.mark.slow
def test_a_results_dir_whose_locks_is_a_file_refuses_before_work(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LOCKS).write_text("")
    line = fails(
        [
            "--models",
            "resnet8",
            "--seeds",
            "0",
            "--results-dir",
            str(tmp_path / "r"),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capsys,
    )
    assert "is a file, not a folder" in line and not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
def test_a_checkpoint_folder_with_a_folder_for_its_metadata_refuses_before_training(tmp_path, capsys):
    meta = tmp_path / "r" / "checkpoints" / "synthetic" / "resnet8@smoke@n2048" / "seed0" / "meta.json"
    meta.mkdir(parents=True)
    line = fails(
        [
            "--models",
            "resnet8",
            "--seeds",
            "0",
            "--results-dir",
            str(tmp_path / "r"),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capsys,
    )
    assert all(
        p in line for p in (f"error: cannot write {meta}", "a folder of that name", "move it aside")
    ), line
    assert not (meta.parent / "weights.pt").exists() and not (tmp_path / "r" / "records.sqlite").exists()


def test_a_batch_file_that_is_not_a_dict_is_one_line(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(np.zeros((2, 3072), np.uint8)))
    with pytest.raises(
        UserError, match=r"is not a readable CIFAR batch \(TypeError: it holds a ndarray, not a dict"
    ):
        read_batch(path, "labels", 10)


def test_a_garbled_generation_record_means_generate_again(tmp_path):
    from bench.data.cifar import ImageSet

    test = ImageSet(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4) % 2, "synthetic", False)
    ensure_generated(tmp_path, test, seed=0)
    (tmp_path / "generated.json").write_text("{not json")
    ensure_generated(tmp_path, test, seed=0)
    assert json.loads((tmp_path / "generated.json").read_text())["seed"] == 0


# --- values out of any sensible range ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--batch-size", str(2**70)], f"--batch-size {2**70} is above its limit 65,536"),
        (["--workers", str(2**70)], f"--workers {2**70} is above its limit 1,024"),
        (["--landscape-points", str(2**70)], f"--landscape-points {2**70} is above its limit 501"),
        (["--landscape-points", "3000000"], "--landscape-points 3000000 is above its limit 501"),
        (["--landscape-radius", "1e308"], "--landscape-radius 1e+308 is above its limit 255"),
        (["--n-test", str(2**70)], f"--n-test {2**70}: is above its limit 10,000,000"),
        (["--n-autoattack", "0"], "--n-autoattack 0: must be positive"),
        (["--n-stability", "0"], "--n-stability must be positive, got 0"),
        (["--n-stability", str(2**70)], f"--n-stability {2**70} is above its limit 10,000,000"),
        (["--steps", str(10**5)], "--steps 100000 is above its limit 10,000"),
        (["--executor", "ray", "--ray-address", ""], "--ray-address '' is not a Ray address"),
        (
            ["--executor", "ray", "--ray-address", "host:notaport"],
            "--ray-address 'host:notaport' is not a Ray address",
        ),
        (
            ["--executor", "ray", "--ray-address", "host:70000"],
            "--ray-address 'host:70000' is not a Ray address",
        ),
    ],
)
def test_counts_and_addresses_out_of_range_are_one_line(tmp_path, capsys, argv, said):
    if "--executor" in argv:
        pytest.importorskip("ray")
    assert fails([*argv, "--results-dir", str(tmp_path / "r")], capsys).startswith(f"error: {said}")
    assert not (tmp_path / "r").exists()


def test_a_ray_address_where_nothing_listens_is_one_line_in_bounded_time():
    ray = pytest.importorskip("ray")
    from bench.run.executors import _join

    began = time.perf_counter()
    with pytest.raises(
        UserError, match=r"cannot reach a Ray cluster at 127\.0\.0\.1:1 \(Connection refused\)"
    ):
        _join(ray, "127.0.0.1:1")
    assert time.perf_counter() - began < 15


# --- what a killed process leaves ---------------------------------------------------------------


DRIVER = """
import subprocess, sys, time
from bench.run.reaper import Reaper, descendants
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
Reaper({p: t for p, t in descendants().items() if p == child.pid})
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc (Linux)")
def test_what_a_driver_started_dies_with_it_even_by_sigkill():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, cwd=REPO)
    child = int(driver.stdout.readline())
    assert child in descendants(driver.pid)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            os.waitpid(child, os.WNOHANG)  # not ours: it was the driver's
        except ChildProcessError:
            pass
    state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}").exists() else "gone"
    assert state in ("gone", "Z")  # killed (a zombie until init reaps it)


def test_a_reaper_closed_normally_kills_nothing_alive_that_it_was_not_given():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        Reaper({}).close()  # nothing listed: nothing started, nothing killed
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_a_write_left_half_done_by_a_killed_writer_is_rolled_back_by_the_next_run(tmp_path, capsys, caplog):
    """A hot journal: a dry run (which writes nothing) says how to recover, not "check its
    permissions"; the next run rolls it back and the records are as before the write."""
    path = a_store(tmp_path)
    killed = (
        "import os, sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.execute('PRAGMA cache_size = 2'); "
        "db.execute('BEGIN IMMEDIATE'); db.execute('DELETE FROM cells'); db.execute('CREATE TABLE filler (a TEXT)'); "
        "db.executemany('INSERT INTO filler VALUES (?)', [('x' * 500,)] * 2000); os._exit(9)"
    )
    # (a small cache spills the transaction's pages into the store: the journal is hot)
    assert subprocess.run([sys.executable, "-c", killed, str(path)]).returncode == 9
    journal = path.with_name(path.name + "-journal")
    assert journal.is_file()
    assert (
        run_bench.main(
            [
                "--dry-run",
                "--device",
                "cpu",
                "--results-dir",
                str(tmp_path),
                "--data-dir",
                str(tmp_path / "d"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {path}: an interrupted write is pending in records.sqlite-journal (a writer was killed in the middle of a "
        "transaction): run any stage once (not --dry-run) to recover it; nothing was lost"
    )
    caplog.set_level("INFO")
    run_bench.main(["--stage", "report", "--results-dir", str(tmp_path)])
    assert f"records: rolled back a write to {path} that a killed process left unfinished" in caplog.messages
    assert not journal.exists()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM cells").fetchone() == (1,) and db.execute(
            "SELECT count(*) FROM runs"
        ).fetchone() == (1,)
        assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'filler'").fetchall()


@pytest.mark.slow
def test_the_report_stage_removes_what_a_killed_report_left(tmp_path, capsys):
    a_store(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / (temp_prefix("REPORT.md").replace(str(os.getpid()), str(dead.pid)) + "x.tmp")
    left.write_text("half a report")
    run_bench.main(["--stage", "report", "--results-dir", str(tmp_path)])
    capsys.readouterr()
    assert not left.exists()
    shutil.rmtree(tmp_path / "figures", ignore_errors=True)


# --- round four: replaced checkpoints, stability values, odd options, refused runs, defenses ----


def cached_copy(mini_run, tmp_path: Path) -> tuple[list[str], Path]:
    """A copy of the mini run's finished results dir, and the argv that finds all of it cached."""
    command, reference = mini_run
    results = tmp_path / "results"
    shutil.copytree(reference, results)
    return [*command[2:], "--no-progress", "--results-dir", str(results)], results


def stamp(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.slow
def test_a_cached_rerun_leaves_the_store_as_it_was(mini_run, tmp_path, caplog):
    argv, results = cached_copy(mini_run, tmp_path)
    before = stamp(results / "records.sqlite")
    with caplog.at_level("INFO"):
        assert run_bench.main(argv) == 0
    assert "0 cells evaluated" in caplog.text
    assert stamp(results / "records.sqlite") == before


class Planted:
    """A pickle that would create `path` when loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.slow
@pytest.mark.parametrize("replacement", ["other-seed", "pickle"])
def test_a_replaced_checkpoint_is_refused_and_its_cells_never_reported(
    mini_run, tmp_path, capsys, replacement
):
    argv, results = cached_copy(mini_run, tmp_path)
    folder = results / "checkpoints" / "synthetic" / "resnet8@smoke@n1024"
    weights = folder / "seed0" / "weights.pt"
    if replacement == "other-seed":
        shutil.copyfile(folder / "seed1" / "weights.pt", weights)
    else:
        weights.write_bytes(pickle.dumps(Planted(tmp_path / "ran")))
    before = stamp(results / "records.sqlite")
    line = fails(argv, capsys)
    assert line.startswith(f"error: {weights} is not the checkpoint its meta.json names (sha256 ")
    assert line.endswith(
        f"it was replaced or damaged since training; restore it, or delete {folder / 'seed0'} to "
        "train it again"
    )
    assert stamp(results / "records.sqlite") == before and not (tmp_path / "ran").exists()
    assert run_bench.main(["--stage", "report", "--no-figures", "--results-dir", str(results)]) == 0
    report = (results / "REPORT.md").read_text()
    assert "records of replaced or retrained checkpoints are not reported" in report
    assert "resnet8@smoke@n1024 synthetic seed 0" not in (results / "tables" / "table3.md").read_text()
    assert not (tmp_path / "ran").exists()


def tamper_stability(results: Path, quantity: str, change) -> int:
    """Apply `change` to the per-image values (and, given back, the mean and median) of one
    row of `quantity`; returns its rowid."""
    with sqlite3.connect(results / "records.sqlite") as db:
        rowid, packed, mean, median = db.execute(
            "SELECT rowid, per_image, mean, median FROM stability WHERE quantity = ? ORDER BY rowid LIMIT 1",
            [quantity],
        ).fetchone()
        values, mean, median = change(np.frombuffer(packed, dtype="<f4"), mean, median)
        db.execute(
            "UPDATE stability SET per_image = ?, mean = ?, median = ? WHERE rowid = ?",
            [values.astype("<f4").tobytes(), mean, median, rowid],
        )
    return rowid


@pytest.mark.slow
@pytest.mark.parametrize(
    ("quantity", "change", "said"),
    [
        ("spectral_norm", lambda v, m, d: (v * 1000, m, d), "holds mean = "),
        (
            "growth",
            lambda v, m, d: (-v, float(np.mean(-v)), float(np.median(-v))),
            "holds a per-image growth of -",
        ),
        ("input_gradient", lambda v, m, d: (v, m, d + 1), "holds median = "),
    ],
)
def test_tampered_stability_values_are_refused(mini_run, tmp_path, capsys, quantity, change, said):
    _, results = cached_copy(mini_run, tmp_path)
    rowid = tamper_stability(results, quantity, change)
    line = fails(["--stage", "report", "--results-dir", str(results)], capsys)
    assert line.startswith(
        f"error: records.sqlite has a damaged row: stability row {rowid} (resnet8@smoke@n1024 synthetic "
    )
    assert said in line and "DELETE FROM stability WHERE run = 'resnet8@smoke@n1024'" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--radii=-0"], ("error: --radii -0", "-0 is not a radius", "give 0")),
        (["--radii", "0,-0"], ("error: --radii 0,-0", "-0 is not a radius", "give 0")),
        (["--radii", "1,1"], ("error: --radii 1,1", "1 given twice", "give each radius once")),
        (["--radii", "2,2.0"], ("error: --radii 2,2", "2 given twice", "give each radius once")),
        (
            ["--radii", "1,,2"],
            ("error: --radii '1,,2' has an empty item", "give comma-separated numbers, e.g. 1,2,4"),
        ),
        (
            ["--radii", ",2"],
            ("error: --radii ',2' has an empty item", "give comma-separated numbers, e.g. 1,2,4"),
        ),
        (["--radii", ","], ("error: --radii is empty", "give a comma-separated list")),
        (
            ["--n-test", "20", "--n-autoattack", "50"],
            ("error: --n-autoattack 50:", "the 20 test images", "at most 20"),
        ),
        (
            ["--n-test", "20", "--n-stability", "50"],
            ("error: --n-stability 50:", "the 20 test images", "at most 20"),
        ),
        (["--n-stability", "500"], ("error: --n-stability 500:", "the 100 test images", "at most 100")),
    ],
)
def test_odd_radii_and_subsets_larger_than_their_test_images_are_one_line(tmp_path, capsys, argv, said):
    """The line names the option, its value and the fix (a subset: the test images it is
    drawn from, the suite's where --n-test is not given)."""
    out = fails(
        [*argv, "--dry-run", "--results-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d")], capsys
    )
    assert all(part in out for part in said), out
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "blocked",
    ["REPORT.md", "leaderboard.csv", "tables/table1.csv", "records.csv", "sanity.md", "figures/fig.png"],
)
def test_a_refused_run_writes_nothing(mini_run, tmp_path, capsys, blocked):
    """A folder where an output of the report goes: one line before any work, and the run
    that had cells to measure (its store deleted) neither creates a store nor records one."""
    argv, results = cached_copy(mini_run, tmp_path)
    (results / "records.sqlite").unlink()
    shutil.rmtree(results / "figures", ignore_errors=True)
    (results / blocked).unlink(missing_ok=True)
    (results / blocked).mkdir(parents=True)
    line = fails(argv, capsys)
    if blocked.startswith(("tables/", "figures/")):
        name = blocked.split("/")[0]
        what = "the figures" if name == "figures" else "the report"
        parts = (
            f"error: cannot write {what} to {results / name}",
            f"{results / blocked} is a folder",
            "move it aside",
        )
    else:
        parts = (
            f"error: cannot write {results / blocked}",
            "a folder of that name is in its place",
            "move it aside",
        )
    assert all(p in line for p in parts), line
    assert not (results / "records.sqlite").exists()


DEFENSE_MODULE = """
import os, sys
from torch import nn
MODE = {mode!r}
if MODE == "import-exit0":
    sys.exit(0)
if MODE == "import-os-exit":
    os._exit(0)
def Net():
    if MODE == "factory-exit3":
        sys.exit(3)
    if MODE == "factory-interrupt":
        raise KeyboardInterrupt
    if MODE == "factory-os-exit":
        os._exit(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "said"),
    [
        (
            "import-exit0",
            ("importing {module} called sys.exit(0)", "a defense must not end the run; remove the call"),
        ),
        (
            "import-os-exit",
            ("importing {module} called os._exit(0)", "a defense must not end the process; remove the call"),
        ),
        ("factory-exit3", ("Net() called sys.exit(3)", "a defense must not end the run; remove the call")),
        ("factory-interrupt", ("Net() raised KeyboardInterrupt", "a defense must not interrupt the run")),
        (
            "factory-os-exit",
            ("Net() called os._exit(0)", "a defense must not end the process; remove the call"),
        ),
    ],
)
def test_a_defense_that_exits_or_interrupts_is_one_line_and_nothing_recorded(trained, tmp_path, mode, said):
    """In a process of its own: before the guard, os._exit(0) ended the harness with exit 0."""
    module = tmp_path / "exits.py"
    module.write_text(DEFENSE_MODULE.format(mode=mode))
    torch.save(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).state_dict(),
        tmp_path / "w.pt",
    )
    run = subprocess.run(
        [
            sys.executable,
            "run_bench.py",
            "--suite",
            "smoke",
            "--defense",
            f"{module}:Net",
            "--weights",
            str(tmp_path / "w.pt"),
            "--dataset",
            "synthetic",
            "--no-progress",
            "--results-dir",
            str(tmp_path / "r"),
            "--data-dir",
            str(trained / "data"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stderr[-1000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --defense {module}:Net: "), last
    assert all(part.format(module=module) in last for part in said), last
    assert not (tmp_path / "r" / "records.sqlite").exists()


@pytest.mark.slow
def test_an_empty_defense_name_is_refused(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    line = fails(
        [
            "--state-dict",
            "resnet8",
            str(tmp_path / "w.pt"),
            "--name",
            "",
            "--dataset",
            "synthetic",
            "--results-dir",
            str(tmp_path / "r"),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capsys,
    )
    assert line == (
        f"error: --state-dict resnet8 {tmp_path / 'w.pt'}: defense name '' must be 1-100 letters, digits "
        "or . _ @ + - (starting with a letter or digit): give another with --name"
    )


def small_cifar(root: Path, test_images: int = 5) -> Path:
    """A CIFAR-10 data dir of 10 training images per batch and `test_images` test images."""
    from bench.data.cifar import write_batch

    folder = root / "cifar-10-batches-py"
    images, labels = np.zeros((10, 32, 32, 3), np.uint8), np.arange(10)
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", images, labels)
    write_batch(folder / "test_batch", images[:test_images], labels[:test_images])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("dry", [True, False])
def test_the_dry_run_checks_the_data_as_the_run_does(tmp_path, capsys, dry):
    data = small_cifar(tmp_path / "d")
    argv = [
        "--models",
        "resnet8",
        "--datasets",
        "cifar10",
        "--seeds",
        "0",
        "--n-train",
        "10",
        "--radii",
        "2",
        "--results-dir",
        str(tmp_path / "r"),
        "--data-dir",
        str(data),
        *(["--dry-run"] if dry else []),
    ]
    assert fails([*argv, "--n-test", "20"], capsys) == (
        f"error: --n-test 20 is more than the 5 test images of cifar10 in {data}: give at most 5, or leave --n-test "
        "out to test on all"
    )
    test_batch = data / "cifar-10-batches-py" / "test_batch"
    test_batch.unlink()
    test_batch.mkdir()
    assert fails(argv, capsys) == (
        f"error: cifar10: {test_batch} is a folder, not the data set's file test_batch: move it aside and run again"
    )
    assert not (tmp_path / "r").exists()
