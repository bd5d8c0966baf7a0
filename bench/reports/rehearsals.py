"""How a rehearsal's reports say so (bench.run.rehearsal: a suite's plan on a few images and
training steps): a banner, a column, a stamp on every figure, no verdict on any claim."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from bench.records import sanity

REHEARSAL_STAMP = "REHEARSAL: not measurements"  # on every figure of a rehearsal's report
REHEARSAL_BANNER = (
    "**Rehearsal** (`--rehearse`): every number here comes from networks trained for a few steps and "
    "tested on a few images, to show that each stage of the plan runs. None is a measurement: none is "
    "compared with the paper, and none is shown beside the records of real runs."
)


def rehearsal_marked(texts: dict[Path, str | bytes]) -> dict[Path, str | bytes]:
    """A rehearsal's outputs, each saying so where a reader looks: the banner under every
    Markdown file's title, a `rehearsal` column in every table CSV (the records, sanity and
    leaderboard CSVs name each run, whose tag says rehearsal)."""
    out = {}
    for path, text in texts.items():
        if path.suffix == ".md":
            title, _, rest = text.partition("\n")
            text = f"{title}\n\n{REHEARSAL_BANNER}\n{rest}"
        elif path.suffix == ".csv" and path.parent.name == "tables" and text.strip():
            frame = pd.read_csv(io.StringIO(text))
            text = frame.assign(rehearsal=True).to_csv(index=False) if "run" not in frame else text
        out[path] = text
    return out


RELAXED_LEGEND = (
    "Relaxed for rehearsal runs, by rule (the gates that need a trained network measured on enough images: "
    "those comparing attack strengths, and vanishing input gradients, which a deep network two steps from its "
    "initialisation may have): "
    + ", ".join(sanity.relaxed_gates())
    + "; and training's chance-level gate (a run at chance counts as finished). A relaxed gate is "
    "still measured and flagged `(relaxed: rehearsal)`; it never makes a row unreliable."
)
NOT_JUDGED = "not judged (rehearsal: not a measurement)"
