"""Throughput per model and device, in images per second for a training step, a forward
and an input gradient: from the records of earlier runs, from FLOP counts at an assumed
rate, or from a short probe on this machine."""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.attacks.perturbations import CLEAN, NOISE, PERTURBATIONS, Iterative, perturbation
from bench.core.environment import device_name
from bench.data.datasets import CIFAR10
from bench.records.checkpoints import META_FILE, read_meta
from bench.records.load import load_records
from bench.reports.measured import rehearsal_of
from models import create_model

PROBE_BATCH, PROBE_WARMUP, PROBE_REPEATS, PROBE_SECONDS = 32, 2, 7, 3.0
# A probe predicted (from a probe already made on the device) to take longer than this is not
# made: the model's FLOPs at the throughput that probe achieved stand in for it.
PROBE_BUDGET_S = 6.0
# models within 2% of each other's FLOPs (one architecture, another skip rule) share a probe
SAME_FLOPS = 0.02
log = logging.getLogger(__name__)
TRAIN_FLOPS, GRADIENT_FLOPS = 3.0, 2.0  # a training step ~ 3 forwards; an input gradient ~ 2


@dataclass(frozen=True)
class Rates:
    """Images per second of a training step, a forward pass and an input-gradient pass."""

    train: float
    forward: float
    gradient: float
    source: str  # where they come from, in words


def model_rates(
    model: str,
    device: str,
    results_dir: str | os.PathLike,
    assume_tflops: float | None,
    shape: tuple[int, ...] = CIFAR10.input_shape,
) -> Rates:
    """Rates of `model` on inputs of `shape` (C x H x W): at `assume_tflops`, else as
    recorded by finished runs, else probed here."""
    if assume_tflops is not None:
        return flop_rates(model, assume_tflops, shape)
    recorded = recorded_rates(model, device, results_dir)
    return recorded if recorded is not None else probed_rates(model, device, shape)


_PROBED: dict[
    tuple[str, tuple[int, ...]], dict[str, tuple[float, Rates]]
] = {}  # (device, shape) -> model -> (FLOPs, rates)


def probed_rates(model: str, device: str, shape: tuple[int, ...] = CIFAR10.input_shape) -> Rates:
    """The model's rates from a probe on `device`, made once per process: a model of the
    same FLOPs as one probed shares its probe, and one whose probe would take longer than
    PROBE_BUDGET_S gets its FLOPs at the throughput of the largest model probed."""
    flops = forward_flops(model, shape)
    done = _PROBED.setdefault((device_name(device), shape), {})
    same = [(name, rates) for name, (f, rates) in done.items() if abs(f - flops) <= SAME_FLOPS * flops]
    if same:
        return same[0][1]
    if done:
        name, (ref_flops, ref) = max(done.items(), key=lambda item: item[1][0])
        scale = ref_flops / flops
        guess = Rates(
            ref.train * scale,
            ref.forward * scale,
            ref.gradient * scale,
            f"{flops / 1e9:.2f} GFLOPs at the throughput {name}'s probe achieved",
        )
        if probe_seconds(guess) > PROBE_BUDGET_S:
            log.info(
                "rates of %s on %s: its FLOPs at the throughput of %s's probe (a probe would take ~%.0f s)",
                model,
                device,
                name,
                probe_seconds(guess),
            )
            done[model] = (flops, guess)
            return guess
    log.info(
        "probing %s on %s: a training step, a forward and an input gradient on batches of %d",
        model,
        device,
        PROBE_BATCH,
    )
    done[model] = (flops, probe(model, device, shape))
    return done[model][1]


def probe_seconds(rates: Rates) -> float:
    """How long `probe` takes at `rates`: at least PROBE_WARMUP + 3 batches of each kind."""
    batches = PROBE_WARMUP + 3
    return sum(batches * PROBE_BATCH / r for r in (rates.train, rates.forward, rates.gradient))


@functools.cache
def forward_flops(model: str, shape: tuple[int, ...] = CIFAR10.input_shape) -> float:
    """FLOPs of one forward pass of one image of `shape` (counted on the meta device: no weights, no time)."""
    with torch.device("meta"):
        net = create_model(model)
        with FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, *shape))
    return float(counter.get_total_flops())


@functools.cache
def flop_rates(model: str, tflops: float, shape: tuple[int, ...] = CIFAR10.input_shape) -> Rates:
    """Rates at `tflops` achieved TFLOP/s from the model's forward FLOPs per image of `shape`."""
    per_image = forward_flops(model, shape)
    rate = tflops * 1e12 / per_image
    return Rates(
        rate / TRAIN_FLOPS, rate, rate / GRADIENT_FLOPS, f"{per_image / 1e9:.2f} GFLOPs at {tflops:g} TFLOP/s"
    )


def recorded_rates(model: str, device: str, results_dir: str | os.PathLike) -> Rates | None:
    """Rates measured by this model's finished runs and cells on this device, or None
    when it has neither a finished run nor clean and iterative-attack cells, or when the
    folder is a rehearsal's (a few steps: their time is the overheads')."""
    if rehearsal_of(Path(results_dir)) is not None:
        return None
    name = device_name(device)
    train = [
        meta["epochs_done"] * meta["data"]["images"] / meta["wall_seconds"]
        for meta in _finished_metas(results_dir)
        if meta["model"] == model and meta.get("device") == name and meta.get("wall_seconds", 0) > 0
    ]
    if not train:
        return None
    frame = _timed_cells(results_dir)
    if frame is None:
        return None
    timed = frame[
        (frame["model"] == model)
        & (frame["device"] == name)
        & (frame["seconds"] > 0)
        & (frame["members"] == 1)
    ]
    forward_cells = timed[timed["perturbation"].map(lambda p: _kind(p) in (CLEAN, NOISE))]
    # steps in params
    iterative = timed[timed["perturbation"].map(lambda p: isinstance(PERTURBATIONS.get(p), Iterative))]
    if not len(forward_cells) or not len(iterative):
        return None
    forward = statistics.median(forward_cells["n"] / forward_cells["seconds"])
    steps = iterative["params"].map(lambda p: json.loads(p)["steps"])
    gradient_seconds = (iterative["seconds"] - iterative["n"] / forward).clip(lower=1e-9)
    gradient = statistics.median(iterative["n"] * steps / gradient_seconds)
    return Rates(
        statistics.median(train), forward, gradient, f"recorded ({len(train)} runs, {len(timed)} cells)"
    )


def _timed_cells(results_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The records' cells, read once per state of the store (one estimate asks per model)."""
    path = Path(results_dir) / "records.sqlite"
    return _read_cells(str(path.resolve()), path.stat().st_mtime_ns) if path.is_file() else None


@functools.lru_cache(maxsize=2)
def _read_cells(path: str, mtime_ns: int) -> pd.DataFrame:
    return load_records(Path(path).parent)


def _kind(name: str) -> str | None:
    try:
        return perturbation(name).kind
    except Exception:  # a perturbation this version does not know
        return None


def _finished_metas(results_dir: str | os.PathLike) -> list[dict]:
    metas = []
    for path in Path(results_dir).glob(f"checkpoints/*/*/seed*/{META_FILE}"):
        meta = read_meta(path)
        if meta.get("status") == "finished" and (meta.get("data") or {}).get("images"):
            metas.append(meta)
    return metas


def probe(model_name: str, device: str, shape: tuple[int, ...] = CIFAR10.input_shape) -> Rates:
    """Images/s of an untrained `model_name` on `device` for inputs of `shape`: per kind of
    pass, PROBE_WARMUP batches, then up to PROBE_REPEATS timed ones (fewer past
    PROBE_SECONDS); the median."""
    model = create_model(model_name)
    return probe_module(model, model.info.num_classes, device, shape)


def defense_rates(
    model: torch.nn.Module, classes: int, device: str, assume_tflops: float | None, shape: tuple[int, ...]
) -> Rates:
    """A defense's rates: its forward FLOPs at `assume_tflops`, else probed (it is never
    trained here: its training rate is not measured)."""
    if assume_tflops is None:
        return probe_module(model, classes, device, shape, train=False)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.cpu()(torch.zeros(1, *shape))
    rate = assume_tflops * 1e12 / counter.get_total_flops()
    return Rates(
        float("nan"),
        rate,
        rate / GRADIENT_FLOPS,
        f"{counter.get_total_flops() / 1e9:.2f} GFLOPs at {assume_tflops:g} TFLOP/s",
    )


def probe_module(
    model: torch.nn.Module, classes: int, device: str, shape: tuple[int, ...], train: bool = True
) -> Rates:
    """`probe`'s measurement of a built module (`train`: its training step too)."""
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.rand(PROBE_BATCH, *shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (PROBE_BATCH,), device=device)

    def rate(step: Callable[[], None]) -> float:
        times = []
        for i in range(PROBE_WARMUP + PROBE_REPEATS):
            began = time.perf_counter()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= PROBE_WARMUP:
                times.append(time.perf_counter() - began)
                if len(times) >= 3 and sum(times) > PROBE_SECONDS:
                    break
        return PROBE_BATCH / statistics.median(times)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model.train()(x), y).backward()

    def forward() -> None:
        with torch.no_grad():
            model.eval()(x)

    def gradient() -> None:
        x_in = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model.eval()(x_in), y), x_in)

    trained = rate(train_step) if train else float("nan")
    return Rates(trained, rate(forward), rate(gradient), f"probe (median of batches of {PROBE_BATCH})")
