#!/usr/bin/env python
"""inres-bench command line: parses arguments into configs and calls `bench`."""

from __future__ import annotations

import argparse
import logging
import sys

from models import GROUPS, UserError, list_models, model_entry, resolve_models

log = logging.getLogger("inres-bench")
STAGES = ("summary", "train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Robustness of residual, interpolated and plain networks (Yang et al., ICML 2020).",
    )
    parser.add_argument(
        "--models",
        default="all",
        help=f"comma-separated names, globs (in-resnet*) or groups ({', '.join(GROUPS)}); default: all",
    )
    parser.add_argument("--stage", default="summary", choices=STAGES, help="what to run (default: summary)")
    parser.add_argument(
        "--list-models", action="store_true", help="list registered names and groups, then exit"
    )
    parser.add_argument("--num-classes", type=int, default=10, choices=(10, 100), help="summary: head size")
    train = parser.add_argument_group("train")
    train.add_argument("--datasets", default="cifar10", help="comma-separated: cifar10, cifar100, synthetic")
    train.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0-4)")
    train.add_argument("--preset", default="paper", choices=("paper", "authors-code"))
    train.add_argument(
        "--length", default="full", choices=("full", "quick", "smoke"), help="epochs: paper's, 1/5, 2"
    )
    train.add_argument(
        "--lambda-init", default=None, help="a,b: lambda_n ~ U[a, b] instead of the model's default"
    )
    train.add_argument("--n-train", type=int, default=None, help="train on the first N images only")
    train.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    train.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    train.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    train.add_argument("--results-dir", default="results")
    train.add_argument("--data-dir", default=None, help="default: $INRES_BENCH_DATA or ./data")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        if args.list_models:
            sys.stdout.write(listing() + "\n")
            return 0
        names = resolve_models(args.models)
        if args.stage == "train":
            return run_training(args, names)
        from bench.summary import model_summary, render_summary

        log.info("building %d model(s): %s", len(names), ", ".join(names))
        sys.stdout.write(render_summary(model_summary(names, args.num_classes)) + "\n")
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


def run_training(args: argparse.Namespace, names: list[str]) -> int:
    from bench.train import TrainConfig, check_device, train

    check_device(args.device)
    configs = [
        TrainConfig(
            name,
            dataset,
            seed,
            args.preset,
            args.length,
            _pair(args.lambda_init),
            args.n_train,
            args.device,
            args.channels_last,
            args.bf16,
            args.compile,
        )
        for name in names
        for dataset in _items(args.datasets, "--datasets")
        for seed in (int(s) for s in _items(args.seeds, "--seeds"))
    ]
    metas = [train(c, args.results_dir, args.data_dir, progress=not args.no_progress) for c in configs]
    failed = [m for m in metas if m["status"] == "failed"]
    log.info("%d run(s): %d finished, %d failed", len(metas), len(metas) - len(failed), len(failed))
    return 0


def _items(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{option} is empty: give a comma-separated list")
    if option == "--seeds" and not all(t.isdigit() for t in items):
        raise UserError(f"--seeds takes non-negative integers, got {text!r}")
    return items


def _pair(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--lambda-init takes two numbers a,b (e.g. 0.2,0.25), got {text!r}") from None
    return low, high


def listing() -> str:
    lines = [f"{name:30s} {model_entry(name).description}" for name in list_models()]
    lines += ["", "groups:"] + [f"  {g:10s} {text}" for g, text in GROUPS.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
