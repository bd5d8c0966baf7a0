"""Trustworthy numbers: perturbations as registered specs, AutoAttack as the reference,
sanity gates, confidence intervals, RobustBench entries, older stores refused."""

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bench import EvalConfig, UserError, evaluate_protocol
from bench.attacks.perturbations import PERTURBATIONS, Perturbation, register
from bench.eval import model_checks
from bench.records import sanity
from bench.records.load import load_correct, load_records
from bench.records.schema import COLUMNS, DB_FILE, KEY
from bench.records.stats import Bootstrap, verdict
from bench.reports.leaderboard import check_metric
from bench.reports.measured import measured
from bench.reports.writer import write_reports
from models import plain_counterpart

# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Darken(Perturbation):
    """A test-only attack: every value lowered by eps (within [0, 1])."""

    def perturb(self, model, x, y, eps, setting):
        return [(x - e).clamp(0, 1) for e in eps]


def test_a_perturbation_registered_elsewhere_flows_through_evaluation_records_and_reports(
    grey_root, grey_defense, tmp_path
):
    """Registered here, in a test: the engine, the records, the selection, the tables, the
    leaderboard and --rank-by take it with no change to their code."""
    register(Darken("darken", "Darken", leaderboard=True))
    try:
        config = EvalConfig(radii_255=(2.0,), steps=1, extra=(("darken", (2.0, 10.5)),))
        records = evaluate_protocol(grey_defense, config, tmp_path / "r", grey_root, progress=False)
        darken = records[records["perturbation"] == "darken"].set_index("eps_255")
        # GreyLevel's classes 1-3 lie less than 10.5/255 above the midpoint to the level
        # below: they flip; 7 of the 10 classes keep their 7 correctly labelled images
        assert darken.loc[2.0, "accuracy"] == 0.7 and darken.loc[10.5, "accuracy"] == 0.49
        assert set(darken["params"]) == {"{}"}
        assert check_metric("darken@10.50") == "darken@10.5"
        write_reports(tmp_path / "r", rank_by="darken@10.5")
        board = pd.read_csv(tmp_path / "r" / "leaderboard.csv")
        assert board.loc[0, "darken@2"] == 70.0 and board.loc[0, "darken@10.5"] == 49.0
    finally:
        PERTURBATIONS.pop("darken")


# --- AutoAttack ---------------------------------------------------------------------------------


def test_autoattack_runs_seeded_and_is_no_weaker_than_pgd(grey_root, grey_defense, tmp_path):
    config = EvalConfig(
        radii_255=(10.5,), steps=10, extra=(("autoattack", (10.5,)),), subsets=(("autoattack", 40),)
    )
    records = evaluate_protocol(grey_defense, config, tmp_path / "a", grey_root, progress=False).set_index(
        "perturbation"
    )
    assert records.loc["autoattack", "n"] == 40 and records.loc["pgd", "n"] == 100  # its own subset
    assert records.loc["autoattack", "params"] == '{"version":"standard"}'
    aa = load_correct(tmp_path / "a", perturbation="autoattack")
    pgd = load_correct(tmp_path / "a", perturbation="pgd")[:40]  # class-balanced subsets nest
    # the 40 are 4 images of each class, 3 of them wrongly labelled; at 10.5/255 classes 0-3
    # can reach a neighbour's level (0 upwards, 1-3 downwards), 4-9 cannot
    assert aa.sum() <= pgd.sum() and aa.mean() == 6 / 40
    evaluate_protocol(grey_defense, config, tmp_path / "b", grey_root, progress=False)
    assert np.array_equal(load_correct(tmp_path / "b", perturbation="autoattack"), aa)  # seeded


# --- the gates ----------------------------------------------------------------------------------


def aggregates(means: dict, std: float = float("nan"), dataset: str = "cifar10") -> pd.DataFrame:
    entry = {"dataset": dataset, "model": "m", "run": "m", "lambda_low": np.nan, "lambda_high": np.nan}
    entry |= {"kind": "single", "preset": "paper"}
    return pd.DataFrame(
        [{**entry, "metric": k, "mean": v, "std": std, "n": 2, "n_test": 100} for k, v in means.items()]
    )


@pytest.mark.parametrize(
    "means, std, flags",
    [
        ({"fgsm@1": 50, "fgsm@2": 50.4, "pgd@2": 30}, float("nan"), ""),  # within 0.5 point
        ({"fgsm@1": 50, "fgsm@2": 50.6}, float("nan"), "eps-not-monotone"),
        ({"fgsm@1": 50, "fgsm@2": 51.5}, 2.0, ""),  # within the seeds' std
        ({"fgsm@2": 40, "pgd@2": 40.4, "ifgsm@2": 39}, float("nan"), ""),
        ({"fgsm@2": 40, "ifgsm@2": 41}, float("nan"), "iterative-weaker-than-fgsm"),
        ({"pgd50@16": 11.9, "pgd50@64": 10}, float("nan"), ""),  # chance (10) + 2 points
        ({"pgd50@16": 12.1}, float("nan"), "large-eps-above-chance"),
        ({"pgd@2": 30, "uniform@2": 29.6}, float("nan"), ""),
        ({"pgd@2": 30, "uniform@2": 29}, float("nan"), "noise-stronger-than-pgd"),
        ({"pgd@2": 30, "autoattack@2": 25.1}, float("nan"), ""),
        ({"pgd@2": 30, "autoattack@2": 24.9}, float("nan"), "reference-below-pgd"),
    ],
)
def test_record_gates_fail_exactly_beyond_their_limits(means, std, flags):
    table = sanity.summary(sanity.record_gates(aggregates(means, std)))
    assert table.loc[0, "flags"] == flags
    if flags in ("", "eps-not-monotone"):  # passing one gate is not passing all: not checked
        assert table.loc[0, "unreliable"] is pd.NA and table.loc[0, "unchecked"].count(";") >= 7
    else:
        assert table.loc[0, "unreliable"] == True  # noqa: E712 (a nullable boolean)


def test_large_radius_chance_follows_the_classes():
    table = sanity.summary(sanity.record_gates(aggregates({"pgd50@16": 2.9}, dataset="cifar100")))
    assert table.loc[0, "large-eps"] == pytest.approx(1.9) and table.loc[0, "flags"] == ""


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
        )

    def forward(self, x):
        return self.net(x)


class Quantised(Small):  # input quantisation: a gradient of zero everywhere
    def forward(self, x):
        return super().forward(torch.round(x * 4) / 4)


class Saturated(Small):  # probabilities, saturated
    def forward(self, x):
        return torch.softmax(1000 * super().forward(x), dim=1)


class Noisy(Small):  # a randomised forward pass
    def forward(self, x):
        return super().forward(x + 0.05 * torch.randn_like(x))


@pytest.mark.parametrize(
    "model, failed",
    [
        (Small(), set()),
        (Quantised(), {"zero-gradients"}),
        (Saturated(), {"probabilities"}),
        (Noisy(), {"randomized"}),
    ],
)
def test_model_checks_catch_masked_models(model, failed, images):
    x, y = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.arange(32) % 10
    results = {
        check: (value, limit) for check, value, limit, _ in model_checks.model_checks(model.eval(), x, y, 10)
    }
    assert set(results) == {
        "zero-gradients",
        "nonfinite-gradients",
        "randomized",
        "probabilities",
        "classes",
        "dynamic",
    }
    assert {check for check, (value, limit) in results.items() if value > limit} == failed
    assert model_checks.model_checks(Small().eval(), x, y, 100)[4][1] == 90  # 10 outputs for 100 classes


def test_transfer_from_the_model_itself_equals_white_box():
    model, x, y = Small().eval(), torch.rand(16, 3, 32, 32), torch.arange(16) % 10
    check, value, limit, detail = model_checks.transfer_check(
        model, model, x, y, EvalConfig(steps=3), 2.0, seed=1
    )
    assert (check, value, limit) == ("transfer", 0.0, sanity.TRANSFER_MARGIN) and "16 images" in detail


class Linear(nn.Module):
    """A linear classifier on [0, 1] pixels, steep enough that PGD at 2/255 flips it."""

    def __init__(self, seed: int):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(seed))
        )

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


class Masked(nn.Module):
    """`net` behind a rounding to 8 bits: the same predictions, zero input gradients."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 255) / 255)


def test_the_transfer_check_flags_a_surrogate_stronger_than_white_box_not_a_weaker_one():
    """Masked gradients: white-box PGD finds nothing, the source's examples fool it (the
    gate fails); another network's examples transfer worse than white-box (it passes)."""
    source, x = Linear(0).eval(), torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = source(x).argmax(1)  # every image correct for the source
    masked = model_checks.transfer_check(
        Masked(source).eval(), source, x, y, EvalConfig(steps=5), 2.0, seed=1
    )
    assert masked[1] > 50 > sanity.TRANSFER_MARGIN and "white-box 100.0" in masked[3]  # transfer: 26.6
    other = Linear(1).eval()
    weaker = model_checks.transfer_check(
        other, source, x, other(x).argmax(1), EvalConfig(steps=5), 2.0, seed=1
    )
    assert (
        weaker[1] < -50 < sanity.TRANSFER_MARGIN
    )  # white-box breaks it (12.5), the source's examples do not (96.9)


def test_the_plain_counterpart_is_the_resnet_of_the_same_architecture():
    assert plain_counterpart("lambda-in-resnet110") == "resnet110"
    assert plain_counterpart("in-resnext29-8x64d") == "resnext29-8x64d"
    assert plain_counterpart("resnet110") is None


# --- worst case and intervals -------------------------------------------------------------------


def test_the_worst_case_is_the_and_of_every_attack_at_a_radius(grey_root, grey_defense, tmp_path):
    config = EvalConfig(radii_255=(11.0,), steps=2, extra=(("uniform", (11.0,)),))
    evaluate_protocol(grey_defense, config, tmp_path, grey_root, progress=False)
    write_reports(tmp_path)
    survivors = np.logical_and.reduce(
        [load_correct(tmp_path, perturbation=p, eps_255=11.0) for p in ("fgsm", "ifgsm", "pgd", "uniform")]
    )
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert "worst@11" not in board.columns  # the leaderboard shows 2/255; the full table has it
    worst = measured(tmp_path).aggregated.query("metric == 'worst@11'")["mean"]
    assert list(worst) == [100 * survivors.mean()]


def test_bootstrap_intervals_have_the_known_width():
    boot = Bootstrap(seed=0)
    half = [np.arange(10_000) % 2 == 0]  # one seed, p = 0.5: standard error 0.5 points
    low, high = boot.interval(half, ("half",))
    assert low == pytest.approx(50 - 1.96 * 0.5, abs=0.2) and high == pytest.approx(50 + 1.96 * 0.5, abs=0.2)
    same = boot.difference(half, half, ("same",))
    assert same == (0.0, 0.0, 0.0)  # paired: the same examples cancel in every draw
    rng = np.random.default_rng(1)
    seeds = [rng.random(1000) < p for p in (0.6, 0.7, 0.8)]  # seeds that disagree widen it
    assert np.diff(boot.interval(seeds, ("3",))) > 2 * np.diff(boot.interval([seeds[1]] * 3, ("1",)))
    assert verdict(1.0, 3.0, 2.5) == "reproduces" and verdict(-3.0, -1.0, 2.5) == "contradicts"
    assert verdict(-1.0, 3.0, 2.5) == "inconclusive"


def test_an_interval_depends_on_what_it_measures_not_on_what_came_before():
    """Each interval's generator is seeded by its identity: computing others first, or on
    another Bootstrap, changes nothing; another identity draws differently."""
    rng = np.random.default_rng(2)
    a, b = [rng.random(500) < 0.6 for _ in range(3)], [rng.random(500) < 0.5 for _ in range(3)]
    fresh = Bootstrap().difference(a, b, ("claim", "x"))
    busy = Bootstrap()
    busy.interval(b, ("other",)), busy.over_seeds([1.0, 2.0, 3.0], ("more",)), busy.difference(b, a, ("y",))
    assert busy.difference(a, b, ("claim", "x")) == fresh
    assert Bootstrap().difference(a, b, ("claim", "z")) != fresh
    assert Bootstrap().over_seeds([1.0, 2.0, 4.0], ("s",)) == busy.over_seeds([1.0, 2.0, 4.0], ("s",))


# --- RobustBench entries ------------------------------------------------------------------------


# --- older stores -------------------------------------------------------------------------------


def test_a_store_of_an_earlier_layout_is_refused_in_one_line(grey_root, grey_defense, tmp_path):
    """No migration before a first release: a store whose tables lack a column of this
    version is refused by every reader and writer, in one line, and left as it is."""
    evaluate_protocol(
        grey_defense, EvalConfig(radii_255=(2.0,), steps=2), tmp_path, grey_root, progress=False
    )
    old = tmp_path / "old"
    old.mkdir()
    _downgrade(tmp_path / DB_FILE, old / DB_FILE)
    before = (old / DB_FILE).read_bytes()
    said = r"was written by an earlier version of inres-bench \(.*\): run again with a new --results-dir"
    for read in (
        load_records,
        write_reports,
        lambda r: evaluate_protocol(grey_defense, EvalConfig(), r, grey_root, progress=False),
    ):
        with pytest.raises(UserError, match=said):
            read(old)
    assert (old / DB_FILE).read_bytes() == before


def _downgrade(source: Path, target: Path) -> None:
    """The store as the version before `params` wrote it: alpha_255 and steps columns."""
    columns = [c for c in COLUMNS if c != "params"]
    old_columns = [
        *columns[: columns.index("preset") + 1],
        "alpha_255",
        "steps",
        *columns[columns.index("preset") + 1 :],
    ]
    key = [k if k != "params" else "alpha_255, steps" for k in KEY]
    with sqlite3.connect(source) as new, sqlite3.connect(target) as db:
        db.execute(
            f"CREATE TABLE cells ({', '.join(old_columns)}, correct_bits BLOB NOT NULL, UNIQUE ({', '.join(key)}))"
        )
        rows = new.execute(f"SELECT {', '.join(columns)}, params, correct_bits FROM cells").fetchall()
        for row in rows:
            values = dict(zip([*columns, "params", "correct_bits"], row, strict=True))
            params = json.loads(values.pop("params"))
            values |= {"alpha_255": params.get("alpha_255", 0.0), "steps": params.get("steps", 0)}
            names = [*old_columns, "correct_bits"]
            db.execute(
                f"INSERT INTO cells ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [values[n] for n in names],
            )
        for table in ("runs", "ensemble_members", "checks"):
            db.execute(new.execute("SELECT sql FROM sqlite_master WHERE name = ?", [table]).fetchone()[0])


# --- the data a cell read ------------------------------------------------------------------------


def _copied(grey_root: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(grey_root, tmp_path / "data")
    return tmp_path / "data"


GREY = EvalConfig(radii_255=(2.0,), steps=2)


def test_replaced_test_images_are_measured_again_not_found_cached(grey_root, grey_defense, tmp_path):
    """Black images in the valid format where the test batch was: the cells are measured
    again on them, and the report shows the new numbers and says which images they read."""
    from bench.data.cifar import read_batch, write_batch

    data, results = _copied(grey_root, tmp_path), tmp_path / "r"
    before = evaluate_protocol(grey_defense, GREY, results, data, progress=False)
    assert before.query("perturbation == 'clean'")["accuracy"].item() == 0.7
    batch = data / "cifar-10-batches-py" / "test_batch"
    images, labels = read_batch(batch, "labels", 10)
    write_batch(batch, np.zeros_like(images), labels)
    after = evaluate_protocol(grey_defense, GREY, results, data, progress=False)
    assert (
        len(after) == 2 * len(before) and after["data_sha256"].nunique() == 2 + 8
    )  # 2 test sets, 2 x 4 noise files
    write_reports(results)
    board = pd.read_csv(results / "leaderboard.csv")
    assert board["clean"].item() == 10.0  # the latest data is shown: black images are all of the first class
    from bench.data.splits import images_digest

    black = images_digest(np.zeros_like(images), labels)
    assert (
        f"Test images read (sha256 of images and labels): CIFAR-10: {black[:12]} (every run)."
        in (results / "REPORT.md").read_text()
    )


@pytest.mark.slow
def test_stability_units_are_keyed_by_the_test_images_they_read(grey_root, grey_defense, tmp_path, pipeline):
    """As cells: a unit measured on images since replaced is measured again, not found
    cached, and the report's reduction reads the latest images' units only."""
    from bench.data.cifar import read_batch, write_batch
    from bench.data.splits import images_digest
    from bench.records.load import load_stability
    from bench.records.selection import chosen_units

    data, results = _copied(grey_root, tmp_path), tmp_path / "r"
    stability = {"suite": "smoke", "stages": ("stability",), "device": "cpu", "n_stability": 20}
    pipeline(grey_defense, results, data, progress=False, **stability)
    first = load_stability(results)
    batch = data / "cifar-10-batches-py" / "test_batch"
    images, labels = read_batch(batch, "labels", 10)
    assert set(first["data_sha256"]) == {images_digest(images, labels)} and len(first) == 1
    write_batch(batch, np.zeros_like(images), labels)
    pipeline(grey_defense, results, data, progress=False, **stability)
    pipeline(grey_defense, results, data, progress=False, **stability)  # cached now: no third row
    second = load_stability(results)
    black = images_digest(np.zeros_like(images), labels)
    assert list(second["data_sha256"]) == [images_digest(images, labels), black]
    assert list(chosen_units(second)["data_sha256"]) == [black]


def test_an_overwritten_noise_file_is_measured_again(grey_root, grey_defense, tmp_path):
    data, results = _copied(grey_root, tmp_path), tmp_path / "r"
    before = evaluate_protocol(grey_defense, GREY, results, data, progress=False)
    path = data / "generated" / "CIFAR-10-C" / "shot_noise.npy"
    np.save(path, np.zeros_like(np.load(path)))  # zeros of the right shape
    after = evaluate_protocol(grey_defense, GREY, results, data, progress=False)
    assert len(after) == len(before) + 5  # the five severities of that group alone
    again = after[after.duplicated(["perturbation", "severity", "eps_255"], keep=False)]
    assert set(again["perturbation"]) == {"shot_noise"} and again["data_sha256"].nunique() == 2
