"""Training: recipes, augmentation, learning, bit-identical resume, failure detection."""

import hashlib
import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from bench.core.files import sha256_file
from bench.data.splits import load_train
from bench.eval.adapters import zoo_defense
from bench.train import loop as training
from bench.train.epoch import augment, make_optimizer
from bench.train.loop import train
from bench.train.recipes import AUTHORS_CODE_STD, Recipe, TrainConfig, preset_model_options, recipe_for
from models import CIFAR10_MEAN, UserError, create_model, model_entry


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The synthetic set, made once for this module."""
    from bench.data.splits import load_test

    root = tmp_path_factory.mktemp("data")
    load_test("synthetic", root)
    return root


def tiny(**kw) -> TrainConfig:
    return TrainConfig(
        **{"model": "resnet8", "dataset": "synthetic", "seed": 0, "length": "smoke", "n_train": 1024, **kw}
    )


def weights(folder):
    return torch.load(folder / "weights.pt", weights_only=True)


# --- recipes ----------------------------------------------------------------------------------


def test_paper_recipes_and_presets():
    assert recipe_for("preact-resnet", "cifar10") == Recipe(160, 0.1, (80, 120), 1e-4)
    assert recipe_for("preact-resnet", "cifar100") == Recipe(300, 0.1, (150, 225), 1e-4)
    assert recipe_for("resnext", "cifar10") == Recipe(300, 0.05, (150, 225), 5e-4)
    released = recipe_for("preact-resnet", "cifar10", "authors-code")
    assert (released.pad, released.pad_mode, released.epochs) == (2, "reflect", 160)
    release = {"mean": CIFAR10_MEAN, "std": AUTHORS_CODE_STD}
    assert preset_model_options("authors-code", model_entry("in-resnet110")) == {
        **release,
        "network": "release",
    }
    assert (
        preset_model_options("authors-code", model_entry("resnext29-8x64d")) == release
    )  # the release has no ResNeXt
    assert preset_model_options("paper", model_entry("in-resnet110")) == {}
    quick = recipe_for("preact-resnet", "cifar10", length="quick")
    assert (quick.epochs, quick.milestones) == (32, (16, 24))  # same fractions: 1/2, 3/4
    assert recipe_for("resnext", "cifar100", length="smoke").milestones == (1, 2)
    with pytest.raises(UserError, match="unknown preset 'robust'"):
        recipe_for("resnext", "cifar10", "robust")


def test_learning_rate_at_the_milestones():
    recipe = recipe_for("preact-resnet", "cifar10")
    assert [recipe.lr_at(e) for e in (0, 79, 80, 119, 120, 159)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


# --- augmentation -----------------------------------------------------------------------------


def test_crop_and_flip_are_one_gather():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    unit = x.float() / 255
    recipe = Recipe(1, 0.1, (), 0.0)  # pad 4, zeros
    dx, dy, no = torch.tensor([4, 0, 8]), torch.tensor([4, 0, 2]), torch.zeros(3, dtype=torch.bool)
    out = augment(x, dx, dy, no, recipe)
    assert torch.equal(out[0], unit[0])  # centred window: the image itself
    assert torch.equal(out[1, :, 4:, 4:], unit[1, :, :28, :28]) and out[1, :, :4].abs().sum() == 0
    assert torch.equal(out[2, :, 2:, :28], unit[2, :, :30, 4:]) and out[2, :, :2].abs().sum() == 0
    assert out[2, :, :, 28:].abs().sum() == 0  # window past the right edge: padding
    flipped = augment(x, dx, dy, torch.tensor([True, False, False]), recipe)
    assert torch.equal(flipped[0], unit[0].flip(-1))
    reflect = augment(
        x, dx.new_tensor([0, 4, 4]), dy.new_tensor([0, 4, 4]), no, replace(recipe, pad_mode="reflect")
    )
    assert torch.equal(reflect[0, :, 4:, 4:], unit[0, :, :28, :28])
    assert torch.equal(reflect[0, :, 0, 4:], unit[0, :, 4, :28])  # row -4 mirrors row 4


# --- runs -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_bits_and_complete_metadata(tmp_path, data_dir):
    a = train(tiny(), tmp_path / "a", data_dir, progress=False)
    train(tiny(), tmp_path / "b", data_dir, progress=False)
    folder_a = tmp_path / "a" / "checkpoints" / "synthetic" / "resnet8@smoke@n1024" / "seed0"
    folder_b = tmp_path / "b" / "checkpoints" / "synthetic" / "resnet8@smoke@n1024" / "seed0"
    assert sha256_file(folder_a / "weights.pt") == sha256_file(folder_b / "weights.pt")
    meta = json.loads((folder_a / "meta.json").read_text())
    assert meta == a
    assert meta["sha256"] == sha256_file(folder_a / "weights.pt")
    assert (meta["model"], meta["tag"], meta["status"], meta["epochs_done"]) == (
        "resnet8",
        "resnet8@smoke@n1024",
        "finished",
        2,
    )
    assert meta["recipe"]["milestones"] == [1, 2] and meta["preset"] == "paper"
    assert set(meta["versions"]) == {"python", "torch", "torchvision", "numpy"} and meta["device"].startswith(
        "cpu"
    )
    assert meta["flags"] == {"channels_last": True, "bf16": False, "compile": False}
    assert 0 <= meta["test_accuracy"] <= 1 and meta["wall_seconds"] > 0
    images = load_train("synthetic", data_dir)
    digest = hashlib.sha256(images.images[:1024].tobytes() + images.labels[:1024].tobytes()).hexdigest()
    assert meta["data"] == {"source": "synthetic", "images": 1024, "sha256": digest}  # where it learnt from
    assert not (folder_a / "state.pt").exists() and "epoch 2/2" in (folder_a / "train.log").read_text()
    assert (meta["lambda_storage"], meta["model_kwargs"]["network"]) == ("-", "paper")
    log = pd.read_csv(folder_a / "epochs.csv")  # a ResNet has no λ: no coefficient columns
    assert list(log.columns) == ["epoch", "lr", "train_loss", "train_accuracy", "test_accuracy", "seconds"]
    defense = zoo_defense("resnet8@smoke@n1024", "synthetic", 0, tmp_path / "a")
    assert defense.info.checkpoint_sha256 == meta["sha256"]


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tmp_path, data_dir, monkeypatch):
    reference = train(tiny(), tmp_path / "straight", data_dir, progress=False)
    real_epoch, calls = training.train_epoch, []

    def dies_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-epoch: epoch 1 committed, epoch 2 lost
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), tmp_path / "killed", data_dir, progress=False)
    folder = tmp_path / "killed" / "checkpoints" / "synthetic" / "resnet8@smoke@n1024" / "seed0"
    assert json.loads((folder / "meta.json").read_text())["status"] == "running"
    with pytest.raises(UserError, match="is 'running', not a finished run"):
        zoo_defense("resnet8@smoke@n1024", "synthetic", 0, tmp_path / "killed")
    resumed = train(tiny(), tmp_path / "killed", data_dir, progress=False)
    assert len(calls) == 3  # only the lost epoch ran again
    assert resumed["sha256"] == reference["sha256"]
    straight = weights(tmp_path / "straight" / "checkpoints" / "synthetic" / "resnet8@smoke@n1024" / "seed0")
    assert all(torch.equal(straight[k], v) for k, v in weights(folder).items())
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    logs = [
        pd.read_csv(f / "epochs.csv")
        for f in (folder, tmp_path / "straight" / folder.relative_to(tmp_path / "killed"))
    ]
    volatile = ["seconds"]
    assert logs[0].drop(columns=volatile).equals(logs[1].drop(columns=volatile))  # the resumed log is whole


@pytest.mark.slow
def test_finished_runs_are_not_trained_again(tmp_path, data_dir, monkeypatch):
    first = train(tiny(), tmp_path, data_dir, progress=False)
    monkeypatch.setattr(training, "train_epoch", lambda *a, **k: pytest.fail("trained again"))
    assert (
        train(tiny(), tmp_path, data_dir, progress=False)["sha256"]
        == json.loads(
            (
                tmp_path / "checkpoints" / "synthetic" / "resnet8@smoke@n1024" / "seed0" / "meta.json"
            ).read_text()
        )["sha256"]
    )
    assert first["status"] == "finished"


@pytest.mark.slow
def test_a_different_recipe_in_the_same_folder_is_refused(tmp_path, data_dir, monkeypatch):
    train(tiny(), tmp_path, data_dir, progress=False)
    monkeypatch.setattr(training, "recipe_for", lambda *a: Recipe(2, 0.5, (1,), 0.0))
    with pytest.raises(UserError, match="holds a run with another recipe"):
        train(tiny(), tmp_path, data_dir, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "lr, reason",
    [
        # step 1's update (lr inf) breaks the weights: step 2's loss is the first non-finite one
        (float("inf"), "non-finite loss in epoch 1, step 2 of 8: first non-finite: parameter conv1.weight"),
        (0.0, r"test accuracy 0\.\d+ at chance level"),
    ],
)
def test_diverged_and_chance_runs_are_failed(tmp_path, data_dir, monkeypatch, lr, reason):
    monkeypatch.setattr(training, "recipe_for", lambda *a: Recipe(2, lr, (1,), 0.0))
    meta = train(tiny(), tmp_path, data_dir, progress=False)
    assert meta["status"] == "failed"
    assert __import__("re").fullmatch(reason, meta["reason"])
    with pytest.raises(UserError, match="is 'failed', not a finished run"):
        zoo_defense("resnet8@smoke@n1024", "synthetic", 0, tmp_path)


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_step_and_names_the_first_nonfinite_activation(
    tmp_path, data_dir, monkeypatch, caplog
):
    """From the 7th step on (epoch 2, step 3), the second damped block's skip returns NaN:
    training stops at that step, before its update, says where, and is recorded as failed."""
    from models.skip import SkipRule

    real_skip, real_loss, losses = SkipRule.forward, torch.nn.functional.cross_entropy, []

    def skip(self, x, fx):
        out = real_skip(self, x, fx)
        return out * float("nan") if getattr(self, "poisoned", False) and len(losses) >= 6 else out

    def loss(logits, labels):
        losses.append(1)
        return real_loss(logits, labels)

    def build(config):
        model = real_build(config)
        model.damped_skips()[1].poisoned = True  # layer2.1's; the diagnosis's copy keeps the mark
        return model

    real_build = training._build
    monkeypatch.setattr(SkipRule, "forward", skip)
    monkeypatch.setattr("bench.train.epoch.F.cross_entropy", loss)
    monkeypatch.setattr(training, "_build", build)
    with caplog.at_level("INFO", logger="bench.train.loop"):
        meta = train(tiny(model="in-resnet14", n_train=512), tmp_path, data_dir, progress=False)
    assert meta["status"] == "failed" and meta["epochs_done"] == 1
    assert meta["reason"] == (  # the BN statistics that step's forward folded NaN into are named after it
        "non-finite loss in epoch 2, step 3 of 4: first non-finite: the output of layer2.1.skip (SkipRule)"
    )
    assert len(losses) == 7  # 4 + 3: nothing trained after the first non-finite loss
    line = next(r.message for r in caplog.records if "failed" in r.message)
    assert line.startswith(
        "in-resnet14@smoke@n512 synthetic seed 0: failed (non-finite loss in epoch 2, step 3 of 4"
    )
    folder = tmp_path / "checkpoints" / "synthetic" / "in-resnet14@smoke@n512" / "seed0"
    assert pd.read_csv(folder / "epochs.csv")["epoch"].tolist() == [1] and not (folder / "state.pt").exists()


@pytest.mark.slow
def test_a_saved_state_that_is_not_finite_is_never_resumed(tmp_path, data_dir, monkeypatch):
    real_epoch, calls = training.train_epoch, []

    def dies_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), tmp_path, data_dir, progress=False)
    folder = tmp_path / "checkpoints" / "synthetic" / "resnet8@smoke@n1024" / "seed0"
    state = torch.load(folder / "state.pt", weights_only=True)
    state["model"]["layer1.0.conv2.weight"][0, 0, 0, 0] = float("inf")
    torch.save(state, folder / "state.pt")
    meta = train(tiny(), tmp_path, data_dir, progress=False)
    assert len(calls) == 2  # no epoch trained on from it
    assert (meta["status"], meta["reason"]) == (
        "failed",
        "the saved state after epoch 1 holds a non-finite parameter layer1.0.conv2.weight: not resumed",
    )


@pytest.mark.slow
def test_a_tiny_model_learns_the_synthetic_set(tmp_path, data_dir):
    meta = train(tiny(n_train=5000), tmp_path, data_dir, progress=False)
    assert meta["status"] == "finished" and meta["test_accuracy"] >= 0.4  # chance: 0.1


def test_tags_name_every_weight_changing_option():
    assert tiny().run_tag == "resnet8@smoke@n1024"
    assert TrainConfig("in-resnet110", "cifar10", 0).run_tag == "in-resnet110"
    assert TrainConfig(
        "in-resnet110", "cifar10", 0, preset="authors-code", lambda_init=(0.3, 0.4)
    ).run_tag == ("in-resnet110@authors-code@lambda0.3-0.4")


@pytest.mark.slow
def test_unreadable_metadata_is_one_line(tmp_path, data_dir):
    train(tiny(), tmp_path, data_dir, progress=False)
    meta = tmp_path / "checkpoints" / "synthetic" / "resnet8@smoke@n1024" / "seed0" / "meta.json"
    meta.write_text("{half")
    with pytest.raises(UserError, match="meta.json is not valid checkpoint metadata"):
        train(tiny(), tmp_path, data_dir, progress=False)


@pytest.mark.slow
def test_a_broken_state_file_is_one_line(tmp_path, data_dir):
    folder = tmp_path / "checkpoints" / "synthetic" / "resnet8@smoke@n1024" / "seed0"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"")
    with pytest.raises(UserError) as err:
        train(tiny(), tmp_path, data_dir, progress=False)
    said = str(err.value)
    assert all(p in said for p in (str(folder / "state.pt"), "empty or truncated", "delete it to restart"))
    other = create_model("resnet14")
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    torch.save(
        {"model": other.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "wall": 1.0},
        folder / "state.pt",
    )
    with pytest.raises(UserError) as err:
        train(tiny(), tmp_path, data_dir, progress=False)
    assert "\n" not in str(err.value) and str(err.value).startswith(
        f"cannot resume from {folder / 'state.pt'} (it holds another model: unexpected keys layer1.1.bn1.weight,"
    )


# --- the training log, the parametrisation in the metadata --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["in-resnet14", "in-resnet-gating14"])
def test_each_epoch_is_logged_with_its_coefficients(tmp_path, data_dir, model):
    meta = train(tiny(model=model, n_train=256), tmp_path, data_dir, progress=False)
    folder = tmp_path / "checkpoints" / "synthetic" / f"{model}@smoke@n256" / "seed0"
    log = pd.read_csv(folder / "epochs.csv")
    base = ["epoch", "lr", "train_loss", "train_accuracy", "test_accuracy", "seconds"]
    per_block = ["coefficient_1", "coefficient_2", "coefficient_3"]
    if model == "in-resnet-gating14":  # input-dependent: min / median / max over test images
        per_block = [f"{c}_{stat}" for c in per_block for stat in ("min", "median", "max")]
    assert list(log.columns) == base + per_block
    assert log["epoch"].tolist() == [1, 2] and log["lr"].tolist() == [0.1, 0.01]  # smoke: milestones 1, 2
    assert all(pd.api.types.is_numeric_dtype(log[c]) for c in log.columns)
    assert (
        log["test_accuracy"].iloc[-1] == meta["test_accuracy"]
    )  # the final weights' accuracy, measured once
    assert (log["seconds"] > 0).all() and meta["wall_seconds"] == pytest.approx(
        log["seconds"].sum(), abs=0.01
    )
    if model == "in-resnet14":
        assert log[per_block].iloc[-1].tolist() == meta["interpolation_coefficients"]
        assert meta["lambda_storage"] == "k = 1 - λ" and meta["model_kwargs"]["network"] == "paper"
    else:
        assert (log["coefficient_1_min"] <= log["coefficient_1_median"]).all()
        assert (log["coefficient_1_median"] <= log["coefficient_1_max"]).all()


@pytest.mark.slow
def test_a_checkpoint_of_the_old_parametrisation_is_refused_in_one_line(tmp_path, data_dir):
    """Checkpoints written before λ's storage was recorded stored λ itself for every rule: an
    In-ResNet one trained with decay pulling λ toward 0 and is refused for the new run (by
    training and the adapter); a λ-In-ResNet one stored the same λ and stays valid, but not
    as the authors-code network, which it was not."""
    from bench.eval.adapters import zoo_defense
    from bench.records.checkpoints import build_mismatch

    legacy = {}
    for model in ("in-resnet14", "lambda-in-resnet14"):
        train(tiny(model=model), tmp_path, data_dir, progress=False)
        meta_path = tmp_path / "checkpoints" / "synthetic" / f"{model}@smoke@n1024" / "seed0" / "meta.json"
        legacy[model] = json.loads(meta_path.read_text())
        del legacy[model]["lambda_storage"], legacy[model]["model_kwargs"]["network"]
        meta_path.write_text(json.dumps(legacy[model]))
    assert train(tiny(model="lambda-in-resnet14"), tmp_path, data_dir, progress=False)["status"] == "finished"
    zoo_defense("lambda-in-resnet14@smoke@n1024", "synthetic", 0, tmp_path)
    expected = (
        r"holds a checkpoint of another build of in-resnet14: λ trained as λ \(now as k = 1 - λ, as the "
        r"authors' release: weight decay pulled λ the other way\); delete the folder to train it anew"
    )
    with pytest.raises(UserError, match=expected) as err:
        train(tiny(model="in-resnet14"), tmp_path, data_dir, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=expected):
        zoo_defense("in-resnet14@smoke@n1024", "synthetic", 0, tmp_path)
    import run_bench

    argv = [
        "--models",
        "in-resnet14",
        "--seeds",
        "0",
        "--n-train",
        "1024",
        "--stage",
        "eval",
        "--no-progress",
        "--results-dir",
        str(tmp_path),
        "--data-dir",
        str(data_dir),
    ]
    assert run_bench.main(argv) == 2  # the evaluation refuses it before any work
    assert not (tmp_path / "records.sqlite").exists()
    release = training.planned_info("lambda-in-resnet14", "synthetic", "authors-code", None)
    assert build_mismatch(legacy["lambda-in-resnet14"], release) == (
        "std [0.247, 0.2435, 0.2616] (now [0.2023, 0.1994, 0.201]); network 'paper' (now 'release')"
    )


# --- Table 4's gating variants under the paper's recipe -----------------------------------------


def first_losses(
    name: str, seed: int, data_dir, steps: int = 20, blown: float = 1000.0
) -> tuple[list[float], float]:
    """The losses of `name`'s first `steps` steps under the paper's recipe (SGD, lr 0.1 from
    the first step, momentum 0.9, weight decay 1e-4, batch 128, crop and flip) on the
    synthetic set, and its gates' largest |weight| at the end; stops at a non-finite loss
    or once a gate weight passes `blown` (they start at 0)."""
    recipe = recipe_for("preact-resnet", "cifar10")
    train_set = load_train("synthetic", data_dir)
    torch.manual_seed(seed)
    model = create_model(name).train()
    optimizer = make_optimizer(model, recipe, "cpu")
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.1
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(train_set.images).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(train_set.labels)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(y_all), (recipe.batch_size,), generator=generator)
        shifts = torch.randint(0, 2 * recipe.pad + 1, (2, recipe.batch_size), generator=generator)
        flips = torch.rand(recipe.batch_size, generator=generator) < 0.5
        loss = torch.nn.functional.cross_entropy(
            model(augment(x_all[idx], *shifts, flips, recipe)), y_all[idx]
        )
        losses.append(loss.item())
        if not torch.isfinite(loss):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if gate_weight(model) > blown:
            break
    return losses, gate_weight(model)


def gate_weight(model) -> float:
    return max(s.gate.weight.abs().max().item() for s in model.damped_skips())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_gating_variants_at_depth_110_under_the_papers_recipe(seed, data_dir):
    """In-ResNet-gating-sig-110 (He et al.'s gate on the standardised input) trains at lr 0.1
    without warm-up: every loss finite, the last five lower than the first five. The ReLU
    gate does not, which is why the plan refuses In-ResNet-gating-110: within 20 steps its
    loss is not finite or its gate weights have passed 1,000 (they start at 0)."""
    losses, gate = first_losses("in-resnet-gating-sig110", seed, data_dir)
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert gate < 20
    relu_losses, relu_gate = first_losses("in-resnet-gating110", seed, data_dir)
    assert not math.isfinite(relu_losses[-1]) or relu_gate > 1000, (relu_losses, relu_gate)
