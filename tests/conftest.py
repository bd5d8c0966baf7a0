import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.data.cifar import write_batch
from bench.eval.adapters import Defense, module_defense

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["pytester"]  # tests/test_tiers.py runs the tier guards on sample tests

# --- the two tiers ------------------------------------------------------------------------------
# `python -m pytest` runs the fast tier (pyproject: -m "not slow"); `python -m pytest -m slow`
# the integration tier: the tests marked `@pytest.mark.slow`, by hand, because they run the
# command line, train a network or use a fixture that does. A fast test that runs the
# pipeline's work anyway fails, and so does one over the fast tier's budget, so the tier
# stays fast.
FAST_BUDGET_S = 15.0  # setup or call of one fast test, on a quiet 2-core machine (twice the slowest today); scaled by load
BUDGET_ENV = "INRES_TEST_BUDGET_S"  # another budget in seconds (0: none), e.g. for a slower kind of machine


def _calibration_seconds() -> float:
    """A fixed piece of CPU work (convolutions forward and backward), best of five: how
    fast this machine is right now."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, 16, 32, 32, generator=generator, requires_grad=True)
    w = torch.rand(16, 16, 3, 3, generator=generator, requires_grad=True)
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(20):
            torch.nn.functional.conv2d(x, w, padding=1).square().sum().backward()
        best = min(best, time.perf_counter() - began)
    return best


CALIBRATION_S = 0.07  # _calibration_seconds() on a quiet 2-core machine of our CI kind
_slowdown = []


def fast_budget(recheck: bool = False) -> float:
    """The fast tier's budget per test phase, in seconds: FAST_BUDGET_S times how much
    slower than quiet the machine is now (never less), or INRES_TEST_BUDGET_S."""
    if BUDGET_ENV in os.environ:
        return float(os.environ[BUDGET_ENV]) or float("inf")
    if not _slowdown or recheck:
        _slowdown.append(max(1.0, _calibration_seconds() / CALIBRATION_S))
    return FAST_BUDGET_S * max(_slowdown)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "teardown" or not report.passed or item.get_closest_marker("slow"):
        return
    if report.duration > fast_budget() and report.duration > fast_budget(
        recheck=True
    ):  # re-measured under load
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid}: {report.when} took {report.duration:.1f} s, over the fast tier's budget of "
            f"{fast_budget():.1f} s: make it faster, or mark it @pytest.mark.slow (the integration tier)"
        )


@pytest.fixture
def pipeline():
    """The pipeline from Python, exactly what the command line runs: a suite's stages through
    `bench.evaluate.evaluate_defense(defense, results_dir, data_dir, suite=..., ...)`."""
    from bench import evaluate_defense

    return lambda defense, results_dir, data_dir, **options: evaluate_defense(
        defense, results_dir, data_dir, **options
    )


@pytest.fixture(autouse=True)
def _fast_tier_runs_no_pipeline(request, monkeypatch):
    """In the fast tier, the pipeline's work (training, cells, checks, stability through an
    executor) is an error: such a test belongs to the slow tier."""
    if request.node.get_closest_marker("slow"):
        return
    from bench.run import executors

    def refuse(work):
        pytest.fail(
            f"{request.node.nodeid} runs the pipeline's work ({work.task.kind}) in the fast tier: mark it "
            "@pytest.mark.slow (the integration tier)",
            pytrace=False,
        )

    monkeypatch.setattr(executors, "execute", refuse)


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
    run = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True
    )  # no timeout: CI's bounds the whole run
    return root / "results", run


MINI_RUN = [
    "run_bench.py",
    "--models",
    "resnet8",
    "--n-train",
    "1024",
    "--n-test",
    "24",
    "--n-stability",
    "10",
    "--radii",
    "2",
    "--no-progress",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """ResNet-8 at seeds 0 and 1 (2 epochs on 1,024 synthetic images), trained once per test
    run through the command line: `results/checkpoints/` and `data/` under the returned root.
    Integration tests copy the checkpoints instead of training their own."""
    root = tmp_path_factory.mktemp("trained")
    command = [
        sys.executable,
        "run_bench.py",
        "--stage",
        "train",
        "--models",
        "resnet8",
        "--seeds",
        "0,1",
        "--n-train",
        "1024",
        "--no-progress",
        "--results-dir",
        str(root / "results"),
        "--data-dir",
        str(root / "data"),
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return root


def with_trained_checkpoints(trained: Path, results: Path) -> Path:
    """A results dir holding a copy of the `trained` fixture's checkpoints (and nothing else)."""
    shutil.copytree(trained / "results" / "checkpoints", results / "checkpoints")
    return results


@pytest.fixture(scope="session")
def mini_run(trained, tmp_path_factory):
    """A small run of the whole pipeline (ResNet-8, 2 seeds and their ensemble, 26 cells
    each, on synthetic data) on the `trained` checkpoints: returns its command (without
    --results-dir) and the results dir of one uninterrupted run, the reference for the
    resume and executor tests (which train their own)."""
    root = tmp_path_factory.mktemp("mini")
    command = [sys.executable, *MINI_RUN, "--data-dir", str(trained / "data")]
    reference = with_trained_checkpoints(trained, root / "reference")
    run = subprocess.run(
        [*command, "--results-dir", str(reference)], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (
        "resnet8@smoke@n1024 synthetic seed 1: finished already" in run.stderr
    )  # trained once, by `trained`
    return command, reference


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
