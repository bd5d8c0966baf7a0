"""Round five of hostile input on a finished results dir: records alone make the report, a
copied checkpoint is never a second seed, nothing is written through a planted link, and
the store holds only what the harness made."""

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

import run_bench
from bench.core.files import sha256_file
from bench.core.processes import run_lock
from bench.records.checkpoints import STAMP, file_stamp
from models import UserError

RUN = "resnet8@smoke@n1024"


def fails(argv: list[str], capsys) -> str:
    """The one error line of a refused run."""
    capsys.readouterr()
    assert run_bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def finished_copy(mini_run, tmp_path: Path) -> tuple[list[str], Path]:
    """A copy of the mini run's finished results dir with its reports written by this code,
    and the argv that finds all of it cached."""
    command, reference = mini_run
    results = tmp_path / "results"
    shutil.copytree(reference, results)
    assert run_bench.main(["--stage", "report", "--no-figures", "--results-dir", str(results)]) == 0
    return [*command[2:], "--no-progress", "--results-dir", str(results)], results


def report_files(results: Path) -> dict[str, bytes]:
    """The tables and the leaderboard, by path below the results dir."""
    found = [
        *results.glob("tables/*"),
        *results.glob("leaderboard/**/*"),
        results / "leaderboard.md",
        results / "leaderboard.csv",
    ]
    return {str(p.relative_to(results)): p.read_bytes() for p in found if p.is_file()}


def seed_folder(results: Path, seed: int) -> Path:
    return results / "checkpoints" / "synthetic" / RUN / f"seed{seed}"


# --- records alone make the report -------------------------------------------------------------


@pytest.mark.slow
def test_records_and_meta_json_alone_render_the_same_tables_and_leaderboard(mini_run, tmp_path, capsys):
    """Before: "no current records ...: its 96 records all measured checkpoints since retrained,
    failed on retraining or deleted; run the eval stage" (and the eval stage refused too)."""
    _, results = finished_copy(mini_run, tmp_path)
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    shutil.copy2(results / "records.sqlite", copy / "records.sqlite")
    for meta in results.glob("checkpoints/**/meta.json"):
        (copy / meta.relative_to(results)).parent.mkdir(parents=True)
        shutil.copy2(meta, copy / meta.relative_to(results))
    assert run_bench.main(["--stage", "report", "--no-figures", "--results-dir", str(copy)]) == 0
    assert report_files(copy) == report_files(results) and len(report_files(results)) > 20
    line = (copy / "REPORT.md").read_text().splitlines()[2]
    assert line.endswith(
        "2 of the checkpoints these records measured are not on disk (their weights.pt or folder was "
        "deleted or not copied): their records stand, and measuring them again needs the weights."
    )
    assert "not on disk" not in (results / "REPORT.md").read_text()
    for seed in (0, 1):  # deleting only the weights in place: the same report
        (seed_folder(results, seed) / "weights.pt").unlink()
    assert run_bench.main(["--stage", "report", "--no-figures", "--results-dir", str(results)]) == 0
    assert report_files(copy) == report_files(results)


def retrain(folder: Path) -> None:
    """What a retrain leaves: other weights, and a meta.json naming them."""
    state = torch.load(folder / "weights.pt", weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, folder / "weights.pt")
    meta = json.loads((folder / "meta.json").read_text())
    meta.update({"sha256": sha256_file(folder / "weights.pt"), STAMP: file_stamp(folder / "weights.pt")})
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.slow
def test_the_eval_stage_is_advised_only_where_a_checkpoint_stands_to_be_measured(mini_run, tmp_path, capsys):
    _, results = finished_copy(mini_run, tmp_path)
    for seed in (0, 1):
        retrain(seed_folder(results, seed))
    said = fails(["--stage", "report", "--results-dir", str(results)], capsys)
    assert said.endswith(
        "records all measured checkpoints since retrained, replaced or failed on retraining; run the "
        "eval stage to measure the 2 finished checkpoints that stand now"
    )
    for seed in (0, 1):  # weights.pt replaced under a meta.json that still names the old ones
        meta = json.loads((seed_folder(results, seed) / "meta.json").read_text())
        (seed_folder(results, seed) / "meta.json").write_text(
            json.dumps({**meta, STAMP: {}, "sha256": "0" * 64})
        )
    said = fails(["--stage", "report", "--results-dir", str(results)], capsys)
    assert said.endswith(
        "; no finished checkpoint stands to be measured: restore the replaced weights, or train again"
    )


# --- a checkpoint is what it holds --------------------------------------------------------------


@pytest.mark.slow
def test_a_copied_or_renamed_checkpoint_folder_is_never_another_seed(mini_run, tmp_path, capsys):
    """Before: `cp -a seed0 seed2` and --seeds 0,1,2 recorded seed 2 with seed 0's sha256 and
    an "ensemble of 3" holding seed 0 twice; a folder renamed to seed7 was recorded as seed 7."""
    argv, results = finished_copy(mini_run, tmp_path)
    before = (results / "records.sqlite").read_bytes()
    shutil.copytree(seed_folder(results, 0), seed_folder(results, 2))
    assert fails([*argv, "--seeds", "0,1,2", "--stage", "eval,report"], capsys) == (
        f"error: {seed_folder(results, 2)} holds the checkpoint of seed 0 (its meta.json says so), not of seed 2: a "
        "copied or renamed folder is never another run; move it back or delete it"
    )
    meta = json.loads((seed_folder(results, 2) / "meta.json").read_text())
    (seed_folder(results, 2) / "meta.json").write_text(
        json.dumps({**meta, "seed": 2})
    )  # the copy edited to pass
    assert fails([*argv, "--seeds", "0,1,2", "--stage", "eval,report"], capsys) == (
        f"error: {seed_folder(results, 0)} and {seed_folder(results, 2)} hold the same checkpoint (sha256 "
        f"{meta['sha256'][:12]}…): one checkpoint never counts as two seeds; delete the copy"
    )
    shutil.rmtree(seed_folder(results, 2))
    seed_folder(results, 1).rename(seed_folder(results, 7))
    assert fails([*argv, "--seeds", "0,7", "--stage", "eval,report"], capsys).startswith(
        f"error: {seed_folder(results, 7)} holds the checkpoint of seed 1 (its meta.json says so), not of seed 7"
    )
    assert (results / "records.sqlite").read_bytes() == before


# --- nothing is written through a planted link ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["train.log", "lock", "tables"])
def test_a_planted_link_is_refused_and_nothing_written_through_it(mini_run, tmp_path, capsys, planted):
    """Before: a train.log link got three log lines appended; a dangling lock link created its target."""
    argv, results = finished_copy(mini_run, tmp_path)
    outside = tmp_path / "outside"
    link = {
        "train.log": seed_folder(results, 0) / "train.log",
        "lock": results / ".locks" / "synthetic" / "planted.lock",
        "tables": results / "tables",
    }[planted]
    if link.is_dir():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    said = fails(argv, capsys)
    assert said == (
        f"error: {link} is a symbolic link to {outside}, outside {results}: the harness never writes through "
        "a link it did not make; replace it with a folder or file of its own"
    )
    assert not outside.exists()


def test_a_lock_or_log_is_never_opened_through_a_link(tmp_path):
    outside, lock = tmp_path / "outside", tmp_path / ".locks" / "run.lock"
    lock.parent.mkdir()
    lock.symlink_to(outside)
    with pytest.raises(UserError) as err, run_lock(lock):
        pass
    said = str(err.value)
    assert all(p in said for p in (str(lock), "symbolic link", str(outside), "remove the link"))
    assert not outside.exists()


# --- the store holds only what the harness made ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sql", "said"),
    [
        (
            "CREATE TRIGGER inflate AFTER INSERT ON cells BEGIN UPDATE cells SET accuracy = 1.0 WHERE rowid = new.rowid; END",
            "holds trigger 'inflate', which this harness never makes (planted?)",
        ),
        (
            "CREATE VIEW best AS SELECT * FROM cells",
            "holds view 'best', which this harness never makes (planted?)",
        ),
        ("CREATE TABLE notes (x TEXT)", "holds table 'notes', which this harness never makes (planted?)"),
        (
            f"UPDATE cells SET run = '{RUN}' || char(10) || '| 0 | FAKE | 99.99 |' WHERE rowid = 1",
            "holds run = 'resnet8@smoke@n1024\\n| 0 | FAKE | 99.99 |', not a string of 1-200 letters, digits and . _ @ + - "
            "(the characters --name takes)",
        ),
        (
            "UPDATE runs SET model = '../../pwn' WHERE rowid = 1",
            "runs row 1 holds model = '../../pwn', not a string of 1-200 letters, digits and . _ @ + -",
        ),
    ],
)
def test_a_store_with_what_the_harness_never_made_is_refused(mini_run, tmp_path, capsys, sql, said):
    """Before: a trigger turned a 10% defense into 100%, and a run name holding a newline put a
    FAKE row into leaderboard.md, REPORT.md and leaderboard.csv."""
    argv, results = finished_copy(mini_run, tmp_path)
    board = (results / "leaderboard.md").read_bytes()
    with sqlite3.connect(results / "records.sqlite") as db:
        db.execute(sql)
    assert said in fails(["--stage", "report", "--results-dir", str(results)], capsys)
    assert said in fails(argv, capsys)
    assert (results / "leaderboard.md").read_bytes() == board


@pytest.mark.slow
def test_a_read_only_results_dir_is_refused_before_noise_is_generated(
    mini_run, tmp_path, capsys, monkeypatch
):
    command, _ = mini_run
    results, data = tmp_path / "results", Path(command[command.index("--data-dir") + 1])
    fresh = tmp_path / "data"
    shutil.copytree(data, fresh, ignore=shutil.ignore_patterns("generated"))
    real_mkstemp = __import__("tempfile").mkstemp

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 (tempfile's own keyword)
        if dir is not None and Path(dir) == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    argv = [
        *command[2 : command.index("--data-dir")],
        "--data-dir",
        str(fresh),
        "--results-dir",
        str(results),
    ]
    line = fails(argv, capsys)
    assert all(
        p in line
        for p in (f"cannot write results to {results}", "Permission denied", "another --results-dir")
    )
    assert not (fresh / "generated").exists() and not results.exists()


@pytest.mark.slow
def test_a_results_path_too_long_for_sqlite_is_named_as_such(mini_run, tmp_path, capsys):
    """Before: "cannot open ... (unable to open database file): check the permissions"."""
    command, _ = mini_run
    deep = tmp_path.joinpath(*["d" * 100] * 5)
    said = fails([*command[2:], "--no-progress", "--results-dir", str(deep)], capsys)
    assert said == (
        f"error: cannot open {deep / 'records.sqlite'}: its path (and its journal's) is "
        f"{len(str(deep / 'records.sqlite')) + 8} characters, more than SQLite's 512; choose a shorter "
        "--results-dir"
    )
    assert not os.path.exists(deep)
