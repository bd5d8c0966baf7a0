"""Figures: each draws from tiny inputs, the landscape is the loss it claims and is drawn
from its records as measured, the figure stage needs only the records and gives the same
bytes twice."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import run_bench
from bench.data.noise import NOISE_GROUPS
from bench.eval import landscape as measuring
from bench.eval.engine import prepared
from bench.eval.protocol import EvalConfig, Subject
from bench.eval.testdata import EvalData
from bench.records.load import load_landscapes
from bench.records.schema import LandscapeConfig
from bench.records.store import RecordStore
from bench.reports import figures, plotting
from bench.reports.plotting import RunFolder, Skipped

PNG, PDF = b"\x89PNG", b"%PDF"


def aggregated_fixture() -> pd.DataFrame:
    rows = []
    for model, base in (("resnet14", 50.0), ("in-resnet14", 55.0)):
        for kind, bonus in (("single", 0.0), ("ensemble", 4.0)):
            metrics = {
                "clean": 80,
                "noise": 60,
                "fgsm@1": 45,
                "fgsm@2": 40,
                "pgd@1": 42,
                "pgd@2": 35,
                "worst@2": 33,
            }
            metrics |= {"autoattack@2": 34, "uniform@2": 70}
            for metric, value in metrics.items():
                rows.append(
                    {
                        "dataset": "synthetic",
                        "model": model,
                        "run": model,
                        "lambda_low": np.nan,
                        "lambda_high": np.nan,
                        "kind": kind,
                        "preset": "paper",
                        "metric": metric,
                        "mean": value + bonus + base - 50,
                        "std": 1.5,
                        "n": 2,
                        "n_test": 100,
                    }
                )
    return pd.DataFrame(rows)


def assert_drawn(figure, name="x"):
    drawn = figures.render(figure, name, "caption")
    assert drawn.files[f"{name}.png"].startswith(PNG) and len(drawn.files[f"{name}.png"]) > 5000
    assert drawn.files[f"{name}.pdf"].startswith(PDF) and len(drawn.files[f"{name}.pdf"]) > 3000


def test_every_figure_draws_from_tiny_inputs():
    aggregated = aggregated_fixture()
    assert_drawn(figures.gain_figure(aggregated, "synthetic"))
    assert_drawn(figures.robustness_figure(aggregated, "synthetic"))
    assert figures.gain_figure(aggregated[aggregated["kind"] == "single"], "synthetic") is None  # no ensemble
    severity = pd.DataFrame(
        [
            {
                "dataset": "synthetic",
                "run": m,
                "model": m,
                "seed": s,
                "group": g,
                "severity": v,
                "value": 60 - 3 * v + s,
            }
            for m in ("resnet14", "in-resnet14")
            for s in (0, 1)
            for g in NOISE_GROUPS
            for v in figures.SEVERITIES
        ]
    )
    assert_drawn(figures.severity_figure(severity, "synthetic"))
    coefficients = pd.DataFrame(
        [
            {
                "dataset": "cifar10",
                "run": "in-resnet110",
                "model": "in-resnet110",
                "lambda_low": 0.2,
                "lambda_high": 0.25,
                "seed": s,
                "block": b,
                "coefficient": c,
            }
            for s in (0, 1)
            for b, c in enumerate((0.0, 0.3, 1.2, 0.005), start=1)
        ]
    )
    assert_drawn(plotting.coefficients_figure(coefficients, pd.read_csv(plotting.PUBLISHED)))
    assert_drawn(plotting.coefficients_figure(coefficients, None))
    grid = np.linspace(-2, 2, 5)
    panels = [
        (name, grid, np.random.default_rng(1).random((5, 5)), np.zeros((5, 5), int)) for name in ("A", "B")
    ]
    assert_drawn(figures.landscape_figure([("image 2", 3, panels), ("image 7", 1, panels)]))
    training = pd.DataFrame(
        [
            {
                "dataset": "synthetic",
                "run": m,
                "model": m,
                "seed": s,
                "epoch": e,
                "train_loss": 2.0 / e,
                "test_accuracy": 30.0 + e,
                "coefficient_p10": c and 0.2,
                "coefficient_median": c and 0.25 + 0.01 * e,
                "coefficient_p90": c and 0.3,
            }
            for m, c in (("resnet14", None), ("in-resnet14", 1))
            for s in (0, 1)
            for e in (1, 2, 3)
        ]
    ).astype({"coefficient_p10": float, "coefficient_median": float, "coefficient_p90": float})
    assert_drawn(figures.training_figure(training, "synthetic"))
    assert figures.training_figure(training, "cifar10") is None


def test_rendering_is_deterministic():
    first = figures.render(figures.robustness_figure(aggregated_fixture(), "synthetic"), "r", "c").files
    second = figures.render(figures.robustness_figure(aggregated_fixture(), "synthetic"), "r", "c").files
    assert first == second


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_the_landscape_is_the_loss_at_each_grid_point_and_its_directions_are_orthogonal():
    model, x, y = (
        Linear(),
        torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
        torch.tensor([4]),
    )
    d_fgsm, d_orth = measuring.directions(model, x, y, seed=5)
    assert d_fgsm.abs().max() == d_orth.abs().max() == 1  # the same L-infinity norm
    assert abs(float((d_fgsm * d_orth).sum())) < 1e-3  # orthogonal
    offsets, loss, classes = measuring.landscape(model, x, y, d_fgsm, d_orth, radius=6.0, points=7, batch=5)
    assert list(offsets) == [-6, -4, -2, 0, 2, 4, 6]
    for i, j in ((0, 0), (3, 3), (6, 1), (2, 5)):
        point = (x + offsets[i] / 255 * d_fgsm + offsets[j] / 255 * d_orth).clamp(0, 1)
        with torch.no_grad():
            logits = model(point)
        assert loss[i, j] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
        assert classes[i, j] == int(logits.argmax())


def test_fig2_is_drawn_from_the_landscapes_recorded_as_measured(grey_root, grey_defense, tmp_path):
    """The stability stage's measurement (bench.eval.landscape), recorded and read back,
    holds exactly the grid a direct computation gives; the figure draws those values
    from the records, with no network and no data."""
    config, setting = LandscapeConfig(index=33, points=5, radius=4.0), EvalConfig()
    data = EvalData("cifar10", grey_root, setting)
    plain, interpolated = (Subject(grey_defense, model, model, 0) for model in ("resnet14", "in-resnet14"))
    store = RecordStore(tmp_path)
    for subject in (plain, interpolated):
        (done,) = measuring.measure_landscapes(
            subject, setting, data, config, measuring.images_of(data, config)
        )
        store.add_landscape(done.row, done.loss, done.classes)
    net = prepared(grey_defense.model, setting)
    x = torch.from_numpy(np.array(data.test.images[33:34])).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor([int(data.test.labels[33])])
    _, loss, classes = measuring.landscape(net, x, y, *measuring.directions(net, x, y, 0), 4.0, 5)
    runs = pd.DataFrame(
        {
            "run": ["resnet14", "in-resnet14"],
            "dataset": "cifar10",
            "seed": 0,
            "status": "finished",
            "checkpoint_sha256": grey_defense.info.checkpoint_sha256,
        }
    )
    recorded = load_landscapes(tmp_path, runs)
    assert (
        len(recorded) == 2
        and set(recorded["image_group"]) == {"clean"}
        and set(recorded["image_row"]) == {33}
    )
    for row in recorded.itertuples():
        assert np.array_equal(row.loss, loss.astype(np.float32)) and np.array_equal(row.classes, classes)
        assert (row.label, row.right, row.points, row.eps_255) == (int(y), int(net(x).argmax() == y), 5, 4.0)
    folders = [
        RunFolder("cifar10", run, model, 0, None, (), None)
        for run, model in (("resnet14", "resnet14"), ("in-resnet14", "in-resnet14"))
    ]
    (drawn,) = figures.landscape_figures(recorded, config, folders)
    assert drawn.name == "fig2_landscape" and "(1) clean test image 33: " in drawn.caption
    (skipped,) = figures.landscape_figures(recorded, LandscapeConfig(index=33, points=7, radius=4.0), folders)
    assert isinstance(skipped, Skipped) and skipped.reason == (
        "no landscape of resnet14 and in-resnet14 recorded on this grid (7 points, radius 4/255): the stability stage records it"
    )


@pytest.mark.slow
def test_the_figure_stage_needs_only_the_records_and_repeats_itself(smoke_run, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(smoke_run[0], results)
    shutil.rmtree(results / "figures")
    empty = tmp_path / "no-data"
    empty.mkdir()
    argv = ["--stage", "figures", "--results-dir", str(results), "--data-dir", str(empty)]

    def no_forward(*args, **kwargs):
        raise AssertionError("a network ran in the report stage")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nn.Module, "__call__", no_forward)  # the figures read records only: no forward pass
        assert run_bench.main(argv) == 0
    drawn = {p.name: p.read_bytes() for p in (results / "figures").iterdir()}
    stems = (
        "coefficients_other",
        "fig3_ensemble_gain_synthetic",
        "robustness_synthetic",
        "severity_synthetic",
        "training_synthetic",
        "stability_growth_synthetic",
        "stability_spectral_synthetic",
        "fig2_landscape",
    )
    assert set(drawn) == {
        f"{stem}.{fmt}" for stem in stems for fmt in ("png", "pdf")
    }  # no data: Fig. 2 from its records
    assert run_bench.main(argv) == 0
    assert {p.name: p.read_bytes() for p in (results / "figures").iterdir()} == drawn
    report = (smoke_run[0] / "REPORT.md").read_text()
    assert (
        "![fig2_landscape](figures/fig2_landscape.png)" in report
        and "each model along its own FGSM direction" in report
    )
    assert (
        "- fig1_coefficients skipped: no finished run of In-ResNet-110 on CIFAR-10 and In-ResNet-164"
        in report
    )
    assert "![coefficients_other](figures/coefficients_other.png)" in report
    assert "![training_synthetic](figures/training_synthetic.png)" in report
    assert "![stability_growth_synthetic](figures/stability_growth_synthetic.png)" in report
    assert "on 10 class-balanced test images" in report and "at 2/255" in report  # the stability captions
