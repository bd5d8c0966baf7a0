"""run_bench.py: the summary, listing and one-line errors."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import run_bench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_summary_table(capsys):
    """Sizes, damped blocks, d's initialisation, the coefficients it starts at (the sig rule
    from the logit of In-ResNet's interval) and what is trained in place of λ."""
    assert (
        run_bench.main(
            ["--stage", "summary", "--models", "resnet8,in-resnet14,in-resnet-sig14,in-resnet-gating14"]
        )
        == 0
    )
    assert capsys.readouterr().out == (
        "| model              | arch                  | rule      |   params |   interp_params | damped   | lambda init       | act(d) at init   | trained as   |\n"
        "|--------------------|-----------------------|-----------|----------|-----------------|----------|-------------------|------------------|--------------|\n"
        "| resnet8            | preact-resnet8-basic  | residual  |   77,850 |               0 | 0/3      | -                 | -                | -            |\n"
        "| in-resnet14        | preact-resnet14-basic | in        |  175,066 |               3 | 3/6      | U[0.2, 0.25]      | [0.2, 0.25]      | k = 1 - λ    |\n"
        "| in-resnet-sig14    | preact-resnet14-basic | in-sig    |  175,066 |               3 | 3/6      | U[-1.386, -1.099] | [0.2, 0.25]      | λ            |\n"
        "| in-resnet-gating14 | preact-resnet14-basic | in-gating |  175,066 |           5,488 | 3/6      | U[0.2, 0.25]      | [0.2, 0.25]      | W_d, b_d     |\n"
    )


@pytest.mark.slow
def test_summary_of_the_paper_models_cifar100(capsys):
    assert run_bench.main(["--stage", "summary", "--models", "main", "--num-classes", "100"]) == 0
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "model" not in line
    ]
    params = {row.split("|")[1].strip(): int(row.split("|")[4].replace(",", "")) for row in rows}
    assert params["resnet110"] == 1_736_372
    assert params["lambda-in-resnet164"] == 1_726_388
    assert params["in-resnext29-8x64d"] == 34_518_948
    assert len(params) == 9


@pytest.mark.slow
def test_list_models(capsys):
    assert run_bench.main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^lambda-in-resnet110 +lambda-In-ResNet \(Eq. 15\): pre-activation ResNet-110", out, re.M
    )
    assert "  variants   the In-ResNet-110 variants of Table 4" in out


@pytest.mark.slow
def test_unknown_model_is_one_line_and_exit_2():
    run = subprocess.run(
        [sys.executable, "run_bench.py", "--models", "in-resnet111"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == (
        "error: unknown model 'in-resnet111'; closest: in-resnet110, in-resnet14, in-resnet164, "
        "in-resnet-sig110, in-resnet56 (list them all with: python run_bench.py --list-models)\n"
    )


@pytest.mark.slow
def test_train_stage_trains_and_then_skips(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    argv = [
        "--stage",
        "train",
        "--models",
        "resnet8",
        "--datasets",
        "synthetic",
        "--seeds",
        "0",
        "--length",
        "smoke",
        "--n-train",
        "1024",
        "--results-dir",
        str(tmp_path / "results"),
        "--data-dir",
        str(tmp_path / "data"),
        "--no-progress",
    ]
    assert run_bench.main(argv) == 0
    folder = tmp_path / "results" / "checkpoints" / "synthetic" / "resnet8@smoke@n1024" / "seed0"
    assert (folder / "weights.pt").is_file() and (folder / "meta.json").is_file()
    assert "resnet8@smoke@n1024 synthetic seed 0: finished, test acc" in caplog.text
    caplog.clear()
    assert run_bench.main(argv) == 0
    assert "resnet8@smoke@n1024 synthetic seed 0: finished already" in caplog.text


@pytest.mark.slow
def test_train_stage_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cases = [  # each: what its one line must say (the value, the place, the fix)
        (["--device", "cuda:7"], ("device 'cuda:7' is not usable here", "use --device cpu")),
        (["--device", "tpu"], ("device 'tpu' is not usable here", "use --device cpu")),
        (
            ["--results-dir", str(blocker), "--datasets", "synthetic", "--data-dir", str(tmp_path)],
            (f"--results-dir {blocker}", "is a file, not a folder", "choose another --results-dir"),
        ),
        (["--datasets", "svhn"], ("unknown dataset 'svhn'", "cifar10, cifar100, synthetic")),
        (["--seeds", "1,x"], ("--seeds", "non-negative integers", "'1,x'")),
    ]
    for extra, parts in cases:
        assert run_bench.main(["--stage", "train", "--models", "resnet8", "--seeds", "0", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and all(p in err for p in parts), err
    assert not any((tmp_path / "results").glob("**/meta.json"))
