"""Confidence intervals from the per-example bits: a bootstrap over seeds and test examples.

A measured accuracy is a mean over seeds (training runs) and test examples; both vary. One
bootstrap draw resamples the seeds (with replacement) and the test examples (with
replacement, the same draw for every seed and, when two models were measured on the same
examples, for both: a paired comparison). With draws as count vectors, a draw's mean is
c·M·w / (k n) for the seed counts c, the k x n matrix M of per-example accuracies and the
example counts w: one matrix product for all draws. 95% intervals are the 2.5th and
97.5th percentiles of the draws.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

DRAWS = 1000
LEVEL = 0.95
# What an interval measures, as strings and ints (its generator's seed): e.g. the claim, the
# data set, each side's run, kind, preset and metric, and the seeds drawn from.
Identity = Sequence[object]


class Bootstrap:
    """Seeded bootstrap draws that depend only on what is measured, never on what else was
    computed before: each interval draws its seeds from a generator seeded by `what` (the
    identity of the claim, cells and seeds it measures), and the example counts of n
    examples come from (seed, n) alone, so two intervals over the same examples (the two
    sides of a difference, or two cells of one subset) are paired by construction."""

    def __init__(self, seed: int = 0, draws: int = DRAWS):
        self.seed, self.draws = seed, draws
        self._examples: dict = {}

    def generator(self, what: Identity) -> np.random.Generator:
        """The generator of one interval: from the base seed and a digest of `what`."""
        digest = hashlib.sha256(repr(tuple(what)).encode()).digest()
        return np.random.default_rng([self.seed, *np.frombuffer(digest, dtype=np.uint32).tolist()])

    def examples(self, n: int) -> np.ndarray:
        if n not in self._examples:
            rng = np.random.default_rng([self.seed, n])
            counts = rng.multinomial(n, np.full(n, 1 / n), size=self.draws)
            self._examples[n] = counts.astype(np.float32)  # draws x n: 40 MB for 10,000 examples
        return self._examples[n]

    def means(
        self,
        samples: Sequence[np.ndarray],
        what: Identity,
        scale: float = 100.0,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """The bootstrap draws of the mean of `samples` (one per seed, each the per-example
        values over the same n examples), times `scale`: accuracies in [0, 1] give percent;
        scale 1 keeps any other figure's units (bench.reports.stability)."""
        m = np.stack([np.asarray(s, dtype=np.float32) for s in samples])  # k x n
        k, n = m.shape
        rng = self.generator(what) if rng is None else rng
        seeds = rng.multinomial(k, np.full(k, 1 / k), size=self.draws)  # draws x k
        per_seed = (self.examples(n) @ m.T).astype(np.float64)  # draws x k: each seed's sum under each draw
        return scale * (seeds * per_seed).sum(1) / (k * n)

    def interval(
        self, samples: Sequence[np.ndarray], what: Identity, scale: float = 100.0
    ) -> tuple[float, float]:
        return percentiles(self.means(samples, what, scale))

    def difference(
        self, a: Sequence[np.ndarray], b: Sequence[np.ndarray], what: Identity, scale: float = 100.0
    ) -> tuple[float, float, float]:
        """(mean a - mean b, low, high), in points for accuracies (`scale` as in `means`);
        paired over examples when both were measured on the same number of (hence the same
        class-balanced) examples."""
        estimate = scale * (np.mean([np.mean(s) for s in a]) - np.mean([np.mean(s) for s in b]))
        rng = self.generator(what)
        return (
            float(estimate),
            *percentiles(self.means(a, what, scale, rng) - self.means(b, what, scale, rng)),
        )

    def over_seeds(self, values: Sequence[float], what: Identity) -> tuple[float, float]:
        """The 95% interval of the mean of one value per seed, resampling the seeds (NaN
        for fewer than two seeds: one training run says nothing of the spread)."""
        drawn = np.asarray(values, dtype=np.float64)
        if len(drawn) < 2:
            return math.nan, math.nan
        draws = self.generator(what).choice(drawn, size=(self.draws, len(drawn)), replace=True).mean(1)
        return percentiles(draws)


def percentiles(draws: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def verdict(low: float, high: float, published: float) -> str:
    """The claim's verdict from the measured difference's interval and the published sign:
    it reproduces only when the interval excludes 0 in the paper's direction."""
    if math.isnan(low) or math.isnan(published):
        return "the paper has no number" if math.isnan(published) else "not measured"
    if low > 0 or high < 0:
        return "reproduces" if (low > 0) == (published > 0) else "contradicts"
    return "inconclusive"


def level_verdict(low: float, high: float, published: float, resolution: float = 0.0) -> str:
    """The verdict on a claimed level (a share, not a difference): it reproduces when the
    measured 95% interval meets the values that print as the published one (within half its
    printed `resolution`), and is contradicted otherwise."""
    if math.isnan(low) or math.isnan(published):
        return "the paper has no number" if math.isnan(published) else "no interval (fewer than two seeds)"
    return (
        "reproduces"
        if low <= published + resolution / 2 and published - resolution / 2 <= high
        else "contradicts"
    )


def per_example(bits: np.ndarray, severities: int = 1) -> np.ndarray:
    """A cell's per-example accuracy: its bits, or for a pooled noise cell (severity 1-5
    blocks of the same examples, in order) their mean over the severities."""
    return bits.reshape(severities, -1).mean(0) if severities > 1 else bits.astype(np.float64)
