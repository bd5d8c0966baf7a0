"""Training with the paper's recipe: resumable, deterministic on CPU, fast on a GPU.

The whole training set sits on the device as uint8; each epoch's order, crops and flips
come from a generator seeded by (seed, epoch), and crop + flip are one gather on the
device, so there is no DataLoader and a resumed run replays exactly what it missed.
After every epoch one file, `state.pt` (weights, optimiser, epoch), is replaced
atomically: it is the commit point. `weights.pt` and `meta.json` beside it are rewritten
from it (status "running"); at the end they hold the final-epoch weights (under preset
release-2020-06 those of the epoch with the best test accuracy, as the release's June 2020
train.py keeps) with status "finished", or "failed" with the reason (non-finite loss, or
chance-level accuracy).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from bench.core.environment import device_name
from bench.core.files import atomic_write, check_file_target, check_not_link
from bench.core.messages import reason as error_reason
from bench.core.presets import BEST_TEST, preset
from bench.core.weights import describe_mismatch
from bench.data.cifar import ImageSet
from bench.data.noise_files import clean_source
from bench.data.splits import batches, images_digest, load_test, load_train
from bench.records.checkpoints import (
    EPOCHS_FILE,
    GATE_IMAGES,
    LOG_FILE,
    META_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    check_build,
    check_identity,
    check_weights,
    dataset_defaults,
    read_meta,
    save_zoo_checkpoint,
    zoo_checkpoint_dir,
)
from bench.train.epoch import (
    Diverged,
    epoch_generator,
    make_optimizer,
    nonfinite_tensor,
    test_accuracy,
    train_epoch,
)
from bench.train.recipes import (
    REHEARSAL,
    Recipe,
    TrainConfig,
    preset_model_options,
    recipe_for,
    training_test_images,
)
from models import InterpolatedNet, ModelInfo, UserError, create_model, model_entry
from models.skip import uses_lambda

log = logging.getLogger(__name__)
CHANCE_FACTOR = 1.5  # final test accuracy below 1.5 / classes counts as a failed run


def train(
    config: TrainConfig,
    results_dir: str | os.PathLike = "results",
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume, or skip when done) one run; returns its metadata."""
    folder = zoo_checkpoint_dir(results_dir, config.dataset, config.run_tag, config.seed)
    recipe = recipe_for(model_entry(config.model).family, config.dataset, config.preset, config.length)
    done = _finished_meta(folder, recipe, config)
    if done is not None:
        log.info(
            "%s %s seed %d: %s already (%s)",
            config.run_tag,
            config.dataset,
            config.seed,
            done["status"],
            folder,
        )
        return done
    model = _build(config)
    check_not_link(folder / LOG_FILE)
    handler = logging.FileHandler(_writable(folder) / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # the run's log file gets every epoch, whatever the console shows
    try:
        return _run(_Run(config, recipe, model, folder), data_dir, progress)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


@dataclass(frozen=True)
class _Run:
    """What a training run's saves and its end write: its config, recipe, network and folder."""

    config: TrainConfig
    recipe: Recipe
    model: InterpolatedNet
    folder: Path


def _run(run: _Run, data_dir: str | os.PathLike | None, progress: bool) -> dict:
    config, recipe, model, folder = run.config, run.recipe, run.model, run.folder
    device = torch.device(config.device)
    optimizer = make_optimizer(model, recipe, config.device)
    start, wall, epochs, best = _resume(folder, model, optimizer)
    broken = nonfinite_tensor(model) if start else ""
    if broken:  # a state saved by other code, or before these checks: never train on from it
        return _close(
            run,
            start,
            wall,
            "failed",
            f"the saved state after epoch {start} holds a non-finite {broken}: not resumed",
            data=None,
        )
    keeps_best = preset(config.preset).checkpoint == BEST_TEST
    memory = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device).to(memory_format=memory)  # torch's stubs take the two in separate calls
    _optimizer_to(optimizer, device)
    train_set = load_train(config.dataset, data_dir)
    test = _tested_on(load_test(config.dataset, data_dir), training_test_images(config.length))
    images, labels = train_set.images[: config.n_train], train_set.labels[: config.n_train]
    data = {  # where the training images came from, for meta.json
        "source": clean_source(config.dataset, train_set.official),
        "images": len(labels),
        "sha256": images_digest(images, labels),
    }
    x_train = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)  # uint8, NCHW view
    y_train = torch.from_numpy(labels).to(device)
    # a compiled module is a module (OptimizedModule), where torch.compile's stubs say callable
    step_model = cast(nn.Module, torch.compile(model)) if config.compile else model
    steps = -(-len(y_train) // recipe.batch_size)
    bar = tqdm(
        total=recipe.epochs * steps,
        initial=start * steps,
        disable=None if progress else True,  # None: on a terminal only
        unit="batch",
        dynamic_ncols=True,
    )
    with bar:
        for epoch in range(start, recipe.epochs):
            began = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(epoch)
            bar.set_description(
                f"train {config.run_tag} {config.dataset} seed{config.seed} epoch {epoch + 1}/{recipe.epochs}"
            )
            try:
                loss, accuracy = train_epoch(
                    step_model,
                    optimizer,
                    x_train,
                    y_train,
                    recipe,
                    epoch_generator(config.seed, epoch),
                    config,
                    bar,
                )
                broken = nonfinite_tensor(model)  # every loss finite, yet the last step's update was not
                stopped = f"non-finite weights after epoch {epoch + 1}: {broken}" if broken else ""
            except Diverged as err:  # stop now: the rest of the schedule would train a NaN network
                stopped = f"non-finite loss in epoch {epoch + 1}, {err}"
            if stopped:
                seconds = wall + time.perf_counter() - began
                return _stop(run, epoch, seconds, epochs, data, stopped)
            tested = test_accuracy(model, test, device)
            coefficients = coefficient_columns(model, test, device)
            seconds = round(time.perf_counter() - began, 3)  # training and the test pass
            row = {
                "epoch": epoch + 1,
                "lr": recipe.lr_at(epoch),
                "train_loss": loss,
                "train_accuracy": accuracy,
                "test_accuracy": tested,
                "seconds": seconds,
                **coefficients,
            }
            wall += seconds
            epochs.append(row)
            if keeps_best and tested > best.get("accuracy", -1.0):  # the release's `acc > self.max`
                best = {
                    "epoch": epoch + 1,
                    "accuracy": tested,
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                }
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "wall": wall,
                "epochs": epochs,  # the training log: a resumed run rewrites epochs.csv whole from it
                "best": best,  # the best test accuracy's weights so far (preset release-2020-06), else {}
            }
            atomic_write(folder / STATE_FILE, lambda f, s=state: torch.save(s, f))
            write_epochs(folder, epochs)
            _save(run, epoch + 1, wall, "running", data=data)
            log.info(
                "epoch %d/%d lr %g loss %.4f train acc %.4f test acc %.4f %.1fs",
                epoch + 1,
                recipe.epochs,
                row["lr"],
                loss,
                accuracy,
                row["test_accuracy"],
                row["seconds"],
            )
    # the final weights' accuracy: the last epoch's test pass (unless a legacy state lacks it)
    last = epochs[-1] if epochs and epochs[-1]["epoch"] == recipe.epochs else None
    accuracy = last["test_accuracy"] if last is not None else test_accuracy(model, test, device)
    kept = {"rule": "last", "epoch": recipe.epochs}
    if keeps_best and best:  # the weights evaluated are those of the best test accuracy, said in meta.json
        model.load_state_dict(best["model"])
        accuracy, kept = best["accuracy"], {"rule": BEST_TEST, "epoch": best["epoch"]}
    status, reason = chance_gate(accuracy, model.info.num_classes, config.length == REHEARSAL)
    return _close(run, recipe.epochs, wall, status, reason, accuracy, data, kept)


def _stop(run: _Run, epoch: int, wall: float, epochs: list[dict], data: dict | None, reason: str) -> dict:
    """End a diverged run at once: the log of the epochs that finished, failed with `reason`."""
    if epochs:
        write_epochs(run.folder, epochs)
    return _close(run, epoch, wall, "failed", reason, data=data)


def chance_gate(accuracy: float, classes: int, rehearsal: bool) -> tuple[str, str]:
    """(status, reason) of a run whose final test accuracy is `accuracy`: failed at chance
    level, except in a rehearsal, whose few steps never leave chance: there the gate is
    relaxed, and the reason says so."""
    if accuracy >= CHANCE_FACTOR / classes:
        return "finished", ""
    if rehearsal:
        return "finished", f"test accuracy {accuracy:.4f} at chance level (gate relaxed: rehearsal)"
    return "failed", f"test accuracy {accuracy:.4f} at chance level"


def _tested_on(test: ImageSet, n: int | None) -> ImageSet:
    """The first `n` test images (all of them for None)."""
    return test if n is None else replace(test, images=test.images[:n], labels=test.labels[:n])


def coefficient_columns(model: InterpolatedNet, test: ImageSet, device: torch.device) -> dict[str, float]:
    """The training log's coefficients: act(λ_n) per damped block (`coefficient_<n>`, n
    from 1 in depth order), or for the gating rules each block's min / median / max over
    the first GATE_IMAGES test images; none for the rules without λ."""
    if not uses_lambda(model.info.rule):
        return {}
    if not any(s.is_input_dependent for s in model.damped_skips()):
        return {
            f"coefficient_{n}": round(float(c), 6)
            for n, c in enumerate(model.interpolation_coefficients(), 1)
        }
    rows = np.arange(min(GATE_IMAGES, len(test)))
    x, _ = next(iter(batches(test.images, test.labels, len(rows), device, rows)))
    columns = {}
    for n, values in enumerate(model.interpolation_coefficients(x), 1):
        for stat, value in (("min", values.min()), ("median", values.median()), ("max", values.max())):
            columns[f"coefficient_{n}_{stat}"] = round(float(value), 6)
    return columns


def write_epochs(folder: Path, epochs: list[dict]) -> None:
    """epochs.csv, the training log: one row per epoch, numbers only, written whole and
    atomically."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(epochs[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(epochs)
    atomic_write(folder / EPOCHS_FILE, out.getvalue())


def _build(config: TrainConfig) -> InterpolatedNet:
    torch.manual_seed(config.seed)  # initial weights and lambdas depend on the seed only
    return create_model(
        config.model, **model_options(config.model, config.dataset, config.preset, config.lambda_init)
    )


def model_options(model: str, dataset: str, preset: str, lambda_init: tuple[float, float] | None) -> dict:
    """What `create_model` is given for a run: the data set's classes and statistics, the
    preset's options, the λ initialisation asked for."""
    kwargs = {**dataset_defaults(dataset), **preset_model_options(preset, model_entry(model))}
    if lambda_init is not None:
        kwargs["lambda_init"] = tuple(lambda_init)
    return kwargs


@functools.cache
def planned_info(model: str, dataset: str, preset: str, lambda_init: tuple[float, float] | None) -> ModelInfo:
    """The ModelInfo of the model a run with these options trains, made on the meta device
    (no weights): what an existing checkpoint is checked against."""
    with torch.device("meta"):
        return create_model(model, **model_options(model, dataset, preset, lambda_init)).info


def finished_run(config: TrainConfig, results_dir: str | Path = "results") -> dict | None:
    """The meta.json of `config`'s run when it has ended (finished or failed), else None;
    one error line when the folder holds a run of another recipe or model build."""
    recipe = recipe_for(model_entry(config.model).family, config.dataset, config.preset, config.length)
    return _finished_meta(
        zoo_checkpoint_dir(results_dir, config.dataset, config.run_tag, config.seed), recipe, config
    )


def _finished_meta(folder: Path, recipe: Recipe, config: TrainConfig) -> dict | None:
    path = folder / META_FILE
    for name in (META_FILE, WEIGHTS_FILE, STATE_FILE, EPOCHS_FILE, LOG_FILE):  # before training, not after it
        check_file_target(folder / name)
    if not path.is_file():
        return None
    meta = read_meta(path)
    check_identity(folder, meta, config.dataset, config.seed)
    if meta.get("recipe") != _jsonable(asdict(recipe)):
        raise UserError(
            f"{folder} holds a run with another recipe ({meta.get('recipe')}); delete it or use another --results-dir"
        )
    check_build(meta, planned_info(config.model, config.dataset, config.preset, config.lambda_init), folder)
    if meta.get("status", "finished") == "finished":  # its cells are found by the sha256 of the file it names
        check_weights(folder, meta)
    return meta if meta.get("status") in ("finished", "failed") else None


def _resume(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, float, list[dict], dict]:
    path = folder / STATE_FILE
    if not path.is_file():
        return 0, 0.0, [], {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        mismatch = describe_mismatch(model.state_dict(), state["model"])
        if mismatch:
            raise ValueError(f"it holds another model: {mismatch}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:  # a state file we wrote atomically should never fail; say so
        raise UserError(
            f"cannot resume from {path} ({error_reason(err)}); delete it to restart this run"
        ) from None
    log.info("resuming %s after epoch %d", folder, state["epoch"])
    return (
        int(state["epoch"]),
        float(state["wall"]),
        list(state.get("epochs", [])),
        dict(state.get("best", {})),
    )


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for param_state in optimizer.state.values():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                param_state[key] = value.to(device)


def _save(
    run: _Run,
    epochs_done: int,
    wall: float,
    status: str,
    reason: str = "",
    accuracy: float | None = None,
    data: dict | None = None,
    kept: dict | None = None,
) -> dict:
    config = run.config
    meta = {
        "tag": config.run_tag,
        "preset": config.preset,
        "length": config.length,
        "recipe": _jsonable(asdict(run.recipe)),
        "epochs_done": epochs_done,
        "test_accuracy": accuracy,
        "interpolation_coefficients": _coefficients(run.model),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": version("torchvision"),  # not imported: it would load torch's compiler stack
            "numpy": np.__version__,
        },
        "device": device_name(config.device),
        "flags": {"channels_last": config.channels_last, "bf16": config.bf16, "compile": config.compile},
        "n_train": config.n_train,
        "data": data,  # source (released, unofficial, synthetic), images, sha256 of images + labels
        "wall_seconds": round(wall, 3),
        "status": status,
        "reason": reason,
    }
    if kept is not None:  # which epoch's weights weights.pt holds: the last, or the best test accuracy's
        meta["checkpoint"] = kept
    written = save_zoo_checkpoint(
        run.model, config.dataset, config.seed, run.folder.parents[3], run=config.run_tag, **meta
    )
    return json.loads((written / META_FILE).read_text())  # as stored: with sha256, model kwargs


def _close(
    run: _Run,
    epochs_done: int,
    wall: float,
    status: str,
    reason: str,
    accuracy: float | None = None,
    data: dict | None = None,
    kept: dict | None = None,
) -> dict:
    meta = _save(run, epochs_done, wall, status, reason, accuracy, data, kept)
    (run.folder / STATE_FILE).unlink(missing_ok=True)  # the final weights are in weights.pt
    line = f"{run.config.run_tag} {run.config.dataset} seed {run.config.seed}: {status}"
    line += f", test acc {accuracy:.4f}" if accuracy is not None else ""
    line += f" ({reason})" if reason else ""
    line += (
        f", the weights of epoch {kept['epoch']} (best test accuracy)"
        if kept and kept["rule"] == BEST_TEST
        else ""
    )
    log.info("%s, %d epochs, %.0f s", line, epochs_done, wall)
    return meta


def _coefficients(model: InterpolatedNet) -> list[float]:
    try:
        return [round(float(c), 6) for c in model.interpolation_coefficients()]
    except ValueError:  # gating rules: coefficients depend on the input; none at rest
        return []


def _jsonable(obj: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in obj.items()}


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to {folder} ({err.strerror}): choose another --results-dir") from None
    return folder
