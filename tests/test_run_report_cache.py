"""bench/reports/unchanged.py: a report is written again exactly when something it is made
from changed, or one of its files is no longer as written."""

import os

from bench.records.store import RecordStore
from bench.run import report_cache as unchanged

RUN = {
    "model": "resnet8",
    "run": "resnet8",
    "dataset": "synthetic",
    "seed": 0,
    "lambda_low": None,
    "lambda_high": None,
    "status": "finished",
    "reason": "",
    "test_accuracy": 0.5,
    "checkpoint_sha256": "ab" * 32,
    "timestamp": "2026-12-03T00:00:00Z",
}
OPTIONS = {"preset": "paper", "rank_by": "pgd@2", "steps": 20}


def digest(results, **options) -> str:
    return unchanged.inputs_digest(results, "report", {**OPTIONS, **options})


def test_the_digest_follows_records_checkpoints_and_options_not_sightings_nor_the_data(tmp_path):
    results, data = tmp_path / "results", tmp_path / "data"
    (data / "cifar-10-batches-py").mkdir(parents=True)
    (data / "cifar-10-batches-py" / "test_batch").write_bytes(b"images")
    store = RecordStore(results)
    store.add_run(RUN)
    first = digest(results)
    assert digest(results) == first  # the same inputs: the same digest
    store.add_run({**RUN, "timestamp": "2026-12-04T00:00:00Z"})  # a run seen again, nothing else
    assert digest(results) == first
    store.add_run({**RUN, "test_accuracy": 0.6})
    second = digest(results)
    assert second != first
    assert digest(results, rank_by="fgsm@2") != second
    assert unchanged.inputs_digest(results, "figures", OPTIONS) != second
    folder = results / "checkpoints" / "synthetic" / "resnet8" / "seed0"
    folder.mkdir(parents=True)
    (folder / "weights.pt").write_bytes(b"weights")
    third = digest(results)
    assert third != second
    (folder / "weights.pt").write_bytes(b"other weights")  # replaced: size and time differ
    fourth = digest(results)
    assert fourth != third
    batch = data / "cifar-10-batches-py" / "test_batch"
    os.utime(
        batch, ns=(batch.stat().st_atime_ns, batch.stat().st_mtime_ns + 10**9)
    )  # touched: the reports read no data
    assert digest(results) == fourth  # (Fig. 2's landscapes are records: bench.eval.landscape)


def test_a_report_is_up_to_date_only_with_its_inputs_and_every_file_as_written(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    report, table = results / "REPORT.md", results / "tables" / "table1.md"
    table.parent.mkdir()
    report.write_text("report")
    table.write_text("table")
    assert not unchanged.up_to_date(results, "report", "d1")  # nothing remembered yet
    unchanged.remember(results, "report", "d1", [report, table])
    assert unchanged.up_to_date(results, "report", "d1")
    assert not unchanged.up_to_date(results, "report", "d2")  # other inputs
    assert not unchanged.up_to_date(results, "figures", "d1")  # another kind of report
    table.write_text("edited by hand")
    assert not unchanged.up_to_date(results, "report", "d1")
    unchanged.remember(results, "report", "d1", [report, table])
    report.unlink()
    assert not unchanged.up_to_date(results, "report", "d1")
    (results / unchanged.MANIFEST).write_text("{not json")  # damaged: everything is written again
    assert not unchanged.up_to_date(results, "report", "d1")
