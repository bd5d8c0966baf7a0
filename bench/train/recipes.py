"""Training recipes (paper Sec. 4.1) and protocol presets, in one place.

A recipe is fixed by the model family and data set (the paper's table), the protocol
preset (`paper` as written, `authors-code` with the public release's deviations) and the
length (`full`, or the shorter `quick` / `smoke` runs: fewer epochs, learning-rate
milestones at the same fractions of training).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.core.presets import preset
from bench.data.datasets import dataset_info
from bench.records.checkpoints import run_tag
from models import CIFAR10_MEAN, ModelEntry, UserError

REHEARSAL = "rehearsal"  # the length of a `--rehearse` run (bench.run.rehearsal): part of its run tag
LENGTHS = {
    "full": 1.0,
    "quick": 0.2,
    "smoke": None,
    REHEARSAL: None,
}  # fraction of the epochs; None: FIXED_EPOCHS
# smoke: 2 epochs; a rehearsal (`--rehearse`): 2 epochs, so the learning-rate schedule's
# milestone is crossed, of a handful of steps each (its suite's small training subset)
FIXED_EPOCHS = {"smoke": 2, REHEARSAL: 2}
# A rehearsal's training log tests on the first 32 test images: the full CIFAR test set
# would cost ResNeXt-29 minutes per epoch on a CPU, for a number that means nothing.
REHEARSAL_TEST_IMAGES = 32
# The authors' release normalised both data sets with CIFAR-10's mean and this std.
AUTHORS_CODE_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class Recipe:
    """SGD with momentum; the learning rate is divided by 10 at each milestone epoch."""

    epochs: int
    lr: float
    milestones: tuple[int, ...]
    weight_decay: float  # on every parameter, as the release: the stored λ or k = 1 - λ too (models.skip)
    momentum: float = 0.9
    batch_size: int = 128  # images
    pad: int = 4  # pixels of padding before the random crop back to the image size
    pad_mode: str = "constant"  # "constant" (zeros) or "reflect"
    flip: bool = True  # random horizontal flip

    def lr_at(self, epoch: int) -> float:
        """Learning rate during `epoch` (0-based)."""
        return self.lr / 10 ** sum(epoch >= m for m in self.milestones)


# (family, recipe key of the data set) -> the paper's full recipe.
_PAPER = {
    ("preact-resnet", "cifar10"): Recipe(160, 0.1, (80, 120), 1e-4),
    ("preact-resnet", "cifar100"): Recipe(300, 0.1, (150, 225), 1e-4),
    ("resnext", "cifar10"): Recipe(300, 0.05, (150, 225), 5e-4),
    ("resnext", "cifar100"): Recipe(300, 0.05, (150, 225), 5e-4),
}


def recipe_for(family: str, dataset: str, preset_name: str = "paper", length: str = "full") -> Recipe:
    protocol = preset(preset_name)
    if length not in LENGTHS:
        raise UserError(f"unknown run length {length!r}; choose one of {', '.join(LENGTHS)}")
    key = (family, dataset_info(dataset).recipe)
    if key not in _PAPER:
        raise UserError(f"no training recipe for family {family!r} on {dataset!r}")
    recipe = _PAPER[key]
    recipe = replace(recipe, pad=protocol.pad, pad_mode=protocol.pad_mode)
    return scaled(recipe, length)


def scaled(recipe: Recipe, length: str) -> Recipe:
    fraction = LENGTHS[length]
    epochs = FIXED_EPOCHS[length] if fraction is None else max(1, round(recipe.epochs * fraction))
    milestones = tuple(round(m * epochs / recipe.epochs) for m in recipe.milestones)
    return replace(recipe, epochs=epochs, milestones=milestones)


def training_test_images(length: str) -> int | None:
    """How many test images the training log's per-epoch test pass reads (None: all)."""
    return REHEARSAL_TEST_IMAGES if length == REHEARSAL else None


def preset_model_options(preset_name: str, entry: ModelEntry) -> dict:
    """Model options a preset fixes: `paper` none (each data set's statistics, the cited
    networks); the release's presets its normalisation (CIFAR-10's mean with its own std,
    for both data sets) and, where the release has the family, its network."""
    if not preset(preset_name).release_network:
        return {}
    network = {"network": "release"} if "release" in entry.networks else {}
    return {"mean": CIFAR10_MEAN, "std": AUTHORS_CODE_STD, **network}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Everything but `seed`, `dataset` and the speed flags changes the
    weights, so it goes into the run's tag (its checkpoint folder name)."""

    model: str
    dataset: str
    seed: int
    preset: str = "paper"
    length: str = "full"  # "full", "quick", "smoke" or "rehearsal" (bench.run.rehearsal)
    lambda_init: tuple[float, float] | None = None
    n_train: int | None = None  # first N training images only (smoke runs, tests)
    device: str = "cpu"
    channels_last: bool = True  # channels_last convolutions: faster on CPUs and GPUs alike
    bf16: bool = False  # bf16 autocast for the training forward/backward (CUDA)
    compile: bool = False  # torch.compile the model for training

    @property
    def run_tag(self) -> str:
        return run_tag(self.model, self.preset, self.length, self.lambda_init, self.n_train)
