"""What a user can get wrong, through the command line: reports never mix unlike cells or
show replaced checkpoints, every bad input is one error line before any work, corrupt
stores are refused and left as they are, several processes share the work."""

import hashlib
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import run_bench
from bench.data import splits
from bench.data.cifar import read_batch, write_batch
from bench.data.datasets import DATASETS
from bench.data.splits import load_train
from bench.records import sql
from bench.records import store as records
from bench.records.load import load_checks, load_records, load_runs
from bench.records.schema import DB_FILE
from models import UserError

REPO = Path(__file__).resolve().parents[1]
RUN = "resnet8@smoke@n1024"
# cells of a seed: clean, 4 noise groups x 5, FGSM / IFGSM / PGD / uniform noise x 3 radii, APGD-CE lite
SINGLE, ENSEMBLE = (
    1 + 20 + 4 * 3 + 1,
    1 + 20 + 3 + 3 * 1 + 1,
)  # an ensemble: FGSM at 3 radii, the rest at 2/255
BASE_CELLS = 2 * SINGLE + ENSEMBLE
BASE = [
    "--models",
    "resnet8",
    "--n-train",
    "1024",
    "--n-test",
    "50",
    "--steps",
    "5",
    "--no-progress",
    "--no-figures",
]


def cli(capsys, results: Path, data: Path, *args: str) -> tuple[int, str]:
    """run_bench.py in this process: (exit code, what it wrote to stderr besides logging)."""
    capsys.readouterr()
    code = run_bench.main([*BASE, "--results-dir", str(results), "--data-dir", str(data), *args])
    return code, capsys.readouterr().err


def state(results: Path) -> tuple:
    """Everything a run may have written that matters: the cells (stale ones too), the
    runs, and every checkpoint's metadata."""
    store = results / DB_FILE
    cells = len(load_records(results, include_stale=True)) if store.is_file() else 0
    metas = sorted((str(p), p.read_bytes()) for p in results.glob("checkpoints/**/meta.json"))
    return cells, len(load_runs(results)) if store.is_file() else 0, metas


@pytest.fixture(scope="module")
def base(trained, tmp_path_factory):
    """resnet8, seeds 0 and 1 (the `trained` checkpoints) and their ensemble, 50 test
    images, 5-step attacks, no figures."""
    root = tmp_path_factory.mktemp("integrity")
    shutil.copytree(trained / "data", root / "data")
    shutil.copytree(trained / "results" / "checkpoints", root / "base" / "checkpoints")
    code = run_bench.main(
        [*BASE, "--seeds", "0,1", "--results-dir", str(root / "base"), "--data-dir", str(root / "data")]
    )
    assert code == 0
    return root


@pytest.fixture
def results(base, tmp_path) -> Path:
    """A copy of the base run's results to change."""
    return Path(shutil.copytree(base / "base", tmp_path / "results"))


def board(results: Path) -> pd.DataFrame:
    return pd.read_csv(results / "leaderboard.csv").set_index("name")


def current_mean(results: Path, **where) -> float:
    frame = load_records(results)
    for key, value in where.items():
        frame = frame[frame[key] == value]
    return 100 * frame["accuracy"].mean()


# --- the four ways to show a wrong number, and replaced checkpoints ---------------------------


@pytest.mark.slow
def test_a_smaller_rerun_never_pools_with_the_full_test_set(base, results, capsys):
    before = board(results).loc[RUN]
    code, _ = cli(
        capsys, results, base / "data", "--seeds", "0", "--n-test", "20", "--steps", "1", "--stage", "eval"
    )
    assert code == 0 and cli(capsys, results, base / "data", "--stage", "report")[0] == 0
    after = board(results).loc[RUN]
    assert (after["n_test"], after["seeds"]) == (50, 2)  # was 70 and <NA>: 5x50 + 5x20 images pooled
    assert after[["clean", "noise", "pgd@2"]].tolist() == before[["clean", "noise", "pgd@2"]].tolist()
    impulse = current_mean(results, run=RUN, members=1, n=50, perturbation="impulse_noise")
    table1 = (results / "tables" / "table1.md").read_text()
    assert f"| synthetic   | ResNet-8 | {impulse:.2f} (n=2) |" in table1
    assert "ResNet-8: n=20 (gaussian_noise, impulse_noise, shot_noise, speckle_noise)." in table1
    assert "In-ResNet-8" not in table1  # rows of models never trained are not shown


@pytest.mark.slow
def test_ensembles_of_different_sizes_are_never_averaged(base, results, capsys):
    assert cli(capsys, results, base / "data", "--seeds", "0,1,2")[0] == 0
    three = current_mean(results, run=RUN, members=3, perturbation="clean")
    pgd = current_mean(results, run=RUN, members=3, perturbation="pgd", eps_255=2.0)
    entry = board(results).loc[f"{RUN} (ensemble)"]
    assert (entry["clean"], entry["pgd@2"], entry["seeds"]) == (round(three, 6), round(pgd, 6), 3)
    assert (
        f"| synthetic   | ResNet-8, ens | {three:.2f} (n=3) |"
        in (results / "tables" / "table6.md").read_text()
    )
    assert "ResNet-8, ens: ensemble of 2 (clean" in (results / "tables" / "table6.md").read_text()


@pytest.mark.slow
def test_duplicate_seeds_are_refused(base, results, capsys):
    before = state(results)
    assert cli(capsys, results, base / "data", "--seeds", "0,0") == (
        2,
        "error: --seeds repeats 0: give each seed once\n",
    )
    assert state(results) == before


@pytest.mark.slow
def test_reports_use_the_asked_step_count_never_the_first_recorded(base, results, capsys):
    assert cli(capsys, results, base / "data", "--seeds", "0,1", "--steps", "1", "--stage", "eval")[0] == 0
    for steps in ("5", "1", "20"):  # 20 was never measured: the most steps, 5, are shown
        assert (
            cli(capsys, results, base / "data", "--seeds", "0,1", "--steps", steps, "--stage", "report")[0]
            == 0
        )
        shown_steps = 1 if steps == "1" else 5
        params = f'{{"alpha_255":2.0,"steps":{shown_steps}}}'
        pgd4 = current_mean(results, run=RUN, members=1, perturbation="pgd", eps_255=4.0, params=params)
        row = (results / "tables" / "table3.md").read_text().splitlines()[4]
        assert row.endswith(f"| {pgd4:.2f} (n=2) |"), (steps, row)
        other = 5 if shown_steps == 1 else 1
        note = (
            f"{other} step{'' if other == 1 else 's'} at α 2/255 (ifgsm@1, ifgsm@2, ifgsm@4, pgd@1, +2 more)"
        )
        assert note in (results / "tables" / "table3.md").read_text()
    assert "iterative-weaker-than-fgsm" not in (results / "leaderboard.md").read_text()


@pytest.mark.slow
def test_a_failed_retrain_retires_the_old_rows_and_a_deleted_checkpoint_does_not(
    base, results, capsys, tmp_path
):
    shuffled = Path(shutil.copytree(base / "data", tmp_path / "shuffled"))
    folder = shuffled / "synthetic" / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    for i in range(1, 6):  # labels that cannot be learnt: the retrain ends at chance, failed
        images, labels = read_batch(folder / f"data_batch_{i}", "labels", 10)
        write_batch(folder / f"data_batch_{i}", images, rng.permutation(labels))
    shutil.rmtree(results / "checkpoints" / "synthetic" / RUN / "seed0")
    assert cli(capsys, results, shuffled, "--seeds", "0,1")[0] == 0
    runs = load_runs(results).set_index("seed")
    assert runs.loc[0, "status"] == "failed" and runs.loc[1, "status"] == "finished"
    entries = board(results)
    assert list(entries.index) == [RUN] and entries.loc[RUN, "seeds"] == 1  # no seed 0, no ensemble
    assert set(load_records(results)["seed"]) == {1}
    table5 = (results / "tables" / "table5.md").read_text()
    assert re.search(r"\| ResNet-8, - \|.*\| 1/2 +\|", table5), table5  # 1 failed of 2 runs
    report = (results / "REPORT.md").read_text()
    assert re.search(r"; \d+ records of replaced or retrained checkpoints are not reported\.\n", report)
    table5 = (results / "tables" / "table5.md").read_bytes()
    shutil.rmtree(
        results / "checkpoints" / "synthetic" / RUN / "seed1"
    )  # gone, not retrained: its records stand
    assert cli(capsys, results, base / "data", "--stage", "report")[0] == 0
    assert (results / "tables" / "table5.md").read_bytes() == table5 and board(results).loc[RUN, "seeds"] == 1
    assert "1 of the checkpoints these records measured is not on disk" in (results / "REPORT.md").read_text()
    shutil.rmtree(results / "checkpoints" / "synthetic" / RUN / "seed0")  # the failed retrain's folder, too
    assert cli(capsys, results, base / "data", "--stage", "report")[0] == 0  # seed 0 as last recorded: failed


# --- every bad input is one line, exit 2, before anything is trained or recorded --------------

# each bad input: what the user must read in its one line (the value, the option, the fix)
BAD = [
    (["--radii", "inf"], ("--radii inf", "finite numbers of 1/255 in [0, 255]", "got inf")),
    (["--radii", "nan"], ("--radii nan", "finite numbers of 1/255 in [0, 255]", "got nan")),
    (["--radii", "1,-1"], ("--radii -1,1", "finite numbers of 1/255 in [0, 255]", "got -1")),
    (["--seeds", "²"], ("--seeds", "non-negative integers", "'²'")),
    (["--seeds", str(2**64)], ("--seeds", "[0, 2**32)", "18446744073709551616")),
    (["--device", "meta"], ("device 'meta'", "cpu, cuda, cuda:N or mps", "use --device cpu")),
    (["--data-dir", "{file}"], ("{file}", "is a file, not a folder", "choose another --data-dir")),
    (["--data-dir", ""], ("--data-dir is empty", "give a folder", "$INRES_BENCH_DATA or ./data")),
    (["--results-dir", ""], ("--results-dir is empty", "give a folder", "default: results")),
    (
        ["--results-dir", "{file}"],
        ("--results-dir {file}", "is a file, not a folder", "choose another --results-dir"),
    ),
    (["--rank-by", "pgd@3"], ("--rank-by 'pgd@3'", "not measured in this run or the records", "pgd@2")),
    (["--rank-by", "pgd3"], ("--rank-by 'pgd3'", "not a metric", "e.g. pgd@2")),
    (
        ["--models", "in-resnet14", "--lambda-init", "5,6"],
        ("--lambda-init 5,6", "in-resnet14", "U[5.0, 6.0] leaves the stable range", "needs high <= 2"),
    ),
    (["--lambda-init", "inf,inf"], ("--lambda-init", "finite numbers with a <= b", "got inf,inf")),
    (["--lambda-init", "0.3,0.2"], ("--lambda-init", "finite numbers with a <= b", "got 0.3,0.2")),
    (["--lambda-init", "-3"], ("--lambda-init", "two numbers a,b (e.g. 0.2,0.25)", "'-3'", "1 given")),
    (["--n-test", "x"], ("--n-test", "'x' is not an integer", "e.g. 100", "see --help")),
    (["--n-test", "٢٠"], ("--n-test", "'٢٠' is not an integer", "ASCII digits")),
    (["--radii", "1e-400"], ("--radii", "'1e-400'", "below the smallest float")),
    (["--radii", "2,٢"], ("--radii", "'٢' is not a decimal number", "ASCII digits")),
    (["--landscape-radius", "٨"], ("--landscape-radius", "'٨' is not a decimal number", "ASCII digits")),
    (["--lambda-init", "0.1,0.2,0.3"], ("--lambda-init", "two numbers a,b", "'0.1,0.2,0.3'", "3 given")),
    (
        ["--n-train", "20000"],
        (
            "--n-train 20000",
            "10,000 training images of synthetic",
            "give at most that many",
            "leave --n-train out",
        ),
    ),
    (
        ["--landscape-index", "2000"],
        ("--landscape-index 2000", "2,000 test images of synthetic", "give 0 to 1999", "leave it out"),
    ),
    (["--steps", "0"], ("--steps", "must be positive", "got 0")),
    (["--datasets", ""], ("--datasets is empty", "give a comma-separated list")),
    (
        ["--stage", "report", "--results-dir", "{empty}"],
        ("no records in {empty}/records.sqlite", "run the eval stage first", "check --results-dir"),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, said", BAD, ids=[" ".join(a) or "empty" for a, _ in BAD])
def test_bad_input_is_one_line_before_any_work(base, results, capsys, tmp_path, args, said):
    (tmp_path / "afile").write_text("a file")
    paths = {"file": tmp_path / "afile", "empty": tmp_path / "empty"}
    args = [a.format(**paths) for a in args]
    before = state(results)
    code, err = cli(capsys, results, base / "data", "--seeds", "0,1,2", *args)  # seed 2: work to do
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert [part for part in (p.format(**paths) for p in said) if part not in err] == [], err
    assert state(results) == before and not (tmp_path / "empty").exists()


@pytest.mark.slow
def test_negative_lambda_pairs_and_canonical_metric_names_are_accepted(base, results, capsys):
    args = ["--models", "in-resnet-sig14", "--lambda-init", "-3,-2", "--rank-by", "pgd@2.0", "--dry-run"]
    capsys.readouterr()
    assert (
        run_bench.main([*BASE, "--results-dir", str(results), "--data-dir", str(base / "data"), *args]) == 0
    )
    out = capsys.readouterr()
    assert out.err == "" and re.search(
        r"^\| in-resnet-sig14@smoke@lambda-3--2@n1024 +\| synthetic \|", out.out, re.M
    )


@pytest.mark.slow
def test_bad_labels_in_a_cifar_batch_are_refused(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    images = np.zeros((4, 32, 32, 3), np.uint8)
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", images, np.arange(4))
    monkeypatch.setitem(DATASETS, "cifar10", replace(DATASETS["cifar10"], url="file:///nonexistent"))
    for labels, shown in (
        ([0, 1, 2, 2**70], "object values such as [0]"),
        ([0.0, 1.5, 2.0, 3.0], "float64 values such as [0.0]"),
    ):
        rows = {"data": images.transpose(0, 3, 1, 2).reshape(4, 3072), "labels": labels}
        (folder / "test_batch").write_bytes(__import__("pickle").dumps(rows, protocol=2))
        code, err = cli(
            capsys,
            tmp_path / "results",
            tmp_path / "data",
            "--datasets",
            "cifar10",
            "--seeds",
            "0",
            "--n-train",
            "20",
        )
        parts = ("test_batch", "labels under 'labels'", "integers in [0, 10)", f"got {shown}")
        assert code == 2 and err.count("\n") == 1 and all(p in err for p in parts), err
    assert not (tmp_path / "results" / DB_FILE).exists()


@pytest.mark.slow
def test_a_suite_subset_above_the_training_images_there_are_names_the_suite(tmp_path, capsys, monkeypatch):
    """The smoke suite trains on 2,048 images; a data dir holding 20 is refused before any
    work, saying whose number it was (the user gave no --n-train)."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        write_batch(folder / name, np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
    monkeypatch.setitem(DATASETS, "cifar10", replace(DATASETS["cifar10"], url="file:///nonexistent"))
    capsys.readouterr()
    code = run_bench.main(
        [
            "--datasets",
            "cifar10",
            "--models",
            "resnet8",
            "--seeds",
            "0",
            "--no-progress",
            "--results-dir",
            str(tmp_path / "results"),
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    assert code == 2 and capsys.readouterr().err == (
        "error: the smoke suite's 2048 is more than the 20 training images of cifar10: give --n-train 20 or fewer\n"
    )
    assert not (tmp_path / "results" / DB_FILE).exists()


# --- corrupt, locked and read-only stores; full disks -----------------------------------------


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 3]
    elif how == "garbled page":
        for i in range(8192, 8192 + 4096, 7):
            data[i] = (data[i] * 31 + 7) % 256
    else:
        data = b"not a database " * 200
    path.write_bytes(data)


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, why",
    [
        ("truncated", "database disk image is malformed"),
        ("garbled page", "Page 3: btreeInitPage() returns error code 11"),
        ("not a database", "file is not a database"),
    ],
)
def test_a_corrupt_store_is_named_and_never_written(base, results, capsys, how, why):
    corrupt(results / DB_FILE, how)
    damaged = (results / DB_FILE).read_bytes()
    for stage in ("train,eval,report", "report"):
        code, err = cli(capsys, results, base / "data", "--seeds", "0,1", "--stage", stage)
        parts = (f"records.sqlite is corrupt ({why})", "nothing was written", "move", "aside and run again")
        assert code == 2 and err.count("\n") == 1 and all(p in err for p in parts), err
        assert (
            "`sqlite3 records.sqlite .recover`" in err and "records.csv beside it" in err
        )  # what can be saved
        assert (results / DB_FILE).read_bytes() == damaged


@pytest.mark.slow
def test_a_locked_store_is_one_line(base, results, capsys, monkeypatch):
    monkeypatch.setattr(sql, "READ_TIMEOUT", 0.2)
    holder = sqlite3.connect(results / DB_FILE)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a long write
    try:
        code, err = cli(capsys, results, base / "data", "--stage", "report")
    finally:
        holder.rollback()
        holder.close()
    parts = ("records.sqlite is locked by another process", "wait for it to finish, then run again")
    assert code == 2 and err.count("\n") == 1 and all(p in err for p in parts), err


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs unshare to mount a read-only file system")
def test_a_read_only_results_dir_or_store_is_one_line(base, results):
    """The results dir, then the store alone, on a read-only mount (in a private mount
    namespace): one error line each, found before anything is trained."""
    run = [
        f"{sys.executable} run_bench.py {' '.join(BASE)} --seeds 0,1,2 --data-dir {base / 'data'} --results-dir {results}"
    ]
    report = [f"{sys.executable} run_bench.py --stage report --results-dir {results}"]
    expected = {
        results: [
            f"error: cannot write results to {results} (Read-only file system): choose another --results-dir",
            f"error: cannot write reports to {results} (Read-only file system): choose another --results-dir",
        ],
        results / DB_FILE: [
            f"error: cannot write records to {results / DB_FILE} (Read-only file system): "
            "make it writable or choose another --results-dir"
        ],
    }
    for target, errors in expected.items():
        commands = run + (report if target == results else [])
        script = f"mount --bind {target} {target} && mount -o remount,bind,ro {target}"
        script += "".join(f" && {{ {c} ; echo rc=$? ; }}" for c in commands)
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True
        )
        assert done.stdout == "rc=2\n" * len(commands), done.stderr[-2000:]
        assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == errors
        assert "Traceback" not in done.stderr and len(load_records(results, include_stale=True)) == BASE_CELLS
    data = base / "data"  # a read-only data dir that holds everything is fine
    cached = run[0].replace("--seeds 0,1,2", "--seeds 0,1")
    script = f"mount --bind {data} {data} && mount -o remount,bind,ro {data} && {cached}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and f"0 cells evaluated, {BASE_CELLS} cached" in done.stderr, done.stderr[
        -2000:
    ]


@pytest.mark.slow
def test_what_a_run_reads_or_writes_is_checked_before_any_work(base, results, capsys, tmp_path):
    """A noise file of the wrong shape (not only the first group's) and a report folder
    that cannot be written: one line before any cell is recorded, not after 11 or 34."""
    data = Path(shutil.copytree(base / "data", tmp_path / "data"))
    noise = data / "generated" / "synthetic" / "CIFAR-10-C" / "speckle_noise.npy"
    np.save(noise, np.zeros((10, 32, 32, 3), np.uint8))
    before = state(results)
    code, err = cli(capsys, results, data, "--seeds", "0,1,2")
    parts = (str(noise), "expected uint8 (10000, 32, 32, 3)", "got uint8 (10, 32, 32, 3)")
    assert code == 2 and err.count("\n") == 1 and all(p in err for p in parts), err
    assert state(results) == before
    shutil.rmtree(results / "tables")
    (results / "tables").write_text("not a folder")
    code, err = cli(capsys, results, base / "data", "--seeds", "0,1,2")
    parts = (f"cannot write the report to {results / 'tables'}", "is a file, not a folder", "move it aside")
    assert code == 2 and err.count("\n") == 1 and all(p in err for p in parts), err
    assert state(results) == before


@pytest.mark.slow
def test_a_finished_checkpoint_without_its_weights_says_how_to_get_them_back(base, results, capsys):
    """The train stage skips a run whose meta.json says it finished, so "train it first"
    would loop: both stages say to restore the weights or delete the folder."""
    folder = results / "checkpoints" / "synthetic" / RUN / "seed0"
    (folder / "weights.pt").unlink()
    before = state(results)
    parts = (f"{folder} holds meta.json but not weights.pt", "restore weights.pt", "or delete the folder")
    for stages in ("train,eval,report", "eval"):
        code, err = cli(capsys, results, base / "data", "--stage", stages)
        assert code == 2 and err.count("\n") == 1 and all(p in err for p in parts), err
    assert state(results) == before


@pytest.mark.slow
def test_a_checkpoint_trained_on_other_images_than_the_data_dir_holds_is_named(
    base, results, capsys, caplog, tmp_path, monkeypatch
):
    data = Path(shutil.copytree(base / "data", tmp_path / "data"))
    batch = data / "synthetic" / "cifar-10-batches-py" / "data_batch_1"
    images, labels = read_batch(batch, "labels", 10)
    write_batch(batch, 255 - images, labels)
    before = state(results)
    reads = []
    monkeypatch.setattr(
        splits, "load_train", lambda *a: reads.append(a) or load_train(*a)
    )  # TrainingSets' reader
    code, _ = cli(capsys, results, data, "--stage", "train,eval", "--seeds", "0")
    assert (
        code == 0 and state(results) == before
    )  # kept, its cells cached: training again is the user's choice
    assert len(reads) == 1  # the --n-train check and the digest share one read of the training set
    (meta,) = [
        json.loads(p.read_text()) for p in results.glob(f"checkpoints/synthetic/{RUN}/seed0/meta.json")
    ]
    new = hashlib.sha256(
        np.ascontiguousarray(255 - images[:1024]).tobytes() + labels[:1024].tobytes()
    ).hexdigest()
    assert (
        f"{RUN} synthetic seed 0 was trained on images {meta['data']['sha256'][:12]}…, and the data dir's training "
        f"images are now {new[:12]}…: its cells stand for the images it was trained on"
    ) in caplog.text


@pytest.mark.slow
def test_stores_and_folders_that_cannot_be_ours_get_the_right_advice(tmp_path, capsys, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / DB_FILE) as db:
        db.execute("CREATE TABLE cells (a, b)")
        db.execute("INSERT INTO cells VALUES (1, 2)")
    for stage in ("report", "eval"):
        code, err = cli(capsys, foreign, tmp_path / "data", "--stage", stage)
        more = len(records.COLUMNS) - 3
        assert (
            code == 2
            and f"(its cells table lacks the columns model, run, family and {more} more: not a store of this project)"
            in err
        ), err
    if Path("/proc").is_dir():  # a folder that takes no new folders
        code, err = cli(capsys, Path("/proc/no-such/results"), tmp_path / "data")
        assert code == 2 and err == (
            "error: cannot write results to /proc/no-such/results (/proc takes no new folders: "
            "No such file or directory): choose another --results-dir\n"
        ), err

    def full():
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(records, "table_statements", full)
    with pytest.raises(
        UserError,
        match=r"^no space left to write records to .*/records.sqlite \(database or disk is full\): free space",
    ):
        records.RecordStore(tmp_path / "fresh")


def test_workers_never_outnumber_the_tasks(caplog):
    import logging

    from bench.run.options import RunOptions

    caplog.set_level(logging.INFO)
    from bench.run.pipeline import _workers

    assert _workers(RunOptions(workers=8), 2) == 2 and "--workers 8 for 2 tasks: 2 workers" in caplog.text
    assert _workers(RunOptions(workers=2), 5) == 2 and _workers(RunOptions(), 5) is None


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file(base, tmp_path):
    """A file-size limit stands in for a full disk: the checkpoint writes hit it."""
    limit = 100 * 1024  # bytes: resnet8's state.pt is larger

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "run_bench.py", *BASE, "--seeds", "0", "--data-dir", str(base / "data")]
    run = subprocess.run(
        [*command, "--results-dir", str(tmp_path / "r")],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.splitlines()[-1]
    parts = ("error: no space left to write", "/seed0/state.pt", "free space there", "finished work is kept")
    assert all(p in last for p in parts), run.stderr[-2000:]
    assert not list((tmp_path / "r").glob("**/.*.tmp"))  # no partial file left behind


# --- sharing a results dir, and what killed runs leave ----------------------------------------


@pytest.mark.slow
def test_two_processes_on_one_results_dir_share_the_work(base, tmp_path):
    command = [sys.executable, "run_bench.py", *BASE, "--seeds", "0,1", "--radii", "2", "--n-test", "20"]
    command += [
        "--data-dir",
        str(base / "data"),
        "--results-dir",
        str(tmp_path / "r"),
        "--stage",
        "train,eval",
    ]
    first = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    logs = [first.communicate()[1], second.stderr]
    assert first.returncode == 0 and second.returncode == 0, logs
    evaluated = [int(re.search(r"(\d+) cells evaluated", log)[1]) for log in logs]
    assert sum(evaluated) == 2 * 26 + 26 == len(load_records(tmp_path / "r"))  # each cell once
    trained = [len(re.findall(r"seed \d: finished, test acc", log)) for log in logs]
    assert sum(trained) == 2, logs  # each seed trained once


@pytest.mark.slow
def test_a_run_removes_what_killed_runs_left_and_writes_shareable_files(base, results, capsys, monkeypatch):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = __import__("socket").gethostname().split(".")[0]
    orphan = (
        results
        / "checkpoints"
        / "synthetic"
        / RUN
        / "seed0"
        / f".state.pt.inres-{host}-{dead.stdout.strip()}-abc.tmp"
    )
    alive = results / f".records.csv.inres-{host}-{os.getpid()}-xyz.tmp"  # a writer still at work
    orphan.write_bytes(b"partial")
    alive.write_bytes(b"partial")
    os.umask(0o022)
    try:
        assert cli(capsys, results, base / "data", "--seeds", "0,1")[0] == 0
    finally:
        os.umask(0o022)
    assert not orphan.exists() and alive.exists()
    for path in (results / "REPORT.md", results / "checkpoints" / "synthetic" / RUN / "seed0" / "meta.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path  # honours the umask like records.sqlite


def test_the_cleanup_removes_only_the_orphans_of_its_own_dead_writers_in_its_own_folders(tmp_path):
    """Data dirs are shared with other tools: a file that merely looks temporary, or one of
    ours outside the folders the harness writes, survives; a dead writer's in them does not."""
    from bench.core.processes import remove_orphans
    from bench.data.noise_files import data_folders
    from bench.run.pipeline import RESULT_FOLDERS

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host, pid = __import__("socket").gethostname().split(".")[0], dead.stdout.strip()
    data, results = tmp_path / "data", tmp_path / "results"
    gone = [
        data / "cifar-10-batches-py" / f".data_batch_1.inres-{host}-{pid}-abc.tmp",
        data / f".cifar-10-python.tar.gz.inres-{host}-{pid}-abc.part",
        data / "generated" / "CIFAR-10-C" / f".shot_noise.npy.inres-{host}-{pid}-abc.tmp",
        results / "tables" / f".table1.md.inres-{host}-{pid}-abc.tmp",
        results / f".REPORT.md.inres-{host}-{pid}-abc.tmp",
    ]
    kept = [
        data / "notes" / ".draft.abcdefgh.tmp",
        data / "generated" / ".draft.abcdefgh.part",
        data / "notes" / f".draft.inres-{host}-{pid}-abc.tmp",
        results / "mine" / ".draft.abcdefgh.tmp",
        results / "mine" / f".x.inres-{host}-{pid}-abc.tmp",
        results / f".REPORT.md.inres-{host}-{os.getpid()}-abc.tmp",
        results / f".REPORT.md.inres-otherhost-{pid}-abc.tmp",
    ]
    for path in gone + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
        os.utime(path, (time.time() - 7 * 24 * 3600,) * 2)  # a week old
    assert remove_orphans(results, RESULT_FOLDERS) + remove_orphans(data, data_folders()) == len(gone)
    assert [p.exists() for p in gone] == [False] * len(gone) and [p.exists() for p in kept] == [True] * len(
        kept
    )


# --- fuzz -----------------------------------------------------------------------------------

HUGE = str(2**70)
POOLS = {  # valid values few (so that most valid runs find their work cached), invalid ones many
    "--models": ["resnet8", "resnet8", "in-resnet14", "resnet8,in-resnet14", "nope", "", "resnet*8"],
    "--seeds": ["0", "1", "0,1", "0,0", "-1", "²", "x", "", "4294967296", "1,", "+1", HUGE],
    "--n-train": ["1024", "1024", "0", "-5", "x", "1e3", HUGE],
    "--n-test": ["50", "50", "50", "0", "x", "-1", HUGE, "20000000"],
    "--n-autoattack": ["10", "0", HUGE],
    "--n-stability": ["8", "0", "-2", HUGE],
    "--radii": [
        "2",
        "2",
        "1,2",
        "inf",
        "nan",
        "-1",
        "x",
        "",
        "300",
        "1e400",
        "1,1",
        "2,2.0",
        "1,,2",
        ",2",
        ",",
        "-0",
        "0,-0",
        "+0",
    ],
    "--steps": ["5", "5", "0", "-1", "x", HUGE],
    "--lambda-init": ["-0.1,0", "5,6", "inf,inf", "1", "0.3,0.2", "a,b", "nan,1"],
    "--stage": [
        "train",
        "eval",
        "check",
        "report",
        "train,eval",
        "eval,report",
        "summary",
        "x",
        "",
        "report,report",
        "stability",
        "eval,stability",
    ],
    "--rank-by": ["pgd@2", "pgd@2.0", "pgd@3", "clean", "x", "noise", "fgsm@1", "pgd@", "worst@2"],
    "--device": ["cpu", "auto", "meta", "tpu", "cuda:9", ""],
    "--batch-size": ["64", "0", "x", HUGE],
    "--workers": ["0", "-1", "x", HUGE],
    "--preset": ["paper", "paper", "authors-code", "x"],
    "--noise-source": ["auto", "generated", "released", "x"],
    "--datasets": ["synthetic", "synthetic", "cifar10", "svhn", "", "synthetic,synthetic"],
    "--length": ["smoke", "x"],
    "--suite": ["smoke", "x", "paper"],  # paper: no GPU here, refused at once
    "--executor": ["local", "slurm"],
    "--ray-address": ["", "host:notaport", "127.0.0.1:1", "host:70000"],  # (without --executor ray: refused)
    "--assume-tflops": ["0", "-1", "nan", "1e308"],
    "--landscape-index": ["-1", HUGE],
    "--landscape-points": ["1", "3000000", HUGE],
    "--landscape-radius": ["0", "1e308", "nan", "-1"],
    "--num-classes": ["10", "7"],
    "--results-dir": ["{results}", "{results}", "{file}", "", "{results}/sub"],
    "--data-dir": ["{data}", "{data}", "{data}", "{file}", ""],
}
FLAGS = ["--dry-run", "--list-models", "--contiguous", "--unknown-flag"]
EXAMPLES = 150  # 17 s here: most examples are refused at once or find their cells cached

# each option drawn in about one example in four, with a value from its pool
drawn_options = st.fixed_dictionaries({o: st.sampled_from([None] * 3 * len(v) + v) for o, v in POOLS.items()})
drawn_flags = st.lists(st.sampled_from(FLAGS), max_size=2, unique=True)


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(options=drawn_options, flags=drawn_flags)
def test_fuzz_the_command_line(base, results, capsys, monkeypatch, tmp_path, options, flags):
    """Option combinations drawn by hypothesis over every option, with the hostile values
    users were seen to give (2**70 counts, a file for a folder, addresses that are none):
    each ends with exit 0, or with exit 2, one `error:` line and nothing new trained or
    recorded; never a traceback. Runs are real; the pools keep valid runs cached."""
    monkeypatch.setitem(DATASETS, "cifar10", replace(DATASETS["cifar10"], url="file:///nonexistent"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "afile").write_text("a file")
    # the last value given wins: the pools override these (reports and figures only when drawn from them)
    args = [
        "--no-progress",
        "--models",
        "resnet8",
        "--n-train",
        "1024",
        "--steps",
        "5",
        "--radii",
        "2",
        "--stage",
        "train,eval",
        "--results-dir",
        str(results),
        "--data-dir",
        str(base / "data"),
    ]
    for option, value in options.items():
        if value is not None:
            args.append(
                f"{option}={value.format(results=results, data=base / 'data', file=tmp_path / 'afile')}"
            )
    args += flags
    before = state(results)
    capsys.readouterr()
    code = run_bench.main(args)
    out = capsys.readouterr()
    assert code in (0, 2), (args, out.err)
    if code == 2:
        assert len(out.err.splitlines()) == 1 and out.err.startswith("error: "), (args, out.err)
        assert state(results) == before, args


@pytest.mark.slow
def test_the_check_stage_alone_writes_the_sanity_table(base, results, capsys):
    (results / "sanity.md").unlink()
    report = (results / "REPORT.md").read_text()
    assert cli(capsys, results, base / "data", "--seeds", "0,1", "--stage", "check") == (0, "")
    table = (results / "sanity.md").read_text()
    assert table.startswith("# Sanity checks\n\n| entry ") and f"| {RUN} (ensemble) | synthetic |" in table
    assert (results / "REPORT.md").read_text() == report  # the other reports are the report stage's
    assert set(load_checks(results)["check"]) == {
        "zero-gradients",
        "nonfinite-gradients",
        "randomized",
        "probabilities",
        "classes",
        "dynamic",
    }


@pytest.mark.slow
def test_no_figures_writes_the_reports_without_drawing(base, results, capsys):
    """The base run's reports were made with --no-figures: every table, REPORT.md (which says
    so) and the leaderboard, and no figure; the report stage without it draws them."""
    assert not (results / "figures").exists() and (results / "tables" / "table1.md").is_file()
    assert (
        "Not drawn in this run (`--no-figures`): `python run_bench.py --stage figures` draws them."
        in (results / "REPORT.md").read_text()
    )
    assert (
        run_bench.main(["--stage", "report", "--results-dir", str(results), "--data-dir", str(base / "data")])
        == 0
    )
    assert any((results / "figures").glob("*.png")) and "Not drawn" not in (results / "REPORT.md").read_text()
