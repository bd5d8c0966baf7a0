"""How a rehearsal's reports say so (bench.run.rehearsal: a suite's plan on a few images and
training steps, in a results folder of its own marked by REHEARSAL_FILE): a banner, a
column, a stamp on every figure, no verdict on any claim, and the suite's relaxed gates."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from models import UserError

REHEARSAL_FILE = "rehearsal.json"  # in a rehearsal's results folder: what it rehearses, and its relaxed gates


@dataclass(frozen=True)
class Rehearsal:
    """What a rehearsal's folder says of itself (bench.run.rehearsal writes it)."""

    suite: str  # the suite it rehearses
    relaxed_gates: frozenset[str]  # the sanity gates its suite does not hold to (flagged, never critical)


def rehearsal_of(results: Path) -> Rehearsal | None:
    """The rehearsal a results folder holds, or None for a folder of measurements."""
    path = results / REHEARSAL_FILE
    if not path.is_file():
        return None
    try:
        said = json.loads(path.read_text())
        return Rehearsal(str(said["suite"]), frozenset(map(str, said["relaxed_gates"])))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{path} is not a rehearsal's record ({type(err).__name__}: {err}): rehearse again "
            "in a new --results-dir"
        ) from None


REHEARSAL_STAMP = "REHEARSAL: not measurements"  # on every figure of a rehearsal's report
REHEARSAL_BANNER = (
    "**Rehearsal** (`--rehearse`): every number here comes from networks trained for a few steps and "
    "tested on a few images, to show that each stage of the plan runs. None is a measurement: none is "
    "compared with the paper, and a rehearsal has a results folder of its own."
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


def relaxed_legend(rehearsal: Rehearsal) -> str:
    """The sanity table's note in a rehearsal's report: which gates its suite relaxes, and why."""
    return (
        "Relaxed in a rehearsal, by rule (the gates that need a trained network measured on enough images: "
        "those comparing attack strengths, and vanishing input gradients, which a deep network two steps "
        "from its initialisation may have): "
        + ", ".join(sorted(rehearsal.relaxed_gates))
        + "; and training's chance-level gate (a run at chance counts as finished). A relaxed gate is "
        "still measured and flagged `(relaxed)`; it never makes a row unreliable."
    )


NOT_JUDGED = "not judged (rehearsal: not a measurement)"
