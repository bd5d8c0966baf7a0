"""benchmarks/gpu_check.py keeps working where CI runs (a CPU), and its parity check
catches a broken skip rule."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

from models import skip  # noqa: E402


def test_parity_fails_when_the_skip_drops_lambdas_gradient(monkeypatch):
    backward = skip._DampedSum.backward

    def without_lambda(ctx, g):
        grad_x, grad_fx, _, grad_b = backward(ctx, g)
        return grad_x, grad_fx, None, grad_b

    monkeypatch.setattr(skip._DampedSum, "backward", staticmethod(without_lambda))
    (eager,) = gpu_check.parity(("in-resnet14",), "cpu", paths=[("eager", "train")])
    assert not eager["pass"] and eager["skip gradient"] == pytest.approx(1.0)
    assert eager["logits"] < 1e-5  # the forward is right; only λ learns nothing


@pytest.mark.slow
def test_tiny_check_writes_every_section(tmp_path):
    assert gpu_check.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu-tiny.json").read_text())
    assert list(report["sections"]) == [
        "parity",
        "learning",
        "rehearsal",
        "training",
        "evaluation",
        "epoch",
        "stability",
    ]
    (rehearsed,) = report["sections"][
        "rehearsal"
    ]  # the smoke suite's ResNet-14 rehearsed through the command line
    assert rehearsed["finished"] and rehearsed["cells"] == 3 * 34 - 6 and rehearsed["checkpoints"] == 2
    assert rehearsed["last line"].startswith("rehearsal measured: train ")
    parity = report["sections"]["parity"]
    rules = ("in-resnet14", "lambda-in-resnet14", "in-resnet-gating-sig14")
    paths = [("eager", "train"), ("compile", "train"), ("compile", "eval"), ("bf16", "train")]
    assert [(r["model"], r["path"], r["mode"]) for r in parity] == [(m, *p) for m in rules for p in paths]
    assert all(r["pass"] for r in parity), [r for r in parity if not r["pass"]]
    assert (
        max(r["skip gradient"] for r in parity if r["path"] == "eager") < 1e-5
    )  # our autograd = plain autograd
    (learning,) = report["sections"]["learning"]
    assert learning["pass"] and learning["test accuracy"] > 0.2  # the short run learns
    loops = [r["loop"] for r in report["sections"]["training"] if "images/s" in r]
    assert len(loops) == 5 and loops[0] == "plain (DataLoader)"  # no CUDA graphs on a CPU
    epoch = report["sections"]["epoch"][0]
    assert epoch["images"] == 1024 and set(epoch["projected hours"]) == {"paper", "quick"}
    assert report["sections"]["evaluation"][0]["PGD-20 vs hand loop"] > 0
    (stable,) = report["sections"]["stability"]
    assert stable["stage / PGD-20"] > 0 and stable["Jv vs jvp (rel.)"] < 1e-5
    markdown = (tmp_path / "cpu-tiny.md").read_text()
    assert markdown.startswith("# GPU check: cpu") and "## epoch" in markdown


def test_device_names_become_file_names():
    assert gpu_check.device_slug("cpu") == "cpu"
    if torch.cuda.is_available():
        assert gpu_check.device_slug("cuda").startswith("gpu-")
