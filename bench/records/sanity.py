"""Sanity gates: evidence that a row's numbers are not an artefact of broken gradients,
judged from the records alone.

Two kinds, each with its measured figure and the limit above which it fails:
- gates on the records (`record_gates`, recomputed by every report): accuracy falls with
  the radius; IFGSM and PGD are at least as strong as FGSM; PGD-50 at 16/255 and 64/255
  leaves at most chance + 2 points; random noise in the eps-ball is weaker than PGD; the
  reference attack (AutoAttack) is not far below PGD;
- checks on a checkpoint, measured once by the check stage (bench.eval.model_checks) and
  recorded: input gradients on a batch are finite and not zero; the model is deterministic
  in eval mode, returns logits (not probabilities) of the data set's classes, has no
  dynamic forward (AutoAttack's own checks); PGD crafted on the plain ResNet of the same
  depth does not beat white-box PGD on the interpolated model (transfer).
A failed gate is a flag; a failed critical gate makes the row `unreliable`. A row is
reliable only when every critical gate that applies to it was measured and passed;
otherwise `unreliable` is missing ("not checked") and `unchecked` names the gates not
measured (transfer applies to interpolated models with a registered ResNet, alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

from bench.attacks.perturbations import ATTACK, PERTURBATIONS, metric_name, metric_radius
from bench.data.datasets import dataset_info
from bench.records.aggregate import ENTRY
from models import plain_counterpart

GATE_TOLERANCE = 0.5  # points: the least difference that counts (or the seeds' std, if larger)
CHANCE_MARGIN = 2.0  # points above chance that PGD-50 at a large radius may leave
REFERENCE_GAP = 5.0  # points the reference attack may be below PGD
TRANSFER_MARGIN = 2.0  # points a transfer attack may beat white-box PGD by (batch noise)
ZERO_GRADIENTS = 0.10  # share of a batch with an all-zero input gradient
NO_LAMBDA = -1.0


@dataclass(frozen=True)
class Gate:
    flag: str  # what a failure is called in the `flags` column
    critical: bool  # a failure makes the row unreliable
    figure: str  # what the value is, for the sanity table's legend
    # it compares attack strengths, which say something only of a trained network measured on
    # enough images: a rehearsal's suite relaxes it (measured and flagged, never making a row unreliable)
    needs_training: bool = False


GATES = {
    "eps-monotone": Gate(
        "eps-not-monotone", False, "largest rise of an attack's accuracy with the radius", needs_training=True
    ),
    "iterative-vs-fgsm": Gate(
        "iterative-weaker-than-fgsm", True, "IFGSM/PGD minus FGSM, largest", needs_training=True
    ),
    "large-eps": Gate(
        "large-eps-above-chance",
        True,
        "PGD-50 at a large radius (16/255 on; L2 8 on) minus chance",
        needs_training=True,
    ),
    "noise-vs-pgd": Gate(
        "noise-stronger-than-pgd",
        True,
        "PGD minus uniform noise at the same radius, largest",
        needs_training=True,
    ),
    "reference-gap": Gate(
        "reference-below-pgd", True, "PGD minus the reference attack, largest", needs_training=True
    ),
    "zero-gradients": Gate(
        "zero-gradients", False, "share of a batch with all-zero input gradients", needs_training=True
    ),  # a deep net a few steps from its init may vanish them
    "nonfinite-gradients": Gate(
        "nonfinite-gradients", True, "share of a batch with non-finite input gradients"
    ),
    "randomized": Gate("randomized", True, "1 when repeated forward passes differ (AutoAttack's check)"),
    "probabilities": Gate("outputs-probabilities", True, "1 when outputs are probabilities, not logits"),
    "classes": Gate("wrong-classes", True, "outputs minus the data set's classes, in absolute value"),
    "dynamic": Gate(
        "dynamic-forward", True, "1 when the forward pass computes gradients (AutoAttack's check)"
    ),
    "transfer": Gate(
        "transfer-stronger-than-white-box",
        True,
        "points PGD transferred from the plain ResNet beats white-box PGD by",
        needs_training=True,
    ),
}


def adversarial() -> list[str]:
    """The attacks whose accuracy must fall with the radius (not random noise)."""
    return [p.name for p in PERTURBATIONS.values() if p.kind == ATTACK and p.falls_with_radius]


def _named(fact: str) -> list[tuple[str, str]]:
    """(perturbation, the perturbation its `fact` names) for each registered one that names one."""
    return [(p.name, named) for p in PERTURBATIONS.values() if isinstance(named := getattr(p, fact), str)]


def record_gates(aggregated: pd.DataFrame) -> pd.DataFrame:
    """One row per entry and gate computed from the aggregated records (accuracy in %):
    ENTRY columns, `gate`, `value`, `limit`, `detail`. Gates without the metrics they
    compare are left out."""
    rows = []
    for entry, metrics in aggregated.groupby(ENTRY, dropna=False, sort=False):
        means = dict(zip(metrics["metric"], metrics["mean"], strict=True))
        stds = dict(zip(metrics["metric"], metrics["std"], strict=True))
        classes = dataset_info(entry[0]).num_classes
        for gate, value, limit, detail in _gates(means, stds, classes):
            rows.append(
                {
                    **dict(zip(ENTRY, entry, strict=True)),
                    "gate": gate,
                    "value": value,
                    "limit": limit,
                    "detail": detail,
                }
            )
    return pd.DataFrame(rows, columns=[*ENTRY, "gate", "value", "limit", "detail"])


def _gates(
    means: dict[str, float], stds: dict[str, float], classes: int
) -> Iterator[tuple[str, float, float, str]]:
    def tolerance(*metrics: str) -> float:
        return max([GATE_TOLERANCE, *(s for m in metrics if not math.isnan(s := stds.get(m, math.nan)))])

    def radii(attack: str) -> list[float]:
        return sorted(metric_radius(m)[1] for m in means if m.startswith(attack + "@"))

    # (excess over the limit, value, limit, detail) -> the largest excess
    def worst(found: Iterator[tuple[float, float, float, str]]) -> tuple[float, float, str] | None:
        pairs = list(found)
        return max(pairs, key=lambda p: p[0])[1:] if pairs else None

    rise = worst(
        (means[b] - means[a] - tolerance(a, b), means[b] - means[a], tolerance(a, b), f"{a} -> {b}")
        for attack in adversarial()
        for a, b in zip(
            [metric_name(attack, e) for e in radii(attack)],
            [metric_name(attack, e) for e in radii(attack)][1:],
            strict=False,
        )
    )
    weaker = worst(
        (means[m] - means[f] - tolerance(m, f), means[m] - means[f], tolerance(m, f), f"{m} vs {f}")
        for attack, weaker in _named("not_weaker_than")
        for e in radii(attack)
        if (m := metric_name(attack, e)) and (f := metric_name(weaker, e)) in means
    )
    chance = 100 / classes
    large = worst(
        (means[m] - chance - CHANCE_MARGIN, means[m] - chance, CHANCE_MARGIN, m)
        for attack, start in ((p.name, p.chance_from_255) for p in PERTURBATIONS.values())
        if start is not None
        for e in radii(attack)
        if e >= start and (m := metric_name(attack, e))
    )
    noise = worst(
        (means[p] - means[u] - tolerance(p, u), means[p] - means[u], tolerance(p, u), f"{p} vs {u}")
        for noise_name, attack in _named("noise_check_of")
        for e in radii(noise_name)
        if (u := metric_name(noise_name, e)) and (p := metric_name(attack, e)) in means
    )
    gap = worst(
        (means[p] - means[r] - REFERENCE_GAP, means[p] - means[r], REFERENCE_GAP, f"{p} vs {r}")
        for name, attack in _named("reference_for")
        for e in radii(name)
        if (r := metric_name(name, e)) and (p := metric_name(attack, e)) in means
    )
    for gate, found in (
        ("eps-monotone", rise),
        ("iterative-vs-fgsm", weaker),
        ("large-eps", large),
        ("noise-vs-pgd", noise),
        ("reference-gap", gap),
    ):
        if found is not None:
            yield (gate, *found)


# --- the summary per entry --------------------------------------------------------------------


def summary(
    gates: pd.DataFrame, checks: pd.DataFrame | None = None, relaxed: frozenset[str] = frozenset()
) -> pd.DataFrame:
    """One row per entry: each gate's figure (the worst over seeds for checkpoint checks),
    `flags` (failed gates, ';'-joined, '' when all pass) and `unreliable` (a critical one
    failed, unless `relaxed` names it: flagged, never critical). `gates`: record_gates;
    `checks`: records.load_checks joined to ENTRY columns."""
    parts = [gates] + (
        [checks.rename(columns={"check": "gate"})[gates.columns]] if checks is not None else []
    )
    both = pd.concat(parts, ignore_index=True)
    if both.empty:
        return with_verdicts(pd.DataFrame(columns=[*ENTRY, "flags", "unreliable"]))
    # "no λ" as a number: NaN keys would not align between the pieces joined below
    both = both.fillna({"lambda_low": NO_LAMBDA, "lambda_high": NO_LAMBDA})
    both = both.assign(failed=both["value"] > both["limit"] + 1e-9)
    worst = both.sort_values("value").groupby([*ENTRY, "gate"], sort=False).last()
    wide = worst["value"].unstack("gate")
    failed = worst[worst["failed"]].reset_index()
    failed = failed.assign(relaxed=failed["gate"].isin(relaxed))
    failed = failed.assign(
        flag=[
            GATES[g].flag + (RELAXED if r else "")
            for g, r in zip(failed["gate"], failed["relaxed"], strict=True)
        ],
        critical=[
            GATES[g].critical and not r for g, r in zip(failed["gate"], failed["relaxed"], strict=True)
        ],
    ).sort_values("gate", kind="stable")
    flags = failed.groupby(ENTRY)["flag"].agg(";".join)
    critical = failed.groupby(ENTRY)["critical"].agg(any)
    out = wide.join(flags.rename("flags")).join(critical.rename("unreliable")).reset_index()
    out["flags"] = out["flags"].astype(object).fillna("")
    out[["lambda_low", "lambda_high"]] = out[["lambda_low", "lambda_high"]].replace(NO_LAMBDA, float("nan"))
    out = out.reindex(columns=[*ENTRY, *(g for g in GATES if g in out.columns), "flags", "unreliable"])
    return with_verdicts(out)


RELAXED = " (relaxed)"  # the flag of a failed gate the suite does not hold to (a rehearsal's)


def training_gates() -> list[str]:
    """The gates that need a trained network measured on enough images (a rehearsal relaxes them)."""
    return [g for g, gate in GATES.items() if gate.needs_training]


def with_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """`unchecked` (the critical gates that apply and were not measured, ';'-joined) and
    `unreliable` as a nullable boolean: True when a critical gate failed, False when every
    one that applies was measured and passed, missing ("not checked") otherwise."""
    table = table.copy()
    unchecked = pd.Series(
        [unchecked_gates(row) for row in table.to_dict("records")], index=table.index, dtype=object
    )
    failed = table["unreliable"].eq(True) if "unreliable" in table else pd.Series(False, index=table.index)
    verdict = pd.Series(pd.NA, index=table.index, dtype="boolean").mask(failed, True)
    table["unchecked"], table["unreliable"] = unchecked, verdict.mask(~failed & unchecked.eq(""), False)
    gates = [c for c in table.columns if c not in ("flags", "unchecked", "unreliable")]
    return table[[*gates, "flags", "unchecked", "unreliable"]]


def unchecked_gates(entry: dict) -> str:
    """The critical gates that apply to `entry` (its model and kind) and that it has no
    figure for (gate name -> value in `entry`), ';'-joined."""
    return ";".join(
        g for g in required_gates(entry["model"], entry["kind"]) if pd.isna(entry.get(g, float("nan")))
    )


def required_gates(model: str, kind: str) -> list[str]:
    """The critical gates an entry must pass to be called reliable: every one, but the
    transfer check only where it exists (a single interpolated model with a registered
    ResNet of its architecture: not a ResNet, an ensemble or another defense)."""
    transfer = kind == "single" and plain_counterpart(model) is not None
    return [g for g, gate in GATES.items() if gate.critical and (g != "transfer" or transfer)]


def verdict_text(unreliable: object, unchecked: str) -> str:
    """yes / no / not checked (the gates not measured)."""
    if pd.isna(unreliable):
        return f"not checked ({unchecked.replace(';', ', ')})"
    return "yes" if unreliable else "no"


def with_entries(checks: pd.DataFrame, kept: pd.DataFrame) -> pd.DataFrame:
    """The checkpoint checks with the ENTRY columns of the cells kept for the same run,
    data set, seed and checkpoint (checks of runs without reported cells drop out)."""
    keys = ["run", "dataset", "seed", "members", "checkpoint_sha256"]
    if checks.empty:
        return pd.DataFrame(columns=[*ENTRY, "check", "value", "limit", "detail"])
    entries = kept[[*ENTRY, *[k for k in keys if k not in ENTRY]]].drop_duplicates()
    return checks.merge(entries, on=["run", "dataset", "seed", "members", "checkpoint_sha256"], how="inner")
