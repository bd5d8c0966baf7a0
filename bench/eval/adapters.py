"""Defense adapters: the one interface the harness evaluates.

Every adapter returns a `Defense`: an eval-mode `nn.Module` with frozen parameters that
maps N x 3 x H x W images in [0, 1] (H x W: its data set's image size) to N x
num_classes logits, plus `DefenseInfo`. Normalisation lives inside the module, so attack
radii are always in pixel units. The data set's classes, statistics and image size come
from the registry (`bench.data.datasets`).
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.core.files import sha256_file
from bench.core.weights import describe_mismatch, listing, load_state_dict_file, read_state_dict
from bench.data.datasets import dataset_info
from bench.eval.identity import NAME, build_text, check_name, check_run_name, code_digest
from bench.records.checkpoints import (
    META_FILE,
    WEIGHTS_FILE,
    check_build,
    dataset_defaults,
    ensemble_digest,
    missing_weights,
    model_kwargs,
    read_meta,
    zoo_checkpoint_dir,
)
from models import UserError, create_model
from models.layers import Normalize

STD_FLOOR = torch.finfo(torch.float32).tiny  # the smallest std a float32 division takes without overflow


@dataclass(frozen=True)
class DefenseInfo:
    name: str
    family: str  # "preact-resnet", "resnext", "robustbench", or the user's label
    dataset: str
    num_classes: int
    source: str  # "zoo", "state-dict", "module", "robustbench" or "ensemble"
    checkpoint: str  # path of the weights file
    checkpoint_sha256: str
    # what besides the weights made the network (architecture, factory, normalisation), as
    # canonical JSON: the same weights built otherwise are another defense (bench.records.store)
    build: str = "{}"

    @property
    def ours(self) -> bool:
        """Whether its code is this project's (a zoo checkpoint, an ensemble of them): its
        failure is ours to debug, with the traceback; a user's defense fails in one line."""
        return self.source in ("zoo", "ensemble")


@dataclass(frozen=True)
class Defense:
    model: nn.Module
    info: DefenseInfo


class NormalizedModel(nn.Module):
    """Puts a user's network that expects normalised inputs behind a [0, 1] interface."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        try:
            self.normalize = Normalize(mean, std)
        except (TypeError, ValueError) as err:  # the API's mistake in the command line's words
            raise UserError(f"NormalizedModel: {err}") from None
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


# --- 1. zoo models trained by this project -------------------------------------------------


def zoo_defense(model: str, dataset: str, seed: int, results_dir: str | os.PathLike = "results") -> Defense:
    """A registered model with the checkpoint this project trained for (dataset, seed)."""
    folder = zoo_checkpoint_dir(results_dir, dataset, model, seed)
    meta_path, weights = folder / META_FILE, folder / WEIGHTS_FILE
    if meta_path.is_file() and not weights.is_file():
        raise UserError(missing_weights(folder))
    if not meta_path.is_file():
        raise UserError(
            f"no trained checkpoint for {model} on {dataset} seed {seed}: expected "
            f"{weights} and {meta_path}; train it first"
        )
    meta = read_meta(meta_path)
    if meta.get("status", "finished") != "finished":
        raise UserError(f"checkpoint {folder} is {meta['status']!r}, not a finished run")
    if sha256_file(weights) != meta.get("sha256"):
        raise UserError(
            f"checkpoint {weights} does not match the sha256 in {meta_path}: it changed or is truncated"
        )
    net = create_model(meta["model"], **meta["model_kwargs"])
    check_build(meta, net.info, folder)
    load_state_dict_file(net, weights)
    return _finish(
        net,
        DefenseInfo(
            model, net.info.family, dataset, net.info.num_classes, "zoo", str(weights), meta["sha256"]
        ),
    )


# --- 2. a registered architecture with a user's weights -------------------------------------


def state_dict_defense(
    arch: str, path: str | os.PathLike, dataset: str = "cifar10", name: str | None = None, **overrides: Any
) -> Defense:
    """Registered architecture `arch` (see list_models) with weights from `path`; mean/std
    and num_classes default to the dataset's and can be overridden. `name` (default: the
    weights file's stem, as --state-dict) names its records: --name's rule applies."""
    name = check_name(
        Path(path).stem if name is None else name, f"state_dict_defense({arch!r}, {str(path)!r})"
    )
    net = create_model(arch, **{**dataset_defaults(dataset), **overrides})
    digest = load_state_dict_file(net, path)
    build = build_text({"arch": arch, **model_kwargs(net.info)})
    return _finish(
        net,
        DefenseInfo(
            name, net.info.family, dataset, net.info.num_classes, "state-dict", str(path), digest, build
        ),
    )


# --- 3. any module: factory + state_dict + normalisation ------------------------------------


def module_defense(
    name: str,
    factory: Callable[[], nn.Module],
    path: str | os.PathLike,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    dataset: str = "cifar10",
    family: str = "external",
) -> Defense:
    """`factory()` builds the user's network (expecting (x - mean) / std inputs); its
    weights come from `path`. mean=None, std=None: a network on [0, 1] inputs. `name`
    names its records (--name's rule), `family` labels it (the same characters)."""
    check_name(name, "module_defense")
    if not isinstance(family, str) or not NAME.fullmatch(family):
        raise UserError(
            f"module_defense {name}: family {family!r} must be 1-100 letters, digits or . _ @ + -"
        )
    channels = dataset_info(dataset).input_shape[0]
    if (mean is None) != (std is None):
        raise UserError(
            f"defense {name}: give both mean and std (one number per channel), or neither for a [0, 1] network"
        )
    mean, std = (
        _per_channel(values, f"defense {name}: {label}", channels, dataset)
        for label, values in (("mean", mean), ("std", std))
    )
    if std is not None and not all(math.isfinite(s) and s >= STD_FLOOR for s in std):
        raise UserError(
            f"defense {name}: std must be finite numbers of at least {STD_FLOOR:.3g} (float32's smallest "
            f"normal: below it x / std overflows), got {list(std)}"
        )
    factory_name = (
        f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', type(factory).__name__)}"
    )
    try:
        net = factory()
    except UserError:
        raise
    except Exception as err:  # the user's code: its failure in one line, not a traceback through ours
        raise UserError(
            f"defense {name}: its factory {factory_name}() raised {type(err).__name__}: {err}"
        ) from None
    if not isinstance(net, nn.Module):
        raise UserError(
            f"defense {name}: its factory {factory_name}() returned an object of type {type(net).__name__}, not a torch.nn.Module"
        )
    digest = load_state_dict_file(net, path)
    model = net if mean is None or std is None else NormalizedModel(net, mean, std)  # both or neither
    classes = dataset_defaults(dataset)["num_classes"]
    build = build_text(
        {
            "factory": factory_name,
            "mean": _floats(mean),
            "std": _floats(std),
            "code": code_digest(factory, net),
        }
    )
    return _finish(model, DefenseInfo(name, family, dataset, classes, "module", str(path), digest, build))


def _per_channel(values: Any, what: str, channels: int, dataset: str) -> tuple[float, ...] | None:
    """A mean or std as floats (a list, tuple, array or tensor of numbers), one per channel."""
    if values is None:
        return None
    try:
        numbers = tuple(float(v) for v in values) if not isinstance(values, str | bytes) else ()
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        numbers = ()
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise UserError(f"{what} must be finite numbers, one per channel, got {values!r}")
    if len(numbers) != channels:
        raise UserError(f"{what} needs {channels} numbers (one per channel of {dataset}), got {len(numbers)}")
    return numbers


def _floats(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


# --- 4. RobustBench zoo architectures from a local model_dir (optional extra) ---------------


def robustbench_defense(
    name: str,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    model_dir: str | os.PathLike = "models",
    fetch: bool = False,
) -> Defense:
    """RobustBench model `name` from `<model_dir>/<dataset>/<threat_model>/<name>.pt`, the
    layout robustbench.utils.load_model uses. With `fetch`, a missing checkpoint is
    downloaded by RobustBench's own `load_model` first (with every torch.load of it forced
    to weights_only); without, it never downloads."""
    model_dicts, BenchmarkDataset, ThreatModel = _robustbench()
    try:
        entries = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    except (ValueError, KeyError):
        raise UserError(f"RobustBench has no {dataset}/{threat_model} models") from None
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=5, cutoff=0.5)
        raise UserError(
            f"RobustBench has no {dataset}/{threat_model} model {name!r}; closest: {', '.join(close) or '-'}"
        )
    if entries[name]["gdrive_id"] is None:
        raise UserError(
            f"RobustBench model {name!r} has no checkpoint file (RobustBench serves it through timm): not supported"
        )
    if isinstance(entries[name]["gdrive_id"], list):
        raise UserError(
            f"RobustBench model {name!r} is an ensemble of several files, which this harness does not "
            "load: choose a single-file model"
        )
    path = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    if not path.is_file():
        how = (
            f"fetch it once with robustbench.utils.load_model({name!r}, model_dir={str(model_dir)!r}, "
            f"dataset={dataset!r}, threat_model={threat_model!r}) or copy it there"
        )
        if not fetch:
            raise UserError(f"RobustBench checkpoint {path} not found (this adapter never downloads): {how}")
        failed = _fetch(name, dataset, threat_model, model_dir)
        if not path.is_file():
            raise UserError(
                f"RobustBench checkpoint {path} not found and its download failed ({failed}): {how}"
            )
    net = entries[name]["model"]()
    state = read_state_dict(path)
    unprefixed = {k.removeprefix("model."): v for k, v in state.items()}
    if describe_mismatch(net.state_dict(), state) and not describe_mismatch(net.state_dict(), unprefixed):
        state = unprefixed  # some RobustBench files wrap the network in a "model." attribute
    mismatch = describe_mismatch(net.state_dict(), state)
    if mismatch:
        raise UserError(f"checkpoint {path} does not fit RobustBench {name}: {mismatch}")
    net.load_state_dict(state, strict=True)
    classes = dataset_defaults(dataset)["num_classes"]
    build = build_text({"robustbench": name, "threat_model": threat_model})
    return _finish(
        net,
        DefenseInfo(
            name, "robustbench", dataset, classes, "robustbench", str(path), sha256_file(path), build
        ),
    )


def _fetch(name: str, dataset: str, threat_model: str, model_dir: str | os.PathLike) -> str:
    """Download a RobustBench checkpoint into `model_dir` with RobustBench's `load_model`;
    '' on success, else the error's last line (offline, a moved file). torch.load is forced
    to weights_only while it runs: the file is untrusted until our loader has read it."""
    from robustbench.utils import load_model

    saved = {
        k: os.environ.pop(k, None)
        for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
        return ""
    except Exception as err:  # requests, gdown and torch raise many types; the line is what matters
        return (
            f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}".rstrip(
                ": "
            )
        )
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _robustbench() -> Any:
    # robustbench imports `autoattack`, which PyPI ships as `pyautoattack`: alias it.
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack"):
        sys.modules["autoattack"] = importlib.import_module("pyautoattack")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from robustbench.model_zoo import model_dicts
            from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as err:
        raise UserError(
            f"the RobustBench adapter needs the optional extra: pip install -e '.[robustbench]' ({err})"
        ) from None
    return model_dicts, BenchmarkDataset, ThreatModel


# --- 5. an ensemble of defenses (Table 6) ---------------------------------------------------


def combine_members(logits: Sequence[Tensor]) -> Tensor:
    """The ensemble rule: the mean of the members' softmax probabilities, returned as its
    log, so that argmax is the ensemble's prediction and cross-entropy on it is the loss of
    the averaged probabilities (what a white-box attack on the ensemble maximises). The
    paper does not state its rule; change it here."""
    log_probs = torch.stack([torch.log_softmax(z, dim=1) for z in logits])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


class Ensemble(nn.Module):
    """Several [0, 1]-input classifiers answering as one (see `combine_members`)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return combine_members([member(x) for member in self.members])


def ensemble_defense(defenses: Sequence[Defense], name: str | None = None) -> Defense:
    """One defense from several of the same data set, attacked white-box as one model. Its
    checkpoint digest is the sha256 of the members' digests, so a retrained member makes
    the ensemble a different checkpoint."""
    if len(defenses) < 2:
        raise UserError(f"an ensemble needs at least 2 members, got {len(defenses)}")
    if name is not None:
        check_run_name(name, "ensemble_defense", zoo=all(d.info.source == "zoo" for d in defenses))
    first = defenses[0].info
    if any((d.info.dataset, d.info.num_classes) != (first.dataset, first.num_classes) for d in defenses):
        raise UserError(
            f"ensemble members must share data set and classes: {[d.info.name for d in defenses]}"
        )
    info = DefenseInfo(
        name or first.name,
        first.family,
        first.dataset,
        first.num_classes,
        "ensemble",
        ";".join(d.info.checkpoint for d in defenses),
        ensemble_digest([d.info.checkpoint_sha256 for d in defenses]),
    )
    return _finish(Ensemble([d.model for d in defenses]), info)


# --- shared --------------------------------------------------------------------------------


def _finish(model: nn.Module, info: DefenseInfo) -> Defense:
    """Eval mode, frozen parameters (attacks differentiate w.r.t. the input only), and a
    one-batch check that the module really returns logits of the expected shape."""
    model.eval().requires_grad_(False)
    check_logits(model, info, torch.full((2, *dataset_info(info.dataset).input_shape), 0.5))
    return Defense(model, info)


def check_logits(model: nn.Module, info: DefenseInfo, x: Tensor, where: str = "") -> None:
    """One error line unless `model` maps the batch `x` (N x C x H x W in [0, 1]) to finite
    floating-point N x classes logits: run on 2 constant images when a defense is built,
    and on the first batch of test images, at the evaluation's batch size, before its
    first cell. `where`: the images, in words."""
    size = "x".join(map(str, x.shape))
    batch = f"a {size} batch of " + (where or "[0, 1] images")
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # the user's forward: one line, not a traceback through ours
        reason = str(err).splitlines()[0] if str(err) else ""
        raise UserError(
            f"defense {info.name} fails on {batch} ({type(err).__name__}: {reason}): check its "
            "forward and the data set it is for"
        ) from None
    expected = (len(x), info.num_classes)
    if not isinstance(out, Tensor) or tuple(out.shape) != expected or not out.is_floating_point():
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise UserError(
            f"defense {info.name} returns {got} for {batch}; expected finite floating-point {expected} logits"
        )
    if not out.isfinite().all():
        broken = [
            k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()
        ]
        why = (
            f"its weights hold NaN or inf in {listing(broken)}: check {info.checkpoint}"
            if broken
            else "its weights are finite, so its forward overflows: check its normalisation (mean, std) and forward"
        )
        raise UserError(f"defense {info.name} returns non-finite logits for {batch} ({why})")
