import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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
