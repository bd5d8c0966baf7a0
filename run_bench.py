#!/usr/bin/env python
"""inres-bench command line: parses arguments and calls `bench`."""

from __future__ import annotations

import argparse
import logging
import sys

from models import GROUPS, UserError, list_models, model_entry, resolve_models

log = logging.getLogger("inres-bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Robustness of residual, interpolated and plain networks (Yang et al., ICML 2020).",
    )
    parser.add_argument(
        "--models",
        default="all",
        help=f"comma-separated names, globs (in-resnet*) or groups ({', '.join(GROUPS)}); default: all",
    )
    parser.add_argument("--num-classes", type=int, default=10, choices=(10, 100), help="classifier head size")
    parser.add_argument(
        "--list-models", action="store_true", help="list registered names and groups, then exit"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        if args.list_models:
            sys.stdout.write(listing() + "\n")
            return 0
        from bench.summary import model_summary, render_summary

        names = resolve_models(args.models)
        log.info("building %d model(s): %s", len(names), ", ".join(names))
        sys.stdout.write(render_summary(model_summary(names, args.num_classes)) + "\n")
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


def listing() -> str:
    lines = [f"{name:30s} {model_entry(name).description}" for name in list_models()]
    lines += ["", "groups:"] + [f"  {g:10s} {text}" for g, text in GROUPS.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
