"""RobustBench's threat models through the harness, against direct calls on the same model and images.

Ratios measured in one run, rounds alternating, best of each (throughput ratio: ours / direct):
- AutoAttack standard at L-infinity 8/255 as a cell (`bench.eval.engine.evaluate`: seeded
  per batch, audited, classified, packed bits, one SQLite transaction) against a direct call
  of the official code (pyautoattack's AutoAttack(...).run_standard_evaluation, as
  RobustBench's benchmark() makes it, then the accuracy of its output), the same seed and
  batch size; target >= 0.95.
- The corruption sweep (15 corruptions x 5 severities, from files in the released CIFAR-C
  layout) against a plain loop over the same arrays (np.load, slice the severity's rows,
  /255, forward, count); target >= 0.95.
The model is trained for a few steps on the synthetic set (an untrained one predicts one
class: AutoAttack would stop at once), which is written in CIFAR-10's formats with
corruption files made from its test images.

    python benchmarks/bench_robustbench.py --model resnet20 --n-autoattack 64 --n-corruptions 1000
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyautoattack
import torch
from torch.nn import functional as F

from bench.data.cifar import write_batch
from bench.data.noise import CORRUPTIONS, SEVERITIES
from bench.data.splits import FIRST, load_test, load_train
from bench.eval.adapters import state_dict_defense
from bench.eval.engine import evaluate
from bench.eval.protocol import Cell, EvalConfig, Subject
from bench.eval.testdata import EvalData
from bench.records.load import load_records
from bench.records.store import RecordStore
from models import create_model


def trained(model_name: str, data_dir: Path, steps: int) -> torch.nn.Module:
    """The model after `steps` SGD steps of 128 synthetic training images (unaugmented)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10)
    train = load_train("synthetic", data_dir)
    x = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(train.labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        index = torch.arange(step * 128, (step + 1) * 128) % len(x)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def as_cifar10(data_dir: Path, source: Path) -> None:
    """The synthetic set in CIFAR-10's released formats under `data_dir`: the python batches,
    and CIFAR-10-C/<corruption>.npy with labels.npy, every corruption a noisy copy of the
    test images (RobustBench's protocol reads CIFAR-10-C / CIFAR-100-C only)."""
    train, test = load_train("synthetic", source), load_test("synthetic", source)
    for i, part in enumerate(np.array_split(np.arange(len(train.labels)), 5)):
        write_batch(
            data_dir / "cifar-10-batches-py" / f"data_batch_{i + 1}", train.images[part], train.labels[part]
        )
    write_batch(data_dir / "cifar-10-batches-py" / "test_batch", test.images, test.labels)
    test_images, test_labels = test.images, test.labels
    folder = data_dir / "CIFAR-10-C"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "labels.npy", np.tile(test_labels, len(SEVERITIES)))
    rng = np.random.default_rng(0)
    for name in CORRUPTIONS:
        noisy = [np.clip(test_images + rng.normal(0, 5 * s, test_images.shape), 0, 255) for s in SEVERITIES]
        np.save(folder / f"{name}.npy", np.concatenate(noisy).astype(np.uint8))


def harness_seconds(defense, data: EvalData, config: EvalConfig, cells: list[Cell]) -> tuple[float, float]:
    """(wall seconds of `evaluate` on `cells` into a fresh store, accuracy of the first cell)."""
    with tempfile.TemporaryDirectory() as results:
        subject = Subject(defense, defense.info.name, defense.info.name, 0)
        began = time.perf_counter()
        evaluate(subject, config, RecordStore(results), data, progress=False, cells=cells)
        seconds = time.perf_counter() - began
        return seconds, float(load_records(results)["accuracy"].iloc[0])


def direct_autoattack(model, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[float, float]:
    """(seconds, accuracy) of the official code as RobustBench's benchmark() calls it."""
    began = time.perf_counter()
    adversary = pyautoattack.AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", seed=seed)
    adversary.verbose = False
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
    with torch.no_grad():
        accuracy = float((model(x_adv).argmax(1) == y).float().mean())
    return time.perf_counter() - began, accuracy


def plain_sweep(model, folder: Path, n: int, batch: int) -> float:
    """Seconds of a plain loop over the 75 corruption arrays' first n rows per severity."""
    began = time.perf_counter()
    labels = np.load(folder / "labels.npy")
    for name in CORRUPTIONS:
        images = np.load(folder / f"{name}.npy", mmap_mode="r")
        per = len(images) // len(SEVERITIES)
        for s in SEVERITIES:
            rows = slice((s - 1) * per, (s - 1) * per + n)
            x_all = torch.from_numpy(np.ascontiguousarray(images[rows])).permute(0, 3, 1, 2)
            y_all = torch.from_numpy(labels[rows].astype(np.int64))
            with torch.no_grad():
                for start in range(0, n, batch):
                    x = x_all[start : start + batch].float() / 255
                    (model(x).argmax(1) == y_all[start : start + batch]).sum()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--n-autoattack", type=int, default=64)
    parser.add_argument(
        "--n-corruptions", type=int, default=1000, help="test images per corruption and severity"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        source, data_dir = Path(args.data_dir or scratch), Path(scratch) / "cifar10"
        as_cifar10(data_dir, source)
        test = load_test("cifar10", data_dir)
        model = trained(args.model, source, args.train_steps)
        weights = Path(scratch) / "weights.pt"
        torch.save(model.state_dict(), weights)
        defense = state_dict_defense(args.model, weights, dataset="cifar10")
        n_aa = args.n_autoattack
        aa_config = EvalConfig(
            n_test=n_aa, subset_rule=FIRST, batch_size=n_aa, radii_255=(8.0,), extra=(("autoattack", (8.0,)),)
        )
        sweep_config = EvalConfig(
            n_test=args.n_corruptions,
            subset_rule=FIRST,
            noise_source="released",
            noise_groups=CORRUPTIONS,
            batch_size=256,
        )
        aa_data = EvalData("cifar10", data_dir, aa_config)
        sweep_data = EvalData("cifar10", data_dir, sweep_config)
        x = torch.from_numpy(test.images[:n_aa]).permute(0, 3, 1, 2).contiguous().float() / 255
        y = torch.from_numpy(test.labels[:n_aa])
        seeds: list[int] = []
        official = pyautoattack.AutoAttack.__init__

        def recorded(self, *a, **kw):  # the seed the harness gives AutoAttack: the direct call's too
            seeds.append(kw["seed"])
            official(self, *a, **kw)

        pyautoattack.AutoAttack.__init__ = recorded
        sweep_cells = [Cell(c, 0.0, s) for c in CORRUPTIONS for s in SEVERITIES]
        folder = data_dir / "CIFAR-10-C"
        best = {"aa ours": 1e9, "aa direct": 1e9, "sweep ours": 1e9, "sweep plain": 1e9}
        accuracies = {}
        for _ in range(args.rounds):
            seconds, accuracies["ours"] = harness_seconds(
                defense, aa_data, aa_config, [Cell("autoattack", 8.0)]
            )
            best["aa ours"] = min(best["aa ours"], seconds)
            seconds, accuracies["direct"] = direct_autoattack(model, x, y, seeds[-1])
            best["aa direct"] = min(best["aa direct"], seconds)
            best["sweep ours"] = min(
                best["sweep ours"], harness_seconds(defense, sweep_data, sweep_config, sweep_cells)[0]
            )
            best["sweep plain"] = min(
                best["sweep plain"], plain_sweep(model, folder, args.n_corruptions, 256)
            )
        pyautoattack.AutoAttack.__init__ = official
        images = len(sweep_cells) * args.n_corruptions
        print(
            f"| {args.model} | AutoAttack 8/255, {n_aa} images | {best['aa ours']:.2f} s | {best['aa direct']:.2f} s | "
            f"{best['aa direct'] / best['aa ours']:.3f} | accuracy ours {accuracies['ours']:.3f}, direct {accuracies['direct']:.3f} |"
        )
        print(
            f"| {args.model} | 75 corruption cells, {images:,} images | {best['sweep ours']:.2f} s | "
            f"{best['sweep plain']:.2f} s | {best['sweep plain'] / best['sweep ours']:.3f} | |"
        )


if __name__ == "__main__":
    main()
