"""The checkpoint layout of a results dir: one folder per (data set, run, seed) under
`checkpoints/`, holding weights.pt, meta.json (checked as read), state.pt, epochs.csv and
train.log. Training writes it, the evaluators and the reports read it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from bench.core.files import save_json, sha256_file
from bench.core.weights import save_state_dict
from bench.data.datasets import dataset_info
from models import InterpolatedNet, ModelInfo, UserError

WEIGHTS_FILE, META_FILE = "weights.pt", "meta.json"


def dataset_defaults(dataset: str) -> dict:
    """The model options a data set fixes: its classes and normalisation statistics."""
    info = dataset_info(dataset)
    return {"num_classes": info.num_classes, "mean": info.mean, "std": info.std}


def zoo_checkpoint_dir(results_dir: str | os.PathLike, dataset: str, model: str, seed: int) -> Path:
    return Path(results_dir) / "checkpoints" / dataset / model / f"seed{seed}"


def save_zoo_checkpoint(
    model: InterpolatedNet,
    dataset: str,
    seed: int,
    results_dir: str | os.PathLike,
    run: str | None = None,
    **meta: object,
) -> Path:
    """Write weights, then the metadata naming their sha256 (both atomically): a reader
    that finds meta.json finds the weights it describes. `run` names the folder (default:
    the model's name; training adds tags for non-default presets and lengths)."""
    info = model.info
    folder = zoo_checkpoint_dir(results_dir, dataset, run or info.name, seed)
    digest = save_state_dict(model.state_dict(), folder / WEIGHTS_FILE)
    save_json(
        {
            "model": info.name,
            "dataset": dataset,
            "seed": seed,
            "sha256": digest,
            STAMP: file_stamp(folder / WEIGHTS_FILE),
            "model_kwargs": model_kwargs(info),
            "lambda_storage": info.lambda_storage,
            **meta,
        },
        folder / META_FILE,
    )
    return folder


# meta.json's stamp of weights.pt as written: while the file keeps its size and mtime, it is
# the file the sha256 names and need not be read again (a rerun of a plan of 100 checkpoints
# would hash gigabytes); a copy that lost its mtime is hashed, a changed file is refused.
STAMP = "weights_stamp"


def file_stamp(path: Path) -> dict:
    found = path.stat()
    return {"size": found.st_size, "mtime_ns": found.st_mtime_ns}


def weights_problem(folder: Path, meta: dict) -> str:
    """'' when the weights.pt of a finished checkpoint is the file its meta.json names (by
    the stamp, else by its sha256), else what is wrong: every count of a checkpoint's
    cells is keyed by that sha256, so a file replaced under it must not find them."""
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        return missing_weights(folder)
    try:
        if meta.get(STAMP) == file_stamp(weights):
            return ""
        found = sha256_file(weights)
    except OSError as err:
        return f"{weights} cannot be read ({err.strerror or err})"
    if found == meta["sha256"]:
        return ""
    return (
        f"{weights} is not the checkpoint its meta.json names (sha256 {found[:12]}…, not {meta['sha256'][:12]}…): "
        f"it was replaced or damaged since training; restore it, or delete {folder} to train it again"
    )


def check_weights(folder: Path, meta: dict) -> None:
    """One error line, before any work, for a finished checkpoint whose weights.pt is not
    the file its meta.json names (`weights_problem`)."""
    problem = weights_problem(folder, meta)
    if problem:
        raise UserError(problem)


def model_kwargs(info: ModelInfo) -> dict:
    """The options that rebuild a zoo model (`create_model(info.name, **model_kwargs(info))`),
    as meta.json stores them."""
    return {
        "num_classes": info.num_classes,
        "mean": list(info.mean),
        "std": list(info.std),
        "lambda_init": list(info.lambda_init),
        "damp_scope": info.damp_scope,
        "network": info.network,
    }


def build_mismatch(meta: dict, info: ModelInfo) -> str:
    """'' when the checkpoint `meta` describes was built and parametrised as `info` says,
    else what differs. Checkpoints written before these facts were recorded had every
    network "paper" and stored λ itself for every scalar rule."""
    stored = {"network": "paper", **meta.get("model_kwargs", {})}
    differs = [
        f"{key} {stored.get(key)!r} (now {value!r})"
        for key, value in model_kwargs(info).items()
        if stored.get(key) != value
    ]
    storage = meta.get("lambda_storage", "λ" if info.lambda_storage == "k = 1 - λ" else info.lambda_storage)
    if storage != info.lambda_storage:
        differs.insert(
            0,
            f"λ trained as {storage} (now as {info.lambda_storage}, as the authors' release: "
            "weight decay pulled λ the other way)",
        )
    return "; ".join(differs)


def check_build(meta: dict, info: ModelInfo, folder: Path) -> None:
    """One error line when the checkpoint in `folder` is not the model `info` describes:
    never evaluate or resume it as if it were."""
    differs = build_mismatch(meta, info)
    if differs:
        raise UserError(
            f"{folder} holds a checkpoint of another build of {info.name}: {differs}; "
            "delete the folder to train it anew, or use another --results-dir"
        )


def check_identity(folder: Path, meta: dict, dataset: str, seed: int) -> None:
    """One error line when the folder of (data set, seed) holds another run's checkpoint,
    as its meta.json says: a copied or renamed folder is never a second seed."""
    for key, wanted in (("dataset", dataset), ("seed", seed)):
        if key in meta and meta[key] != wanted:
            raise UserError(
                f"{folder} holds the checkpoint of {key} {meta[key]!r} (its {META_FILE} says so), not of {key} "
                f"{wanted!r}: a copied or renamed folder is never another run; move it back or delete it"
            )


def check_distinct(metas: dict[Path, dict]) -> None:
    """One error line when two finished checkpoint folders hold the same weights (one
    sha256): a checkpoint must never count twice in a mean or an ensemble."""
    seen: dict[str, Path] = {}
    for folder, meta in metas.items():
        if meta.get("status", "finished") != "finished":
            continue
        first = seen.setdefault(meta["sha256"], folder)
        if first != folder:
            raise UserError(
                f"{first} and {folder} hold the same checkpoint (sha256 {meta['sha256'][:12]}…): one checkpoint "
                "never counts as two seeds; delete the copy"
            )


def missing_weights(folder: Path) -> str:
    """The error line of a checkpoint folder whose meta.json is there but not its weights:
    the train stage skips it (its meta says it ended), so "train it" would be wrong advice."""
    return (
        f"{folder} holds {META_FILE} but not {WEIGHTS_FILE} (deleted?): restore {WEIGHTS_FILE}, or delete the "
        "folder and run the train stage to train it again"
    )


def ensemble_digest(digests: Sequence[str]) -> str:
    """The checkpoint digest of an ensemble: sha256 of its members' digests, in order."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


# meta.json's fields and their JSON types (a field may be absent in older files); the
# values are checked as read, so that a hand-edited file is one line, not a TypeError later.
_NUMBER = (int, float)


META_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "sha256": (str,),
    "model_kwargs": (dict,),
    "dataset": (str,),
    "seed": (int,),
    "status": (str,),
    "reason": (str,),
    "test_accuracy": (*_NUMBER, type(None)),
    "epochs_done": (int,),
    "wall_seconds": _NUMBER,
    "length": (str,),
    "n_train": (int, type(None)),
    "preset": (str,),
    "tag": (str,),
    "lambda_storage": (str,),
    "recipe": (dict,),
    "data": (dict,),
    "device": (str,),
    "flags": (dict,),
    "interpolation_coefficients": (list,),
    "versions": (dict,),
    STAMP: (dict,),
    "checkpoint": (dict,),
}


MODEL_KWARG_TYPES: dict[str, tuple[type, ...]] = {
    "num_classes": (int,),
    "mean": (list,),
    "std": (list,),
    "lambda_init": (list,),
    "damp_scope": (str,),
    "network": (str,),
}


STATUSES = ("finished", "failed", "running")


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json, checked for the keys a loader needs and the types of its
    values; one-line error if not."""
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not {"model", "sha256", "model_kwargs"} <= meta.keys():
            raise ValueError("needs the keys model, sha256 and model_kwargs")
        problem = meta_problem(meta)
        if problem:
            raise ValueError(problem)
        return meta
    except (OSError, ValueError) as err:
        raise UserError(
            f"{path} is not valid checkpoint metadata ({err}); restore it, or delete the folder and retrain"
        ) from None


def meta_problem(meta: dict) -> str:
    """'' when every known field of `meta` has its type and range, else the first that does not."""
    for fields, where in ((meta, ""), (meta.get("model_kwargs") or {}, "model_kwargs.")):
        kinds = META_TYPES if not where else MODEL_KWARG_TYPES
        for key, allowed in kinds.items():
            if key in fields and not _is(fields[key], allowed):
                names = dict.fromkeys(_json_name(t) for t in allowed if not (t is int and float in allowed))
                return f"{where}{key} must be {' or '.join(names)}, got {fields[key]!r}"
    kwargs = meta["model_kwargs"]
    if kwargs.get("num_classes", 1) < 1 or any(
        not _is(v, _NUMBER) for k in ("mean", "std", "lambda_init") for v in kwargs.get(k, [])
    ):
        return f"model_kwargs {kwargs!r} are not a model's options"
    if meta.get("status", "finished") not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}, got {meta['status']!r}"
    accuracy = meta.get("test_accuracy")
    if accuracy is not None and not 0 <= accuracy <= 1:
        return f"test_accuracy must be in [0, 1], got {accuracy!r}"
    if not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]):
        return f"sha256 must be 64 hex digits, got {meta['sha256']!r}"
    trained_on = meta.get("data", {}).get("sha256")  # the training images' digest, shown in the report
    if trained_on is not None and not (
        isinstance(trained_on, str) and re.fullmatch(r"[0-9a-f]{64}", trained_on)
    ):
        return f"data.sha256 must be 64 hex digits, got {trained_on!r}"
    return ""


def _is(value: object, allowed: tuple[type, ...]) -> bool:
    return isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)


def _json_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        dict: "an object",
        list: "a list",
        type(None): "null",
    }[kind]


STATE_FILE, LOG_FILE, EPOCHS_FILE = "state.pt", "train.log", "epochs.csv"


GATE_IMAGES = 1000  # test images over which a gating rule's per-epoch coefficients are summarised


def run_tag(
    model: str,
    preset: str = "paper",
    length: str = "full",
    lambda_init: tuple[float, float] | None = None,
    n_train: int | None = None,
) -> str:
    """A run's name, its checkpoint folder: the model and every option that changed its
    weights (the only place a tag is made: training, figures and tables read it)."""
    parts = [model]
    if preset != "paper":
        parts.append(preset)
    if length != "full":
        parts.append(length)
    if lambda_init is not None:
        parts.append(f"lambda{lambda_init[0]:g}-{lambda_init[1]:g}")
    if n_train is not None:
        parts.append(f"n{n_train}")
    return "@".join(parts)
