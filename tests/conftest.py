import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.data.cifar import write_batch
from bench.eval.adapters import Defense, module_defense

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def readme_example():
    """The README's example marked `<!-- example:NAME -->`, a fenced block of `language`."""

    def example(name: str = "add-defense", language: str = "python") -> str:
        text = (REPO / "README.md").read_text()
        match = re.search(rf"<!-- example:{name} -->\n```{language}\n(.*?)```", text, re.S)
        assert match, f"README lost its {name} example"
        return match.group(1)

    return example


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def images():
    """A batch of 4 CIFAR-shaped images in [0, 1]."""
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The README's main job, the smoke suite, run once as a user runs it: returns the
    results dir and the finished process (its log is in stderr)."""
    root = tmp_path_factory.mktemp("smoke")
    command = [
        sys.executable,
        "run_bench.py",
        "--results-dir",
        str(root / "results"),
        "--data-dir",
        str(root / "data"),
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    return root / "results", run


MINI_RUN = ["run_bench.py", "--models", "resnet8", "--n-train", "1024", "--n-test", "48", "--radii", "2", "--no-progress"]


@pytest.fixture(scope="session")
def mini_run(tmp_path_factory):
    """A small run of the whole pipeline (ResNet-8, 2 seeds and their ensemble, 26 cells
    each, on synthetic data): returns its command (without --results-dir) and the results
    dir of one uninterrupted run, the reference for the resume and executor tests."""
    root = tmp_path_factory.mktemp("mini")
    command = [sys.executable, *MINI_RUN, "--data-dir", str(root / "data")]
    run = subprocess.run([*command, "--results-dir", str(root / "reference")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return command, root / "reference"


# Grey level (0-255) of each class; gaps widen (16, 18, ..., 32) so that the nearest other
# level is always the lower one and the loss gradient never cancels to zero.
LEVELS = [20 + sum(16 + 2 * i for i in range(k)) for k in range(10)]
WRONG = 30  # the first 30 of the 100 test images carry a wrong label


class GreyLevel(nn.Module):
    """Classifies an image by its mean grey level: the nearest of LEVELS wins. An L-inf
    perturbation moves the mean by at most eps and the levels are at least 16/255 apart, so
    attacks up to 7/255 leave every prediction alone; at 20/255, a sign-gradient step towards
    the nearest level (all gaps are at most 32/255) flips every one."""

    def __init__(self):
        super().__init__()
        self.levels = nn.Parameter(torch.tensor(LEVELS, dtype=torch.float32) / 255)

    def forward(self, x):
        mean = x.mean(dim=(1, 2, 3))
        return -1000 * (mean[:, None] - self.levels) ** 2


@pytest.fixture(scope="session")
def grey_root(tmp_path_factory) -> Path:
    """A CIFAR-10-format data dir: 100 constant grey test images (10 per class), the first
    WRONG of them with a wrong label, so any correct evaluation gives exactly 70%."""
    root = tmp_path_factory.mktemp("grey")
    classes = np.arange(100) % 10
    images = np.broadcast_to(np.array(LEVELS, np.uint8)[classes][:, None, None, None], (100, 32, 32, 3))
    labels = classes.copy()
    labels[:WRONG] = (labels[:WRONG] + 5) % 10
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", images[:10], labels[:10])
    write_batch(folder / "test_batch", np.ascontiguousarray(images), labels)
    return root


@pytest.fixture
def grey_defense(tmp_path) -> Defense:
    torch.save(GreyLevel().state_dict(), tmp_path / "grey.pt")
    return module_defense("grey", GreyLevel, tmp_path / "grey.pt", mean=(0, 0, 0), std=(1, 1, 1))
