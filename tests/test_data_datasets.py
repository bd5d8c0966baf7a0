"""The data set registry: one entry (plus a loader) is all a new data set needs.

A test-only data set of another size and class count (3 x 16 x 16, 4 classes) is
registered here and goes through training, evaluation, the sanity checks and every report.
"""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import run_bench
from bench.data import datasets
from bench.data.cifar import ImageSet
from bench.data.datasets import (
    CIFAR10,
    DatasetInfo,
    dataset_info,
    load_split,
    paper_datasets,
    register_dataset,
)
from bench.data.noise_files import load_noise
from bench.data.splits import load_test, load_train
from bench.data.synthetic import draw, make_synthetic
from bench.eval.adapters import module_defense, state_dict_defense
from bench.records.checkpoints import dataset_defaults
from bench.train import recipes
from bench.train.epoch import augment
from models import UserError, create_model

TINY_SIZES = (384, 48)  # (train, test) images


def load_tiny(info: DatasetInfo, split: str, data_dir) -> ImageSet:
    """A loader of the simplest kind: arrays made in memory, the same for every call."""
    n_train, n_test = info.sizes
    rng = np.random.default_rng(11)
    train, test = draw(n_train, rng, 16, 4), draw(n_test, rng, 16, 4)
    images, labels = train if split == "train" else test
    return ImageSet(images, labels, info.name, official=False)


TINY = DatasetInfo(
    name="tiny16",
    label="Tiny-16",
    num_classes=4,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    image_size=(16, 16),
    load=load_tiny,
    sizes=TINY_SIZES,
)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(datasets.DATASETS, TINY.name, TINY)
    return TINY


def test_the_registry_answers_every_question_about_a_data_set():
    assert paper_datasets() == ("cifar10", "cifar100")
    assert dataset_info("cifar100").num_classes == 100 and dataset_info("cifar100").label == "CIFAR-100"
    assert dataset_info("synthetic").recipe == "cifar10" and dataset_info("synthetic").synthetic
    assert CIFAR10.input_shape == (3, 32, 32)
    assert dataset_info("synthetic").not_compared() == "synthetic data" and CIFAR10.not_compared() == ""
    assert dataset_defaults("cifar100") == {
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    }
    with pytest.raises(UserError, match="unknown dataset 'svhn'; choose one of cifar10, cifar100, synthetic"):
        dataset_info("svhn")
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset(CIFAR10)
    assert replace(TINY, noise_folder="").noise_folder == "tiny16-C"  # generated groups get their own folder


def test_a_new_data_set_is_loaded_augmented_and_noised_at_its_own_size(tiny, tmp_path):
    train, test = load_train("tiny16", tmp_path), load_test("tiny16", tmp_path)
    assert train.images.shape == (384, 16, 16, 3) and test.images.shape == (48, 16, 16, 3)
    assert set(np.unique(test.labels)) == {0, 1, 2, 3}
    assert recipes.recipe_for("preact-resnet", "tiny16", length="smoke").epochs == 2  # CIFAR-10's recipe
    x = torch.from_numpy(train.images[:8]).permute(0, 3, 1, 2)
    zero = torch.zeros(8, dtype=torch.long)
    recipe = recipes.recipe_for("preact-resnet", "tiny16")
    out = augment(x, zero + recipe.pad, zero + recipe.pad, zero.bool(), recipe)  # the centre crop: the image
    assert out.shape == (8, 3, 16, 16) and torch.equal(out, x.float() / 255)
    group = load_noise("tiny16", "gaussian_noise", tmp_path, "generated", test=test)
    assert group.images.shape == (5 * 48, 16, 16, 3)
    assert (tmp_path / "generated" / "tiny16-C" / "gaussian_noise.npy").is_file()


def test_the_cifar_format_reader_takes_the_size_from_the_entry(tmp_path):
    """A data set stored in the CIFAR python format at 16 x 16 needs no loader of its own."""
    info = replace(
        datasets.SYNTHETIC,
        name="synthetic16",
        folder="s16",
        image_size=(16, 16),
        make=lambda folder: make_synthetic(folder, n_train=50, n_test=20, size=16),
    )
    test = load_split(info, "test", tmp_path)
    assert test.images.shape == (20, 16, 16, 3) and test.dataset == "synthetic16"
    with pytest.raises(UserError, match=r"'data' must be uint8 of shape \(n, 3072\), got \(20, 768\)"):
        load_split(replace(info, image_size=(32, 32)), "test", tmp_path)


def test_a_defense_is_checked_at_its_data_sets_input_size(tiny, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(create_model("resnet8", **dataset_defaults("tiny16")).state_dict(), weights)
    defense = state_dict_defense("resnet8", weights, dataset="tiny16")
    assert defense.info.num_classes == 4 and defense.model.normalize.mean.flatten().tolist() == [
        0.5,
        0.5,
        0.5,
    ]
    torch.save({}, tmp_path / "none.pt")
    identity = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    assert (
        module_defense(
            "by-width", ByWidth, tmp_path / "none.pt", dataset="tiny16", **identity
        ).info.num_classes
        == 4
    )
    with pytest.raises(
        UserError,
        match=r"returns \(2, 8\) torch.float32 for a 2x3x32x32 batch of \[0, 1\] images; expected finite "
        r"floating-point \(2, 10\) logits",
    ):
        module_defense("by-width", ByWidth, tmp_path / "none.pt", dataset="cifar10", **identity)


class ByWidth(torch.nn.Module):
    """Logits for width / 4 classes: right for 16 x 16 images with 4 classes only."""

    def forward(self, x):
        return x.mean(dim=(1, 2))[:, : x.shape[-1] // 4]


@pytest.mark.slow
def test_a_new_data_set_trains_evaluates_and_reports_end_to_end(tiny, tmp_path):
    results = tmp_path / "results"
    code = run_bench.main(
        [
            "--datasets",
            "tiny16",
            "--models",
            "resnet14,in-resnet14",
            "--seeds",
            "0",
            "--radii",
            "2",
            "--steps",
            "3",
            "--n-test",
            "40",
            "--no-progress",
            "--results-dir",
            str(results),
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    assert code == 0
    records = pd.read_csv(results / "records.csv")
    assert set(records["dataset"]) == {"tiny16"} and set(records["data_source"]) == {"tiny16"}
    assert (records.loc[records["perturbation"] == "clean", "n"] == 40).all()
    assert records["accuracy"].between(0, 1).all() and len(records) > 0
    assert set(records["model"]) == {"resnet14", "in-resnet14"}
    table1 = (results / "tables" / "table1.md").read_text()
    assert "| Tiny-16     | ResNet-14    |" in table1 and "| Tiny-16     | In-ResNet-14 |" in table1
    assert "CIFAR" not in table1  # no CIFAR record: the paper's rows are not shown
    report = (results / "REPORT.md").read_text()
    assert "Tiny-16: tiny16" in report
    claim = next(
        line for line in report.splitlines() if line.startswith("| In-ResNet-14 beats ResNet-14 on the noise")
    )
    cells = [c.strip() for c in claim.strip("|").split("|")]
    assert (
        cells[1:3] == ["1", "Tiny-16"]
        and cells[5] == "not comparable with the paper (tiny16 is not in the paper)"
    )
    board = pd.read_csv(results / "leaderboard.csv")
    assert set(board["dataset"]) == {"tiny16"} and len(board) == 2
