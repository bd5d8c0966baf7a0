#!/usr/bin/env python
"""The GPU check, one command: correctness first, then speed. Each section's figures are
saved as soon as it ends (JSON and Markdown, named by the device), so a run cut short
keeps what it measured.

1. parity: the damped skip (rules in, lambda-in, in-gating-sig) eager, under torch.compile and
   in bf16 autocast against a plain-autograd reference of Eq. 21 (logits, input gradient,
   the gradients of λ / the gate), within stated tolerances; then a short synthetic-data
   training run must learn (test accuracy above twice chance, as on a CPU);
2. training: images/s at batch 128 of a plain PyTorch loop (torchvision DataLoader) and of
   our loop with channels_last, + bf16, + torch.compile, + CUDA graphs (compile's
   reduce-overhead mode; GPUs only), their ratio to the plain loop and peak memory;
3. epoch: one full epoch of ResNet-110 with the paper's recipe on CIFAR-sized data, and
   the paper and quick suites' projected hours (other models scaled by their FLOPs);
4. evaluation: clean, FGSM at 3 radii and PGD-20 through the harness, images/s, and PGD-20
   against a hand loop of 20 input-gradient passes;
5. stability: the stability stage's units against one PGD-20 cell on the same images, and
   its J v (a vjp of a vjp) against torch.func.jvp on the device;
6. rehearsal: `run_bench.py --suite paper --rehearse` on the device (every model, data set,
   study and stage of the paper plan on a few images; stand-in data where CIFAR is
   missing), cut at 300 s: whether it finished, its records and its last line (the
   measured time per stage beside the estimate, and the real run's estimate).

    python benchmarks/gpu_check.py               # on a GPU: at most about 8 minutes, the rehearsal 5 more
    python benchmarks/gpu_check.py --tiny        # anywhere: tiny models, a few steps (CI runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import CELLS, hand_loop_seconds, harness_seconds  # noqa: E402
from bench_train import plain  # noqa: E402

from bench.eval.adapters import state_dict_defense  # noqa: E402
from bench.eval.protocol import Cell, EvalConfig
from bench.eval.testdata import EvalData
from bench.records.load import load_records, load_runs, load_stability  # noqa: E402
from bench.records.store import RecordStore  # noqa: E402
from bench.run.estimate import estimate
from bench.run.options import RunOptions  # noqa: E402
from bench.run.rates import Rates, flop_rates
from bench.run.suites import find_suite  # noqa: E402
from bench.train.epoch import epoch_generator, make_optimizer, train_epoch
from bench.train.loop import train
from bench.train.recipes import (
    TrainConfig,
    recipe_for,  # noqa: E402
)
from models import create_model  # noqa: E402
from models.skip import SkipRule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULL = {
    "parity": ("in-resnet110", "lambda-in-resnet110", "in-resnet-gating-sig110"),
    "training": ("resnet110", "in-resnet110", "lambda-in-resnet110", "resnet164", "resnext29-8x64d"),
    "steps": 30,
    "epoch": ("resnet110", 50_000),
    "evaluation": ("resnet110", "in-resnet110", "lambda-in-resnet110"),
    "eval_images": 512,
    "learn": ("resnet20", 10_000),
    "stability": ("resnet110", "in-resnet110"),
    "stability_images": 64,
    # the paper suite's whole plan rehearsed on the device (run_bench.py --rehearse), cut at this many seconds
    "rehearsal": (("--suite", "paper"), 300),
}
TINY = {
    "parity": ("in-resnet14", "lambda-in-resnet14", "in-resnet-gating-sig14"),
    "training": ("in-resnet14",),
    "steps": 2,
    "epoch": ("resnet8", 1_024),
    "evaluation": ("resnet8",),
    "eval_images": 32,
    "learn": ("resnet8", 1_024),
    "stability": ("resnet8",),
    "stability_images": 4,
    "rehearsal": (("--suite", "smoke", "--models", "resnet14"), 300),
}
# Each path is compared with the reference on what it is used for, as ||ours - ref|| / ||ref||:
# training (train mode) needs the logits and the skip parameters' gradients, attacks (eval
# mode) the logits and the input gradient. Eager runs in float64, where only the math can
# differ (1e-14 measured): in float32 the gradients of an untrained network through batch
# statistics amplify summation-order rounding (~1e-6) to 5e-3 for some initialisations, in
# our skip and the reference alike (seen on a CPU). Compiled kernels reorder more (measured
# up to 6e-3 on a CPU).
# bf16 keeps 8 bits of mantissa: λ's gradient, a sum of many cancelling terms, is noise
# at batch 16 (errors of 0.04-0.8 measured), so bf16 is held to the logits and all the
# parameters' gradients together (0.25 measured on a CPU: batch statistics of untrained
# networks again). A dropped or wrong gradient is an error of about 1.
PATHS = {  # (path, mode): (compared outputs, tolerance)
    ("eager", "train"): (("logits", "input gradient", "skip gradient"), 1e-10),  # float64
    ("compile", "train"): (("logits", "skip gradient"), 1e-2),
    ("compile", "eval"): (("logits", "input gradient"), 1e-2),
    ("bf16", "train"): (("logits", "all gradients"), 0.5),
}


@contextlib.contextmanager
def reference_skip():
    """Eq. 21 with plain autograd (no custom Function, nothing in place): the reference."""
    original = SkipRule.forward

    def forward(self, x, fx):
        c = self.coefficient(x)
        return (1 - c) * x + ((1 + c) * fx if self.scale_branch else fx)

    SkipRule.forward = forward
    try:
        yield
    finally:
        SkipRule.forward = original


def _outputs(model, x, y, device, bf16: bool = False) -> dict[str, torch.Tensor]:
    """Logits, the input gradient and the skip parameters' gradients of one batch."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    logits = logits.to(x.dtype)  # bf16 autocast's logits in the input's precision (float32 or float64)
    F.cross_entropy(logits, y).backward()

    def gradients(params) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    skip = [p for n, p in model.named_parameters() if n.endswith((".lam", ".k")) or ".gate." in n]
    return {
        "logits": logits.detach(),
        "input gradient": x.grad,
        "skip gradient": gradients(skip),
        "all gradients": gradients(model.parameters()),
    }


def parity(names, device: str, paths=tuple(PATHS)) -> list[dict]:
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = create_model(name).to(device)
        x = torch.rand(16, 3, 32, 32, device=device)
        y = torch.arange(16, device=device) % model.info.num_classes
        compiled = None
        for path, mode in paths:
            compared, tolerance = PATHS[path, mode]
            row = {"model": name, "path": path, "mode": mode, "tolerance": tolerance}
            try:
                net, inputs = (copy.deepcopy(model).double(), x.double()) if path == "eager" else (model, x)
                net.train(mode == "train")
                with reference_skip():
                    reference = _outputs(net, inputs, y, device)
                if path == "compile" and compiled is None:
                    compiled = torch.compile(model)
                ours = _outputs(
                    compiled if path == "compile" else net, inputs, y, device, bf16=path == "bf16"
                )
                errors = {
                    k: float((ours[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-12))
                    for k in compared
                }
                rows.append({**row, **errors, "pass": max(errors.values()) <= tolerance})
            except Exception as err:  # a path that cannot run is a failure, with its reason
                rows.append({**row, "pass": False, "error": _first_line(err)})
    return rows


def learns(name: str, n_train: int, device: str, folder: Path) -> list[dict]:
    """A 2-epoch run on the synthetic set must beat chance clearly, as it does on a CPU."""
    began = time.perf_counter()
    config = TrainConfig(name, "synthetic", 0, length="smoke", n_train=n_train, device=device)
    meta = train(config, folder / "results", folder / "data", progress=False)
    accuracy = meta["test_accuracy"]
    return [
        {
            "model": name,
            "images": n_train,
            "epochs": 2,
            "test accuracy": accuracy,
            "seconds": round(time.perf_counter() - began, 1),
            "pass": accuracy is not None and accuracy > 0.2,
        }
    ]


def _ours(
    name, images, labels, device, channels_last=True, bf16=False, compile_mode=None
) -> tuple[float, float]:
    """Our training loop (bench.train.loop.train_epoch): images/s and peak memory in GiB."""
    model = create_model(name).to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    recipe = recipe_for(model.info.family, "cifar10")
    optimizer = make_optimizer(model, recipe, device)
    config = TrainConfig(name, "cifar10", 0, device=device, channels_last=channels_last, bf16=bf16)
    step_model = torch.compile(model, mode=compile_mode) if compile_mode else model
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)
    y = torch.from_numpy(labels).to(device)
    warm = min(len(y), 3 * 128)  # compile and autotune, CUDA graphs recorded
    train_epoch(step_model, optimizer, x[:warm], y[:warm], recipe, epoch_generator(0, 0), config)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    train_epoch(step_model, optimizer, x, y, recipe, epoch_generator(0, 1), config)
    _sync(device)
    rate = len(y) / (time.perf_counter() - began)
    return rate, (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None)


def training(names, steps: int, device: str) -> list[dict]:
    rng = np.random.default_rng(0)
    n = 128 * steps
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)
    gpu = device.startswith("cuda")
    variants = {
        "ours, NCHW": {"channels_last": False},
        "ours, channels_last": {},
        "ours, channels_last + bf16": {"bf16": True},
        "ours, + compile": {"bf16": True, "compile_mode": "default"},
    }
    if gpu:
        variants["ours, + CUDA graphs"] = {"bf16": True, "compile_mode": "reduce-overhead"}
    rows = []
    for name in names:
        torch.manual_seed(0)
        config = TrainConfig(name, "cifar10", 0, device=device)
        baseline = plain(name, images, labels, config, workers=4 if gpu else 0)
        rows.append(
            {"model": name, "loop": "plain (DataLoader)", "images/s": round(baseline, 1), "vs plain": 1.0}
        )
        for label, flags in variants.items():
            try:
                rate, peak = _ours(name, images, labels, device, **flags)
                rows.append(
                    {
                        "model": name,
                        "loop": label,
                        "images/s": round(rate, 1),
                        "vs plain": round(rate / baseline, 2),
                        "peak GiB": None if peak is None else round(peak, 2),
                    }
                )
            except Exception as err:
                rows.append({"model": name, "loop": label, "error": _first_line(err)})
    return rows


def epoch(name: str, n: int, device: str, evaluation_rows: list[dict]) -> list[dict]:
    """One epoch of the paper's recipe (batch 128, SGD) on n CIFAR-sized images, the fastest
    flags of the training section, and the suites' projected hours."""
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)
    gpu = device.startswith("cuda")
    rate, _ = _ours(name, images, labels, device, bf16=gpu, compile_mode="default" if gpu else None)
    rows = [
        {"model": name, "images": n, "epoch seconds": round(n / rate, 2), "train images/s": round(rate, 1)}
    ]
    forward = next((r["clean img/s"] for r in evaluation_rows if r.get("model") == name), None)
    gradient = next((r["hand loop img/s"] for r in evaluation_rows if r.get("model") == name), None)
    if forward and gradient:
        rows[0]["projected hours"] = {
            s: round(projected_hours(s, name, Rates(rate, forward, gradient, "measured"), device), 1)
            for s in ("paper", "quick")
        }
    return rows


def projected_hours(suite_name: str, measured: str, rates: Rates, device: str) -> float:
    """The suite's work on one device: `measured`'s rates, other models' scaled by FLOPs."""
    from bench.run.plan import plan_jobs, plan_tasks
    from bench.run.todo import ToDo

    spec = find_suite(suite_name)
    with tempfile.TemporaryDirectory() as empty:
        options = RunOptions(
            suite=suite_name,
            results_dir=str(Path(empty) / "r"),
            data_dir=str(Path(empty) / "d"),
            device=device,
            dry_run=True,
        )
        tasks = plan_tasks(plan_jobs(spec, options), spec, options, device)
        base = flop_rates(measured, 1.0)
        scaled = {}
        for model in {t.job.name for t in tasks}:
            factor = flop_rates(model, 1.0).forward / base.forward  # images/s scale as 1 / FLOPs
            scaled[model] = Rates(
                rates.train * factor, rates.forward * factor, rates.gradient * factor, "scaled"
            )
        todo = ToDo(options, spec, device, RecordStore(options.results_dir, readonly=True), dry=True)
        return float(estimate(todo, tasks, scaled)["seconds"].sum() / 3600)


def evaluation(names, n: int, device: str, folder: Path) -> list[dict]:
    data = EvalData("synthetic", folder / "data", EvalConfig(n_test=n))
    config = EvalConfig(
        radii_255=(1.0, 2.0, 4.0), iterative_radii_255=(2.0,), n_test=n, batch_size=n, device=device
    )
    rows = []
    for name in names:
        torch.manual_seed(0)
        path = folder / f"{name}.pt"
        torch.save(create_model(name).state_dict(), path)
        defense = state_dict_defense(name, path, "synthetic", name=f"timed-{name}")
        model = defense.model.to(device, memory_format=torch.channels_last)
        x, y = next(data.batches(Cell("clean"), n, device))
        harness_seconds(defense, data, config, CELLS["clean"])  # warm-up
        seconds = {
            key: harness_seconds(defense, data, config, CELLS[key]) for key in ("clean", "fgsm x3", "pgd-20")
        }
        hand = hand_loop_seconds(model, x.contiguous(memory_format=torch.channels_last), y, config.steps)
        rows.append(
            {
                "model": name,
                **{f"{k} img/s": round(n / s, 1) for k, s in seconds.items()},
                "hand loop img/s": round(n * config.steps / hand, 1),
                "PGD-20 vs hand loop": round(hand / seconds["pgd-20"], 3),
            }
        )
    return rows


def stability(names, n: int, device: str) -> list[dict]:
    """The stability stage against one PGD-20 cell on the same images (bench_stability.py),
    and J v as the stage computes it against torch.func.jvp on this device."""
    from bench_stability import costs

    from bench.eval.krylov import jacobian_products
    from bench.eval.stability import block_inputs, blocks, unfused

    rows = []
    for name in names:
        pgd, units = costs(name, n, device)
        torch.manual_seed(0)
        model = create_model(name).to(device).eval().requires_grad_(False)
        with unfused(model):
            chain = blocks(model)
            h = block_inputs(model, chain, torch.rand(4, 3, 32, 32, device=device))[1]
            v = torch.randn_like(h)
            forward, _ = jacobian_products(chain[1], h)
            exact = torch.func.jvp(chain[1], (h,), (v,))[1]
            error = ((forward(v) - exact).norm() / exact.norm()).item()
        rows.append(
            {
                "model": name,
                "PGD-20 ms/img": round(pgd / n * 1000, 2),
                "stage ms/img": round(sum(units.values()) / n * 1000, 2),
                "stage / PGD-20": round(sum(units.values()) / pgd, 2),
                **{
                    f"{k} ms/img": round(s / n * 1000, 2)
                    for k, s in units.items()
                    if not k.startswith("growth@")
                },
                "Jv vs jvp (rel.)": error,
            }
        )
    return rows


def rehearse(suite: tuple[str, ...], limit_s: float, device: str, folder: Path) -> list[dict]:
    """The suite's rehearsal on `device` in a process of its own, cut at `limit_s`: whether
    it finished, in how long, what it recorded and its last line."""
    results, command = (
        folder / "rehearsal",
        [
            sys.executable,
            str(REPO / "run_bench.py"),
            *suite,
            "--rehearse",
            "--device",
            device,
            "--no-progress",
        ],
    )
    command += [
        "--results-dir",
        str(folder),
        "--data-dir",
        str(folder / "rehearsal-data"),
    ]  # into folder/rehearsal
    began = time.perf_counter()
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=limit_s, cwd=REPO)
        code, log_text = run.returncode, run.stderr
    except (
        subprocess.TimeoutExpired
    ) as cut:  # what it logged before the cut (bytes, or text, by Python version)
        code, log_text = (
            None,
            cut.stderr.decode(errors="replace") if isinstance(cut.stderr, bytes) else cut.stderr or "",
        )
    seconds = time.perf_counter() - began
    lines = log_text.strip().splitlines()
    counts = {}
    if (results / "records.sqlite").is_file():
        cells, units = load_records(results), load_stability(results)
        counts = {
            "cells": len(cells),
            "stability units": len(units.drop_duplicates(["run", "seed", "quantity", "perturbation"])),
            "checkpoints": len(load_runs(results)),
        }
    return [
        {
            "command": " ".join(suite) + " --rehearse",
            "finished": code == 0,
            "exit": code,
            "seconds": round(seconds, 1),
            **counts,
            "last line": lines[-1] if lines else "",
        }
    ]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def device_slug(device: str) -> str:
    """gpu-h100, gpu-a100, ... from the GPU's name; cpu on a CPU."""
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    match = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return "gpu-" + (match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-"))


def markdown(report: dict) -> str:
    lines = [
        f"# GPU check: {report['device']}",
        "",
        f"torch {report['torch']}, {report['mode']} mode, {report['when']}",
        "",
    ]
    for section, rows in report["sections"].items():
        lines += [f"## {section} ({report['seconds'][section]:.0f} s)", ""]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:,.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and a few steps: runs anywhere")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--sections", default="parity,learning,rehearsal,training,evaluation,epoch,stability")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    plan = TINY if args.tiny else FULL
    slug = device_slug(args.device) + ("-tiny" if args.tiny else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "mode": "tiny" if args.tiny else "full",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sections": {},
        "seconds": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        steps = {
            "parity": lambda: parity(plan["parity"], args.device),
            "learning": lambda: learns(*plan["learn"], args.device, folder),
            "training": lambda: training(plan["training"], plan["steps"], args.device),
            "evaluation": lambda: evaluation(plan["evaluation"], plan["eval_images"], args.device, folder),
            "epoch": lambda: epoch(*plan["epoch"], args.device, report["sections"].get("evaluation", [])),
            "stability": lambda: stability(plan["stability"], plan["stability_images"], args.device),
            "rehearsal": lambda: rehearse(*plan["rehearsal"], args.device, folder),
        }
        for section in args.sections.split(","):
            began = time.perf_counter()
            report["sections"][section] = steps[section]()
            report["seconds"][section] = time.perf_counter() - began
            (out / f"{slug}.json").write_text(json.dumps(report, indent=1) + "\n")  # after every section
            (out / f"{slug}.md").write_text(markdown(report))
            print(f"{section}: {report['seconds'][section]:.0f} s", flush=True)
    failed = [r for s in ("parity", "learning") for r in report["sections"].get(s, []) if not r.get("pass")]
    for row in failed:
        print(f"failed: {row}", file=sys.stderr)
    print(f"wrote {out / slug}.json and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
