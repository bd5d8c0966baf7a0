#!/usr/bin/env python
"""inres-bench command line: parses arguments into options and calls `bench`."""

from __future__ import annotations

import argparse
import logging
import re
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import NoReturn, TypeVar

from bench.core.environment import tolerant_streams
from bench.core.messages import disk_full, disk_full_message
from bench.core.numbers import decimal, integer
from bench.core.presets import PRESET_NAMES
from bench.data.noise_files import NOISE_SOURCES
from bench.run.options import DEFENSE_STAGES, EXECUTORS, RunOptions
from models import GROUPS, FieldError, UserError, list_models, model_entry, resolve_models

log = logging.getLogger("inres-bench")
T = TypeVar("T")


def _option_type(read: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type of bench.core.numbers' reader: its reason in the error line."""

    def parse(text: str) -> T:
        try:
            return read(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


INTEGER, DECIMAL = _option_type(integer), _option_type(decimal)


def _listed(option: str, read: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """An argparse type: a comma-separated list of `read` values as a tuple; a mistake is
    the option's own error line (UserError passes through argparse unchanged)."""
    return lambda text: tuple(read(t) for t in _items(text, option))


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is our one `error:` line (and exit 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench.data.datasets import DATASETS
    from bench.run.suites import SUITES

    parser = _Parser(
        description="Robustness of residual, interpolated and plain networks (Yang et al., ICML 2020).",
        epilog="suites: " + "; ".join(f"{s.name}: {s.description}" for s in SUITES.values()),
    )
    parser.add_argument(
        "--suite",
        default=None,
        choices=tuple(SUITES),
        help="what to reproduce, or the protocol a defense is evaluated with (default: smoke; paper for a defense)",
    )
    parser.add_argument(
        "--stage",
        default=None,
        help="comma-separated stages among train, eval, check (the sanity checks of each checkpoint), "
        "stability (how each block amplifies a perturbation, its Jacobian's spectrum), report (reports and "
        "figures), figures (the figures alone) (default: the first five; for a defense all but train); or "
        "summary: print the models' sizes and damped blocks",
    )
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated names, globs (in-resnet*) or groups ({', '.join(GROUPS)}); default: the suite's",
    )
    parser.add_argument(
        "--datasets",
        type=_listed("--datasets", str),
        default=None,
        help=f"comma-separated: {', '.join(DATASETS)}",
    )
    parser.add_argument(
        "--seeds",
        type=_listed("--seeds", int),
        default=None,
        help="comma-separated seeds (default: the suite's)",
    )
    parser.add_argument("--preset", default=RunOptions.preset, choices=PRESET_NAMES)
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and its estimated cost, run nothing"
    )
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="rehearse the suite: its whole plan (every model at full depth, every data set, study and stage) "
        "on a few images and training steps, with stand-in data where the data sets are missing; its outputs "
        "are tagged rehearsal, and its last line compares the measured time per stage with the estimate",
    )
    parser.add_argument(
        "--list-models", action="store_true", help="list registered names and groups, then exit"
    )
    parser.add_argument(
        "--device", default=RunOptions.device, help="auto (a GPU when there is one), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument("--results-dir", default=RunOptions.results_dir)
    parser.add_argument("--data-dir", default=None, help="default: $INRES_BENCH_DATA or ./data")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument(
        "--no-figures",
        dest="figures",
        action="store_false",
        help="the report stage writes tables, REPORT.md and the leaderboard but draws no figures "
        "(seconds saved; --stage figures draws them alone)",
    )
    scale = parser.add_argument_group("scale out")
    scale.add_argument(
        "--executor",
        default=RunOptions.executor,
        choices=EXECUTORS,
        help="local: this machine (one process, or --workers processes, one per GPU); ray: a Ray cluster",
    )
    scale.add_argument(
        "--workers",
        type=INTEGER,
        default=None,
        help="tasks at once (default: one per visible GPU, else 1; Ray: the cluster's)",
    )
    scale.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (e.g. auto, or host:6379); default: a Ray on localhost only",
    )
    scale.add_argument(
        "--assume-tflops",
        type=DECIMAL,
        default=None,
        help="--dry-run: estimate from each model's FLOPs at this achieved TFLOP/s (for a device not here)",
    )
    train = parser.add_argument_group("train")
    train.add_argument(
        "--length", default=None, choices=("full", "quick", "smoke"), help="epochs: paper's, 1/5, 2"
    )
    train.add_argument(
        "--lambda-init",
        type=_pair,
        default=None,
        help="a,b: lambda_n ~ U[a, b] instead of the suite's (e.g. -0.1,0)",
    )
    train.add_argument("--n-train", type=INTEGER, default=None, help="train on the first N images only")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast for training (GPU)")
    train.add_argument(
        "--contiguous",
        dest="channels_last",
        action="store_false",
        help="train in the contiguous (NCHW) layout, not channels_last",
    )
    train.add_argument("--compile", action="store_true", help="torch.compile the model for training (GPU)")
    evaluation = parser.add_argument_group("eval")
    evaluation.add_argument(
        "--n-test", type=INTEGER, default=None, help="class-balanced test subset of N images"
    )
    evaluation.add_argument(
        "--n-autoattack",
        type=INTEGER,
        default=None,
        help="AutoAttack's class-balanced subset of N images (default: the suite's, never more than --n-test)",
    )
    evaluation.add_argument(
        "--radii",
        dest="radii_255",
        type=_radii,
        default=None,
        help="attack radii in 1/255, comma-separated (default 1,2,4); 0 is allowed: an attack at radius 0 "
        "must give the clean accuracy, a check of the attack path",
    )
    evaluation.add_argument(
        "--n-stability",
        type=INTEGER,
        default=None,
        help="the stability stage's class-balanced subset of N images (default: the suite's, never more than --n-test)",
    )
    evaluation.add_argument(
        "--steps",
        type=INTEGER,
        default=RunOptions.steps,
        help=f"IFGSM / PGD iterations (default {RunOptions.steps})",
    )
    evaluation.add_argument("--noise-source", default=RunOptions.noise_source, choices=NOISE_SOURCES)
    evaluation.add_argument(
        "--batch-size", type=INTEGER, default=None, help="default: 256 on a CPU, 512 on a GPU"
    )
    report = parser.add_argument_group("report")
    report.add_argument(
        "--rank-by",
        default=RunOptions.rank_by,
        help="leaderboard order: a metric such as pgd@2, clean, noise",
    )
    figures = parser.add_argument_group("figures (Fig. 2's loss landscape)")
    figures.add_argument(
        "--landscape-index",
        type=INTEGER,
        default=None,
        help="draw Fig. 2 on this clean test image (default: the paper's two CIFAR-C images, shot noise #3 and "
        "speckle noise #8, or clean test images 2 and 7 without the noise files)",
    )
    figures.add_argument(
        "--landscape-points",
        type=INTEGER,
        default=RunOptions.landscape[1],
        help=f"grid points per axis (default {RunOptions.landscape[1]})",
    )
    figures.add_argument(
        "--landscape-radius",
        type=DECIMAL,
        default=RunOptions.landscape[2],
        help=f"grid half-width in 1/255 (default {RunOptions.landscape[2]:g})",
    )
    defense = parser.add_argument_group(
        "rank a defense (instead of the zoo): evaluated with the suite's protocol, recorded, put on the leaderboard"
    )
    defense.add_argument(
        "--defense",
        default=None,
        metavar="MODULE:FACTORY",
        help="your network: a module (my_pkg.nets:SmallCNN) or file (nets.py:SmallCNN) and the class or function "
        "that builds it; with --weights",
    )
    defense.add_argument("--weights", default=None, metavar="PATH", help="its state_dict file (torch.save)")
    defense.add_argument(
        "--mean",
        default=None,
        help="the normalisation your network expects, per channel (e.g. 0.4914,0.4822,0.4465); "
        "default: none, the network takes [0, 1] pixels",
    )
    defense.add_argument("--std", default=None, help="per channel, with --mean (e.g. 0.2470,0.2435,0.2616)")
    defense.add_argument("--dataset", default=None, help="the defense's data set (default: cifar10)")
    defense.add_argument(
        "--name",
        default=None,
        help="its name in the records and the leaderboard (default: the weights' file name)",
    )
    defense.add_argument(
        "--state-dict",
        nargs=2,
        default=None,
        metavar=("ARCH", "PATH"),
        help="a registered architecture (see --list-models) with your weights",
    )
    defense.add_argument(
        "--robustbench",
        default=None,
        metavar="NAME",
        help="a RobustBench zoo model (e.g. Carmon2019Unlabeled), fetched by RobustBench's own loader when missing",
    )
    defense.add_argument(
        "--model-dir", default=None, help="RobustBench's checkpoint folder (default: models)"
    )
    defense.add_argument(
        "--threat-model",
        default=None,
        help="RobustBench's threat model: Linf, L2, corruptions (default: Linf)",
    )
    defense.add_argument(
        "--defenses",
        dest="defenses_file",
        default=None,
        metavar="TOML",
        help="several defenses at once: one [name] table each, with the keys above (defense, weights, mean, std, "
        "dataset, state-dict, robustbench, model-dir, threat-model)",
    )
    summary = parser.add_argument_group("summary")
    summary.add_argument("--num-classes", type=INTEGER, default=10, choices=(10, 100), help="head size")
    return parser.parse_args(_joined_negatives(sys.argv[1:] if argv is None else argv))


def _joined_negatives(argv: list[str]) -> list[str]:
    """`--lambda-init -0.1,0` as `--lambda-init=-0.1,0`: argparse would read the pair as an
    option because it starts with a dash."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--lambda-init" and re.fullmatch(r"-[\d.].*", arg):
            out[-1] = f"--lambda-init={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    tolerant_streams()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(argv)
        if args.list_models:
            sys.stdout.write(listing() + "\n")
            return 0
        if args.stage == "summary":
            return print_summary(args)
        from bench.run.pipeline import run

        return run(options(args))
    except FieldError as err:  # a config's field: named by the option that set it
        option = OPTION_OF_FIELD.get(err.field)
        return _fail(err.naming(option) if option else str(err))
    except UserError as err:
        return _fail(str(err))
    except (OSError, RuntimeError, sqlite3.Error) as err:  # a full disk under a library's own error
        full = disk_full(err)
        if full is None:
            raise
        filename = getattr(full, "filename", None)
        where = f"for {filename}" if filename else "on the disk of the results or data"
        return _fail(disk_full_message(full, where))


# The options whose values a config checks where it uses them (bench.eval.protocol.EvalConfig)
OPTION_OF_FIELD = {"radii_255": "--radii", "n_test": "--n-test", "subsets autoattack": "--n-autoattack"}


def _fail(message: str) -> int:
    """The one error line: a name or value holding a newline or another control character
    is shown escaped, so that the line stays one line."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    sys.stderr.write(f"error: {line}\n")
    return 2


DEFENSE_OPTIONS = (
    "defense",
    "weights",
    "mean",
    "std",
    "dataset",
    "name",
    "state_dict",
    "robustbench",
    "model_dir",
    "threat_model",
)


def defenses(args: argparse.Namespace) -> tuple:
    """The defenses the arguments name (--defenses, or one from --defense / --state-dict /
    --robustbench), as bench.eval.defenses.DefenseSpec; () for a run of the zoo."""
    from pathlib import Path

    from bench.eval.defenses import load_defenses, spec_from

    given = {k.replace("_", "-"): getattr(args, k) for k in DEFENSE_OPTIONS if getattr(args, k) is not None}
    if args.defenses_file is not None:
        if given:
            raise UserError(
                f"--{next(iter(given))} and --defenses: name the defenses in one place (the file, or the options)"
            )
        return load_defenses(args.defenses_file)
    sources = [f"--{k}" for k in ("defense", "state-dict", "robustbench") if k in given]
    if not sources:
        if given:
            raise UserError(
                f"--{next(iter(given))} describes a defense: name it with --defense, --state-dict or --robustbench"
            )
        return ()
    where = " ".join(
        [sources[0], *([str(given[sources[0][2:]])] if sources[0] != "--state-dict" else given["state-dict"])]
    )
    return (spec_from(given, where, Path.cwd()),)


def options(args: argparse.Namespace) -> RunOptions:
    chosen = defenses(args)
    default_stages = ",".join(DEFENSE_STAGES if chosen else RunOptions.stages)
    # checked by RunOptions
    stages = tuple(_items(args.stage if args.stage is not None else default_stages, "--stage"))
    given = {f.name: getattr(args, f.name) for f in fields(RunOptions) if f.name in vars(args)}  # same dests
    return RunOptions(
        **{
            **given,
            "suite": args.suite or ("paper" if chosen else "smoke"),
            "stages": stages,
            "landscape": (args.landscape_index, args.landscape_points, args.landscape_radius),
            "defenses": chosen,
        }
    )


def print_summary(args: argparse.Namespace) -> int:
    from bench.run.summary import model_summary, render_summary

    names = resolve_models(args.models or "all")
    log.info("building %d model(s): %s", len(names), ", ".join(names))
    sys.stdout.write(render_summary(model_summary(names, args.num_classes)) + "\n")
    return 0


def _items(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{option} is empty: give a comma-separated list")
    if option == "--seeds" and not all(re.fullmatch(r"[0-9]+", t) for t in items):
        raise UserError(f"--seeds takes non-negative integers, got {text!r}")
    return items


def _radii(text: str) -> tuple[float, ...]:
    """Every item a number (an empty one, as in 1,,2, is a typo, not nothing); the values
    are checked where they are used (EvalConfig)."""
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise UserError("--radii is empty: give a comma-separated list")
    if not all(items):
        raise UserError(f"--radii {text!r} has an empty item: give comma-separated numbers, e.g. 1,2,4")
    try:
        return tuple(decimal(t) for t in items)
    except ValueError as err:
        raise UserError(f"--radii takes comma-separated numbers, got {text!r}: {err}") from None


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (decimal(t) for t in _exactly_two(text))
    except ValueError as err:
        raise UserError(f"--lambda-init takes two numbers a,b (e.g. 0.2,0.25), got {text!r}: {err}") from None
    return low, high


def _exactly_two(text: str) -> list[str]:
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"{len(parts)} given")
    return parts


def listing() -> str:
    lines = [f"{name:30s} {model_entry(name).description}" for name in list_models()]
    lines += ["", "groups:"] + [f"  {g:10s} {text}" for g, text in GROUPS.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
