"""Fig. 2: the loss landscape of a test image on the plane of the FGSM direction and a
random sign direction orthogonal to it, per model, from the trained checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.nn import functional as F

from bench.data.datasets import dataset_label
from bench.eval.adapters import zoo_defense
from bench.records.checkpoints import run_tag
from bench.reports.plotting import FigureConfig, Skipped, render, rule_of
from bench.reports.run_figures import RunFolder
from models import UserError, model_label, plain_counterpart


def directions(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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
            inputs = (x + chunk[:, 0, None, None, None] * d_fgsm + chunk[:, 1, None, None, None] * d_orth).clamp(0, 1)
            logits = model(inputs)
            losses.append(F.cross_entropy(logits, y.expand(len(chunk)), reduction="none").cpu())
            classes.append(logits.argmax(1).cpu())
    shape = (points, points)
    return offsets, torch.cat(losses).reshape(shape).numpy(), torch.cat(classes).reshape(shape).numpy()


def landscape_figure(examples: list[tuple[str, int, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]]) -> Figure:
    """Per example (title, true class, panels), two rows; per model's panel (name, offsets,
    loss, classes) a column: the loss as a heat map (one colour scale for all) over the map
    of predicted classes."""
    columns = max(len(panels) for _, _, panels in examples)
    figure = Figure(figsize=(4.4 * columns, 3.7 * 2 * len(examples)), layout="constrained")
    low = min(float(p[2].min()) for _, _, panels in examples for p in panels)
    high = max(float(p[2].max()) for _, _, panels in examples for p in panels)
    tops, bottoms = [], []
    for row, (title, true_class, panels) in enumerate(examples):
        for i, (name, offsets, loss, classes) in enumerate(panels):
            extent = [offsets[0], offsets[-1], offsets[0], offsets[-1]]
            top = figure.add_subplot(2 * len(examples), columns, 2 * row * columns + i + 1)
            image = top.imshow(loss.T, origin="lower", extent=extent, vmin=low, vmax=high, cmap="viridis", aspect="auto")
            top.set_title(f"{title}\n{name}: loss", fontsize=9)
            bottom = figure.add_subplot(2 * len(examples), columns, (2 * row + 1) * columns + i + 1)
            classes_image = bottom.imshow(classes.T, origin="lower", extent=extent, cmap="tab10", vmin=-0.5, vmax=9.5,
                                          aspect="auto", interpolation="nearest")  # fmt: skip
            bottom.set_title(f"{name}: predicted class (true: {true_class})", fontsize=9)
            for ax in (top, bottom):
                ax.set_xlabel("a along its d_fgsm (1/255)")
                ax.set_ylabel("b along its d_orth (1/255)")
                ax.plot([0], [0], marker="+", color="white", markersize=10)
            tops.append(top)
            bottoms.append(bottom)
    figure.colorbar(image, ax=tops + bottoms, label="cross-entropy loss", shrink=0.6, location="right")
    classes_bar = figure.colorbar(classes_image, ax=tops + bottoms, label="predicted class", shrink=0.6,
                                  location="bottom", ticks=range(10))  # fmt: skip
    classes_bar.ax.tick_params(labelsize=7)
    return figure


def landscape_figures(results: Path, data_dir, config: FigureConfig, folders: list[RunFolder]) -> list:
    """Fig. 2 for the first data set with a finished ResNet and interpolated model of the
    same architecture and seed: each model along its own directions."""
    present = {(f.dataset, f.run, f.seed) for f in folders}
    for f in folders:
        plain = plain_counterpart(f.model) if rule_of(f.model) in ("in", "lambda-in") else None
        preset, length, n_train = f.recipe  # the ResNet has no λ, so no @lambda part
        partner = run_tag(plain, preset, length, None, n_train) if plain else None
        if partner is None or (f.dataset, partner, f.seed) not in present:
            continue
        dataset, seed = f.dataset, f.seed
        images = landscape_images(dataset, data_dir, config)
        if isinstance(images, Skipped):
            return [images]
        pair = [(partner, plain), (f.run, f.model)]
        nets = [(model_label(name), zoo_defense(tag, dataset, seed, results).model) for tag, name in pair]
        examples, notes = [], []
        for n, (title, x, y) in enumerate(images, 1):
            panels, right = [], []
            for name, net in nets:
                d_fgsm, d_orth = directions(net, x, y, config.landscape_seed)  # each model its own
                offsets, loss, classes = landscape(net, x, y, d_fgsm, d_orth, config.landscape_radius,
                                                   config.landscape_points, config.landscape_batch)  # fmt: skip
                panels.append((name, offsets, loss, classes))
                with torch.no_grad():
                    right.append(bool(net(x).argmax(1) == y))
            examples.append((title, int(y), panels))
            notes.append(f"({n}) {title}: {_agreement([name for name, _ in nets], right)}")
        caption = (f"Fig. 2: loss and predicted class on x + a·d_fgsm + b·d_orth ({dataset_label(dataset)}, seed {seed}; "
                   f"runs {pair[0][0]}, {pair[1][0]}), each model along its own FGSM direction d_fgsm and its own "
                   f"random direction d_orth orthogonal to it, as the paper draws it. " + "; ".join(notes) + ".")  # fmt: skip
        return [render(landscape_figure(examples), "fig2_landscape", caption)]
    return [Skipped("fig2_landscape", "no finished ResNet and In-ResNet (or λ-In-ResNet) of one depth and seed")]


# The paper's Fig. 2 images: "the 3rd image of the shot-noise group" and "the 8th of the
# speckle-noise group" of CIFAR-10-C. A group file starts with severity 1, so these are
# its rows 2 and 7: test images 2 and 7 at severity 1. Without the files: those two clean.
PAPER_LANDSCAPE_IMAGES = (("shot_noise", 2), ("speckle_noise", 7))


def landscape_images(dataset: str, data_dir, config: FigureConfig) -> list[tuple[str, torch.Tensor, torch.Tensor]] | Skipped:
    """(title, x 1 x C x H x W in [0, 1], y of shape (1,)) of each Fig. 2 example: the
    clean test image `config.landscape_index`, else the paper's noise images when the noise
    files are on disk (figures never generate or download anything), else the same two
    test images clean."""
    from bench.data.datasets import dataset_info
    from bench.data.noise_files import generation_folder, load_noise
    from bench.data.splits import load_test

    try:
        test = load_test(dataset, data_dir) if _data_present(dataset_info(dataset), data_dir) else None
    except UserError:
        test = None
    if test is None:
        return Skipped("fig2_landscape", f"the {dataset} test set is not in the data dir")

    def one(images: np.ndarray, labels: np.ndarray, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(images[row : row + 1])).permute(0, 3, 1, 2).float() / 255, torch.tensor([int(labels[row])])

    if config.landscape_index is not None:
        row = config.landscape_index
        check_landscape_index(row, len(test), dataset)
        return [(f"clean test image {row}", *one(test.images, test.labels, row))]
    if generation_folder(dataset, data_dir, "auto") is None:  # the noise files are there: read them
        out = []
        for group, row in PAPER_LANDSCAPE_IMAGES:
            noise = load_noise(dataset, group, data_dir, "auto", test=test)
            title = f"{noise.source} {group.replace('_', ' ')} #{row + 1} (severity 1, test image {row})"
            out.append((title, *one(noise.images, noise.labels, row)))
        return out
    return [(f"clean test image {row} (no noise files)", *one(test.images, test.labels, row))
            for _, row in PAPER_LANDSCAPE_IMAGES]  # fmt: skip


def check_landscape_index(index: int | None, images: int, dataset: str) -> None:
    """One error line for a Fig. 2 image beyond the test set (never another image drawn)."""
    if index is not None and index >= images:
        raise UserError(f"--landscape-index {index} is beyond the {images:,} test images of {dataset}: give 0 to "
                        f"{images - 1}, or leave it out for the paper's two images")  # fmt: skip


def _agreement(names: list[str], right: list[bool]) -> str:
    if all(right):
        return "both models right"
    if not any(right):
        return "both models wrong"
    return "only " + " and ".join(n for n, r in zip(names, right, strict=True) if r) + " right"


def _data_present(info, data_dir) -> bool:
    """Whether the test split is on disk (figures never download)."""
    from bench.data.cifar import data_root

    folder = data_root(data_dir) / info.folder
    return not info.files or all((folder / name).is_file() for name, _ in info.files["test"])
