"""The protocol presets: each a protocol that could have made the paper's published numbers.

A preset fixes every choice the paper's text and the authors' release (minicheshire/InResNet)
make differently: the attacks' step size and units, where PGD's projection ball is centred,
how CIFAR-C files are normalised, the training augmentation, the network and its input
normalisation, and which epoch's weights are evaluated. Every layer asks this registry,
never the preset's name (docs/PROTOCOL.md, "Which code made the published numbers").
"""

from __future__ import annotations

from dataclasses import dataclass

from models import UserError

# attack units: of the [0, 1] image, or of the model's normalised input
PIXEL, NORMALISED = ("pixel", "normalised")
IMAGE, START = "image", "start"  # PGD's projection ball: around x, or around its random start
# CIFAR-C normalisation: the training statistics, or each file's own
TRAINING, PER_FILE = ("training", "per-file")
# the evaluated weights: the final epoch's, or those of the best test accuracy
LAST, BEST_TEST = ("last", "best-test")


@dataclass(frozen=True)
class Preset:
    """One protocol. Radii and steps in 1/255 of the range of `attack_units`."""

    name: str
    alpha_255: float  # IFGSM / PGD step size
    pgd_ball: str = IMAGE
    # NORMALISED: eps and alpha added to the normalised input, which is clipped to [0, 1]
    attack_units: str = PIXEL
    noise_normalisation: str = TRAINING
    pad: int = 4  # training augmentation: pixels of padding before the random crop
    pad_mode: str = "constant"
    # the release's input normalisation and, where it has the family, its network
    release_network: bool = False
    checkpoint: str = LAST
    source: str = ""  # where the protocol comes from, in words

    @property
    def test_selected(self) -> bool:
        """Whether its checkpoints were chosen by their test accuracy: their numbers are
        optimistic, and every table showing them says so."""
        return self.checkpoint == BEST_TEST


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("paper", 2.0, source="the paper's text (Sec. 4.1, 4.3)"),
        Preset(
            "authors-code",
            1.0,
            pgd_ball=START,
            noise_normalisation=PER_FILE,
            pad=2,
            pad_mode="reflect",
            release_network=True,
            source="the release's August 2020 scripts (commit 4dbc17d)",
        ),
        Preset(
            "release-2020-06",
            2.0,
            pgd_ball=START,
            attack_units=NORMALISED,
            noise_normalisation=PER_FILE,
            pad=2,
            pad_mode="reflect",
            release_network=True,
            checkpoint=BEST_TEST,
            source="the release's June 2020 scripts (commit 4b91b2c)",
        ),
    )
}
PRESET_NAMES = tuple(PRESETS)


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def test_selected_note(name: str) -> str:
    """The label every table, report and leaderboard showing numbers of `name`'s runs
    carries when their checkpoints were chosen by test accuracy ('' otherwise)."""
    if not preset(name).test_selected:
        return ""
    return (
        f"Preset `{name}` evaluates the checkpoint of the epoch with the best test accuracy, as the "
        "release's June 2020 train.py keeps it: chosen on the test set, so its numbers are optimistic."
    )
