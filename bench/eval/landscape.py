"""Fig. 2's measurement: the loss landscape of a test image on the plane of the FGSM
direction and a random sign direction orthogonal to it, per checkpoint, made by the
stability stage and recorded (bench.records: the `landscapes` table), so that the figure is
drawn from the records alone (bench.reports.figures).

The images: one clean test image (`LandscapeConfig.index`), else the paper's two noise
images when the noise files are there, else the same two test images clean.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from bench.core.environment import device_name
from bench.data.noise_files import generation_folder
from bench.eval.engine import prepared
from bench.eval.protocol import Cell, EvalConfig, Subject
from bench.eval.testdata import EvalData
from bench.records.schema import LANDSCAPE_CLEAN, PAPER_LANDSCAPE_IMAGES, LandscapeConfig, utc_now
from models import UserError, model_entry, plain_counterpart


def drawn_for(model: str) -> bool:
    """Whether Fig. 2 can show `model`: a registered ResNet, or an In-ResNet or λ-In-ResNet
    with a registered ResNet of its architecture (the figure sets the two side by side)."""
    entry = model_entry(model)
    return entry.rule == "residual" or (
        entry.rule in ("in", "lambda-in") and plain_counterpart(model) is not None
    )


def image_passes(config: LandscapeConfig) -> tuple[float, float]:
    """(forward, forward+backward) image passes of one image's landscape, for estimates:
    the grid, the image itself, and the FGSM direction's gradient."""
    return float(config.points**2 + 1), 1.0


def image_count(config: LandscapeConfig) -> int:
    """The images the figure shows (`images_of` without the data dir)."""
    return 1 if config.index is not None else len(PAPER_LANDSCAPE_IMAGES)


def images_of(data: EvalData, config: LandscapeConfig) -> list[tuple[str, int]]:
    """(image group, row) of each image the figure shows, as the data dir holds them now."""
    if config.index is not None:
        check_landscape_index(config.index, data.n_test, data.dataset)
        return [(LANDSCAPE_CLEAN, config.index)]
    if generation_folder(data.dataset, data.data_dir, "auto") is None:  # the noise files are there: read them
        return list(PAPER_LANDSCAPE_IMAGES)
    return [(LANDSCAPE_CLEAN, row) for _, row in PAPER_LANDSCAPE_IMAGES]


def check_landscape_index(index: int | None, images: int, dataset: str) -> None:
    """One error line for a Fig. 2 image beyond the test set (never another image drawn)."""
    if index is not None and index >= images:
        raise UserError(
            f"--landscape-index {index} is beyond the {images:,} test images of {dataset}: give 0 to "
            f"{images - 1}, or leave it out for the paper's two images"
        )


def image_source(data: EvalData, group: str) -> tuple[str, str | None]:
    """(data source, data digest) of an image of `group`, as the cells record theirs."""
    cell = Cell("clean") if group == LANDSCAPE_CLEAN else Cell(group, 0.0, 1)
    return data.source(cell), data.digest(cell)


def directions(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_fgsm, d_orth) for one image `x` (1 x C x H x W in [0, 1]): the FGSM direction
    sign(grad of the loss), and random signs made orthogonal to it and rescaled to the
    same L-infinity norm (1)."""
    x = x.detach().clone().requires_grad_(True)
    d_fgsm = torch.autograd.grad(F.cross_entropy(model(x), y), x)[0].sign()
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    signs = signs.to(x.device)
    norm = (d_fgsm * d_fgsm).sum()
    orth = signs - (signs * d_fgsm).sum() / norm * d_fgsm if norm > 0 else signs
    return d_fgsm.detach(), orth / orth.abs().max()


def landscape(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    d_fgsm: torch.Tensor,
    d_orth: torch.Tensor,
    radius: float,
    points: int,
    batch: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets in 1/255, loss, predicted class) over the grid x + a d_fgsm + b d_orth,
    a (rows) and b (columns) in [-radius, radius] / 255, inputs clamped to [0, 1];
    computed `batch` grid points at a time."""
    offsets = np.linspace(-radius, radius, points)
    a, b = np.meshgrid(offsets, offsets, indexing="ij")
    coords = torch.tensor(np.stack([a.ravel(), b.ravel()], 1) / 255, dtype=torch.float32, device=x.device)
    losses, classes = [], []
    with torch.no_grad():
        for chunk in coords.split(batch):
            inputs = (
                x + chunk[:, 0, None, None, None] * d_fgsm + chunk[:, 1, None, None, None] * d_orth
            ).clamp(0, 1)
            logits = model(inputs)
            losses.append(F.cross_entropy(logits, y.expand(len(chunk)), reduction="none").cpu())
            classes.append(logits.argmax(1).cpu())
    shape = (points, points)
    return offsets, torch.cat(losses).reshape(shape).numpy(), torch.cat(classes).reshape(shape).numpy()


@dataclass(frozen=True)
class LandscapeDone:
    """One image's landscape of one checkpoint: its records row (LANDSCAPE_COLUMNS), the
    loss and predicted-class grids, and a line for the log."""

    row: dict
    loss: np.ndarray
    classes: np.ndarray
    summary: str


def measure_landscapes(
    subject: Subject,
    setting: EvalConfig,
    data: EvalData,
    config: LandscapeConfig,
    images: Sequence[tuple[str, int]],
) -> Iterator[LandscapeDone]:
    """Each of `images` ((group, row), as `images_of` names them) on `subject`'s network,
    along its own directions; `setting`: the cells' EvalConfig (device, memory layout)."""
    model = prepared(subject.defense.model, setting)
    info = subject.defense.info
    for group, row in images:
        began = time.perf_counter()
        # both have .images, .labels
        source_set = data.test if group == LANDSCAPE_CLEAN else data.noise(group)
        assert source_set is not None  # the test set is loaded for any measurement
        images_, labels = source_set.images, source_set.labels
        x = (
            torch.from_numpy(np.array(images_[row : row + 1]))
            .permute(0, 3, 1, 2)
            .float()
            .div(255)
            .to(setting.device)
        )
        y = torch.tensor([int(labels[row])], device=setting.device)
        d_fgsm, d_orth = directions(model, x, y, config.seed)
        _, loss, classes = landscape(model, x, y, d_fgsm, d_orth, config.radius, config.points, config.batch)
        with torch.no_grad():
            right = int(model(x).argmax(1).item() == int(y))
        source, digest = image_source(data, group)
        seconds = time.perf_counter() - began
        record = {
            "model": subject.model,
            "run": subject.run,
            "dataset": info.dataset,
            "seed": subject.seed,
            "checkpoint_sha256": info.checkpoint_sha256,
            "image_group": group,
            "image_row": row,
            "data_source": source,
            "data_sha256": digest,
            "eps_255": float(config.radius),
            "points": config.points,
            "direction_seed": config.seed,
            "label": int(y),
            "right": right,
            "torch_version": torch.__version__,
            "device": device_name(setting.device),
            "seconds": round(seconds, 3),
            "timestamp": utc_now(),
        }
        line = f"{subject.run} {info.dataset} seed {subject.seed}: Fig. 2's landscape of {group} #{row} ({seconds:.1f} s)"
        yield LandscapeDone(record, loss.astype(np.float32), classes.astype(np.int16), line)
