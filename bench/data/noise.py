"""The four noise groups of CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich 2019).

Published CIFAR recipe: x = pixel / 255, noise i.i.d. per value, clip to [0, 1], scale by
255, truncate to uint8 (parameters in NOISE_PARAMS). We apply it to chunks of images at
once in float32: Gaussian, speckle and impulse noise with torch's CPU generator, shot
noise by inverting tabulated Poisson CDFs (x takes only 256 values), impulse noise
sparsely; all (group, severity) jobs spread over two threads.

Deterministic given a seed: each (group, severity) draws from its own generator, seeded
from SeedSequence([seed, group, severity]), so no result depends on the thread count.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Table 1's column order.
NOISE_GROUPS = ("impulse_noise", "speckle_noise", "gaussian_noise", "shot_noise")
# RobustBench's 15 common corruptions (robustbench.data.CORRUPTIONS, its order): the released
# CIFAR-10-C / CIFAR-100-C files of these names. Speckle noise is not among them; only the
# three noise groups above can be generated here, the others come from the released tar.
CORRUPTIONS = (
    "shot_noise",
    "motion_blur",
    "snow",
    "pixelate",
    "gaussian_noise",
    "defocus_blur",
    "brightness",
    "fog",
    "zoom_blur",
    "frost",
    "glass_blur",
    "impulse_noise",
    "contrast",
    "jpeg_compression",
    "elastic_transform",
)
SEVERITIES = (1, 2, 3, 4, 5)
# Published CIFAR-C parameter c per severity 1..5 (not the ImageNet-C ones).
NOISE_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # x + N(0, c^2)
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson(x c) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # each value -> 0 or 1 w.p. c, even odds
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # x + x N(0, c^2)
}
CHUNK = 512  # images per step: a few MB of float32, cache-friendly


class NoiseStream:
    """The random numbers of one (group, severity): torch for normals, numpy for the rest,
    both seeded from one SeedSequence."""

    def __init__(self, seed: int, group: str, severity: int):
        sequence = np.random.SeedSequence([seed, NOISE_GROUPS.index(group), severity])
        self.numpy = np.random.default_rng(sequence)
        self.torch = torch.Generator().manual_seed(int(sequence.generate_state(1, np.uint64)[0] >> 1))


def _unit(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.float().mul_(1 / 255)


def _to_uint8(y: torch.Tensor) -> torch.Tensor:
    return y.clamp_(0, 1).mul_(255).to(torch.uint8)  # float -> uint8 truncates, as np.uint8


def _gaussian(chunk: torch.Tensor, c: float, stream: NoiseStream) -> torch.Tensor:
    x = _unit(chunk)
    return _to_uint8(torch.randn(x.shape, generator=stream.torch).mul_(c).add_(x))


def _speckle(chunk: torch.Tensor, c: float, stream: NoiseStream) -> torch.Tensor:
    x = _unit(chunk)
    return _to_uint8(torch.randn(x.shape, generator=stream.torch).mul_(c).mul_(x).add_(x))


def _impulse(chunk: torch.Tensor, c: float, stream: NoiseStream) -> torch.Tensor:
    """Each value replaced with probability c, by 0 or 1 with even odds. Drawn sparsely but
    exactly: a Binomial(n, c) count of replaced values, a uniform subset of that size, a
    fair coin for each. Kept values come back as they were (v / 255 * 255 truncates to v
    for every v), so this works on uint8 directly."""
    flat = chunk.reshape(-1).clone()  # never write into the caller's images
    hit = stream.numpy.choice(flat.numel(), size=stream.numpy.binomial(flat.numel(), c), replace=False)
    salt = stream.numpy.random(len(hit)) < 0.5
    flat[torch.from_numpy(hit[salt])] = 255
    flat[torch.from_numpy(hit[~salt])] = 0
    return flat.view(chunk.shape)


def _shot(chunk: torch.Tensor, c: float, stream: NoiseStream) -> torch.Tensor:
    """Poisson(x c) / c by inversion: each of the 256 values of x has its CDF tabulated, and
    a count is the first k with CDF(k) > u for a float64 uniform u. A guide table brackets
    k between the starts of u's bucket and the next one; bisection finishes. Exact up to
    float64 rounding of the CDF, several times faster than numpy's Poisson sampler."""
    cdf, guide = _poisson_tables(c)
    buckets, width = len(guide) // 256 - 1, len(cdf) // 256
    v = chunk.numpy().reshape(-1)
    u = stream.numpy.random(v.shape)
    bucket = np.multiply(u, buckets).astype(np.int32)  # int32 indices: half the traffic
    bucket += v.astype(np.int32) * (buckets + 1)
    low, high = guide.take(bucket), guide.take(bucket + 1)
    row = v.astype(np.int32) * width
    todo = np.flatnonzero(low < high)
    while todo.size:  # invariant: CDF(low - 1) <= u < CDF(high)
        mid = (low[todo] + high[todo]) >> 1
        above = cdf.take(row[todo] + mid) > u[todo]
        high[todo] = np.where(above, mid, high[todo])
        low[todo] = np.where(above, low[todo], mid + 1)
        todo = todo[low[todo] < high[todo]]
    return torch.from_numpy(_count_levels(c).take(low).reshape(chunk.shape))


@functools.lru_cache(maxsize=16)
def _poisson_tables(c: float, buckets: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Flattened 256-row tables: the CDF of Poisson(v / 255 * c) for v = 0..255 (the last
    column inf, so every u < 1 stops), and per row the guide: for j = 0..buckets, the
    first k with CDF(k) > j / buckets (the last one: the last k)."""
    kmax = len(_count_levels(c)) - 1  # c + 14 sqrt(c) + 30: the Poisson tail beyond < 1e-40
    lam = np.arange(256)[:, None] / 255 * c
    k = np.arange(kmax + 1)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, kmax + 1)))])
    with np.errstate(divide="ignore", invalid="ignore"):
        pmf = np.exp(k * np.log(lam) - lam - log_factorial)
    pmf[0] = k == 0  # lam = 0: always 0 counts
    cdf = np.cumsum(pmf, axis=1)
    cdf[:, -1] = np.inf
    starts = np.arange(buckets + 1) / buckets
    guide = np.stack([np.searchsorted(row, starts, side="right") for row in cdf])
    guide[:, -1] = kmax
    return cdf.ravel(), guide.astype(np.int32).ravel()


@functools.lru_cache(maxsize=16)
def _count_levels(c: float) -> np.ndarray:
    """uint8 level of each count k, by the published float64 formula itself, so that exact
    ties (k / c * 255 an integer) truncate as they did there."""
    k = np.arange(int(np.ceil(c + 14 * np.sqrt(c) + 30)) + 1)
    return (np.clip(k / c, 0, 1) * 255).astype(np.uint8)


# uint8 chunk (n, H, W, 3), c, stream -> uint8 chunk, the published recipe end to end.
NOISE_FUNCTIONS: dict[str, Callable[[torch.Tensor, float, NoiseStream], torch.Tensor]] = {
    "gaussian_noise": _gaussian,
    "shot_noise": _shot,
    "impulse_noise": _impulse,
    "speckle_noise": _speckle,
}


def corrupt(
    images: np.ndarray, group: str, severity: int, seed: int = 0, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3): `group` at `severity` (1-5), written
    into `out` when given."""
    apply, c = NOISE_FUNCTIONS[group], NOISE_PARAMS[group][severity - 1]
    stream = NoiseStream(seed, group, severity)
    source = torch.from_numpy(np.ascontiguousarray(images))
    out = np.empty_like(images) if out is None else out
    target = torch.from_numpy(out)
    for start in range(0, len(source), CHUNK):
        target[start : start + CHUNK] = apply(source[start : start + CHUNK], c, stream)
    return out


def corrupt_groups(
    images: np.ndarray, groups: tuple[str, ...] = NOISE_GROUPS, seed: int = 0, workers: int | None = None
) -> dict[str, np.ndarray]:
    """Every severity of every group in `groups`, each in the released layout. All (group,
    severity) jobs share one pool, so that the slow shot noise does not run alone; one
    thread more than cores, as parts of the Poisson inversion hold the GIL: the extra
    thread keeps every core busy while one waits for it."""
    workers = workers or (os.cpu_count() or 1) + 1
    n = len(images)
    outputs = {g: np.empty((len(SEVERITIES) * n, *images.shape[1:]), np.uint8) for g in groups}

    def job(group: str, severity: int) -> None:
        corrupt(images, group, severity, seed, out=outputs[group][(severity - 1) * n : severity * n])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one job per core beats splitting each op between cores
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda gs: job(*gs), [(g, s) for g in groups for s in SEVERITIES]))
    finally:
        torch.set_num_threads(threads)
    return outputs
