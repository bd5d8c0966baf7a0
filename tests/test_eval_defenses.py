"""Ranking a defense from the command line (bench.eval.defenses): the README's one-liner, the
RobustBench fetch, several defenses from a TOML file, and every bad input as one line."""

import hashlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from bench.data.noise import NOISE_GROUPS
from bench.data.splits import load_train
from bench.eval.adapters import NormalizedModel, module_defense
from bench.records.load import load_checks, load_records, load_stability
from run_bench import main

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
needs_robustbench = pytest.mark.skipif(
    importlib.util.find_spec("robustbench") is None, reason="robustbench extra"
)
RB_NAME = "Hendrycks2020AugMix_WRN"  # 2.2M parameters: the smallest CIFAR-10 entry
README_SMALL_CNN = ""  # the README's small_cnn.py (set by the autouse fixture below)


@pytest.fixture(autouse=True)
def _readme_small_cnn(readme_example):
    global README_SMALL_CNN
    README_SMALL_CNN = readme_example("small-cnn")


def small_cnn_class(folder: Path):
    """The README's small_cnn.py, written into `folder`, and its SmallCNN."""
    path = folder / "small_cnn.py"
    path.write_text(README_SMALL_CNN)
    spec = importlib.util.spec_from_file_location(f"small_cnn_{abs(hash(folder))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SmallCNN


def trained_weights(folder: Path, data_dir: Path, name: str, seed: int, steps: int = 120) -> Path:
    """A SmallCNN trained briefly on the synthetic training set (a defense worth ranking:
    random weights predict one class), its state_dict saved as `name`."""
    torch.manual_seed(seed)
    net = small_cnn_class(folder)()
    train = load_train("synthetic", data_dir)
    x = torch.from_numpy(train.images[:2048]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(train.labels[:2048])
    model, optimizer = NormalizedModel(net, MEAN, STD), torch.optim.Adam(net.parameters(), 3e-3)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (64,), generator=batches)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(net.state_dict(), folder / name)
    return folder / name


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "run_bench.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


# --- the README's one-liner -------------------------------------------------------------------


@pytest.mark.slow
def test_the_readme_small_cnn_is_ranked_through_the_cli(smoke_run, tmp_path, readme_example):
    """The README's command on the synthetic set, into a copy of the smoke suite's results
    (whose ResNet-14 is the transfer check's source): the paper suite's protocol, the checks,
    the leaderboard row and its verdict, the sanity section, no RobustBench file (the paper's
    protocol is not RobustBench's); then cached."""
    smoke_results, _ = smoke_run
    data = smoke_results.parent / "data"
    results = tmp_path / "results"
    shutil.copytree(smoke_results, results)
    trained_weights(tmp_path, data, "small_cnn.pt", seed=0)
    command = shlex.split(readme_example("rank-defense", "bash"))
    assert command[:2] == ["python", "run_bench.py"] and command[command.index("--dataset") + 1] == "cifar10"
    command[command.index("--dataset") + 1] = "synthetic"
    extra = [
        "--n-test",
        "40",
        "--device",
        "cpu",
        "--data-dir",
        str(data),
        "--results-dir",
        str(results),
        "--no-progress",
    ]
    run = cli([*command[2:], *extra], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        "1 defense); 40 test images, autoattack on 40 (the suite's 1000, capped at the 40 test images), "
        "stability on 40 (the suite's 200, capped at the 40 test images)"
    ) in run.stderr
    assert "small_cnn synthetic: the transfer check attacks from resnet14@smoke@n2048 seed 0" in run.stderr
    assert "36 cells evaluated, 0 cached; 1 stability units measured, 0 cached" in run.stderr

    cells = load_records(results).query("run == 'small_cnn'")
    assert sorted(cells["perturbation"].unique()) == sorted(
        ["clean", "fgsm", "ifgsm", "pgd", "uniform", "pgd50", "autoattack", *NOISE_GROUPS]
    )
    assert set(cells["n"]) == {40} and set(cells.query("perturbation == 'pgd50'")["eps_255"]) == {16.0, 64.0}
    assert json.loads(cells.query("perturbation == 'autoattack'")["params"].iloc[0]) == {
        "version": "standard"
    }
    checks = load_checks(results).query("run == 'small_cnn'")
    assert sorted(checks["check"]) == sorted(
        [
            "zero-gradients",
            "nonfinite-gradients",
            "randomized",
            "probabilities",
            "classes",
            "dynamic",
            "transfer",
        ]
    )
    assert (
        checks["passed"].all()
        and "(from resnet14@smoke@n2048 seed 0)" in checks.query("check == 'transfer'")["detail"].iloc[0]
    )
    assert list(load_stability(results).query("run == 'small_cnn'")["quantity"]) == ["input_gradient"]

    board = pd.read_csv(results / "leaderboard.csv").set_index("name")
    row = board.loc["small_cnn"]
    assert (row["model"], row["dataset"], row["n_test"], row["seeds"], row["preset"]) == (
        "small_cnn",
        "synthetic",
        40,
        1,
        "paper",
    )
    assert pd.isna(row["flags"]) and not row["unreliable"]  # every critical gate measured and passed
    assert row["clean"] > 50 and row["pgd@2"] < row["clean"] and row["autoattack@2"] <= row["pgd@2"] + 5
    assert not list(results.glob("leaderboard/*/*/*"))  # AutoAttack at 2/255 is not RobustBench's 8/255
    lines = (results / "REPORT.md").read_text().splitlines()
    header = [
        c.strip() for c in next(line for line in lines if line.startswith("| entry ")).strip("|").split("|")
    ]
    mine = next(
        [c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| small_cnn ")
    )
    shown = dict(
        zip(header, mine, strict=True)
    )  # REPORT.md's sanity section: every gate measured, transfer included
    assert (shown["data"], shown["flags"], shown["unreliable"]) == ("synthetic", "-", "no") and shown[
        "transfer"
    ] != ""
    assert float(shown["transfer"]) == pytest.approx(
        checks.query("check == 'transfer'")["value"].iloc[0], abs=0.006
    )

    again = cli(
        [*command[2:], *extra, "--stage", "eval,check,stability"], tmp_path
    )  # the reports were checked above
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 cells evaluated, 36 cached; 0 stability units measured, 1 cached" in again.stderr
    assert "the transfer check attacks from" not in again.stderr  # recorded: not run again


# --- several defenses from a file ----------------------------------------------------------------


TOML = """
[cnn-a]
defense = "small_cnn.py:SmallCNN"
weights = "a.pt"
mean = [0.4914, 0.4822, 0.4465]
std = [0.2470, 0.2435, 0.2616]
dataset = "synthetic"

[cnn-b]
defense = "small_cnn.py:SmallCNN"
weights = "b.pt"
mean = "0.4914,0.4822,0.4465"
std = "0.2470,0.2435,0.2616"
dataset = "synthetic"
"""
SMALL = [
    "--suite",
    "smoke",
    "--n-test",
    "20",
    "--radii",
    "2",
    "--stage",
    "eval,check,stability",
    "--no-progress",
]


@pytest.mark.slow
def test_a_toml_of_two_defenses_on_two_workers_records_what_one_after_the_other_does(smoke_run, tmp_path):
    """Two local workers, against one defense by the CLI and the other by evaluate_defense
    (the Python API runs exactly what the CLI runs): the same cells, bit for bit, the same
    checks and stability values."""
    data = smoke_run[0].parent / "data"
    trained_weights(tmp_path, data, "a.pt", seed=1, steps=60)
    trained_weights(tmp_path, data, "b.pt", seed=2, steps=60)
    (tmp_path / "defenses.toml").write_text(TOML)
    both, apart = tmp_path / "both", tmp_path / "apart"
    dry = cli(
        [
            "--defenses",
            "defenses.toml",
            *SMALL,
            "--data-dir",
            str(data),
            "--results-dir",
            str(both),
            "--dry-run",
        ],
        tmp_path,
    )
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "(0 to train, 0 to evaluate, 0 ensembles, 2 defenses)" in dry.stdout
    assert (
        "total: 0 checkpoints to train, 52 cells to run, 0 cached; 2 stability units to run, 0 cached"
        in dry.stdout
    )
    assert not both.exists()  # a dry run writes nothing
    run = cli(
        [
            "--defenses",
            "defenses.toml",
            *SMALL,
            "--workers",
            "2",
            "--data-dir",
            str(data),
            "--results-dir",
            str(both),
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]

    one = cli(
        [
            "--defense",
            "small_cnn.py:SmallCNN",
            "--weights",
            "a.pt",
            "--name",
            "cnn-a",
            "--mean",
            ",".join(map(str, MEAN)),
            "--std",
            ",".join(map(str, STD)),
            "--dataset",
            "synthetic",
            *SMALL,
            "--data-dir",
            str(data),
            "--results-dir",
            str(apart),
        ],
        tmp_path,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    from bench import evaluate_defense

    defense = module_defense(
        "cnn-b", small_cnn_class(tmp_path), tmp_path / "b.pt", mean=MEAN, std=STD, dataset="synthetic"
    )
    torch.set_num_threads(int(os.environ.get("INRES_TEST_THREADS", torch.get_num_threads())))
    rows = evaluate_defense(
        defense,
        results_dir=apart,
        data_dir=data,
        progress=False,
        suite="smoke",
        n_test=20,
        radii_255=(2.0,),
        stages=("eval", "check", "stability"),
        device="cpu",
    )
    assert len(rows) == 26 and set(rows["run"]) == {"cnn-b"}

    def same(frame: pd.DataFrame, drop: list[str]) -> pd.DataFrame:
        key = [c for c in frame.columns if c not in drop and c != "values"]
        return frame.drop(columns=drop).sort_values(key).reset_index(drop=True)

    timing = ["timestamp", "seconds", "batch_size", "device"]
    assert same(load_records(both), timing).equals(same(load_records(apart), timing))
    checks_both, checks_apart = (
        same(load_checks(both), ["timestamp"]),
        same(load_checks(apart), ["timestamp"]),
    )
    assert checks_both.equals(checks_apart) and len(checks_both) == 12
    stable_both, stable_apart = load_stability(both), load_stability(apart)
    assert [v.tolist() for v in stable_both.sort_values("run")["values"]] == [
        v.tolist() for v in stable_apart.sort_values("run")["values"]
    ]
    builds = (
        sqlite3.connect(both / "records.sqlite")
        .execute("SELECT run, build FROM defenses ORDER BY run")
        .fetchall()
    )
    code = hashlib.sha256(README_SMALL_CNN.encode()).hexdigest()  # small_cnn.py, as written
    assert builds == [
        (
            n,
            f'{{"code":"{code}","factory":"small_cnn:SmallCNN","mean":[0.4914,0.4822,0.4465],'
            '"std":[0.247,0.2435,0.2616]}',
        )
        for n in ("cnn-a", "cnn-b")
    ]


@pytest.mark.slow
def test_a_dry_run_of_one_defense_plans_the_paper_protocol_and_says_the_transfer_check_is_skipped(
    workspace, grey_root, capsys, caplog
):
    caplog.set_level(logging.INFO)
    code = main(
        [
            *MODULE,
            "--device",
            "cpu",
            "--dry-run",
            "--data-dir",
            str(grey_root),
            "--results-dir",
            str(workspace / "r"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and not (workspace / "r").exists()
    assert (
        "plan: suite paper (every table of the paper: 5 seeds, the paper's epochs, full test sets), preset paper, device "
        "cpu; 1 job, 1 task (0 to train, 0 to evaluate, 0 ensembles, 1 defense); all test images, autoattack on 1000, "
        "stability on 200"
    ) in out
    assert (
        "total: 0 checkpoints to train, 36 cells to run, 0 cached; 1 stability units to run, 0 cached" in out
    )
    assert (
        f"small_cnn cifar10: no finished ResNet in {workspace}/r/checkpoints/cifar10 to transfer from; transfer check "
        "skipped (train one, e.g. --models resnet110 --datasets cifar10 --stage train)"
    ) in caplog.messages


@pytest.mark.slow
def test_a_registered_architecture_with_your_weights_gets_every_stability_unit(workspace, grey_root, capsys):
    from models import create_model

    torch.save(create_model("resnet8").state_dict(), workspace / "mine.pt")
    code = main(
        [
            "--state-dict",
            "resnet8",
            "mine.pt",
            "--suite",
            "smoke",
            "--dry-run",
            "--data-dir",
            str(grey_root),
            "--results-dir",
            str(workspace / "r"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and re.search(r"^\| mine +\| cifar10 +\| +1 \|", out, re.M), out
    assert (
        "total: 0 checkpoints to train, 34 cells to run, 0 cached; 7 stability units to run, 0 cached" in out
    )


# --- RobustBench: fetched by its own loader --------------------------------------------------------


@pytest.mark.slow
@needs_robustbench
def test_a_missing_robustbench_checkpoint_is_fetched_with_load_model_then_loaded(
    grey_root, tmp_path, monkeypatch, capsys
):
    from bench.eval.adapters import _robustbench

    model_dicts, BenchmarkDataset, ThreatModel = (
        _robustbench()
    )  # robustbench imports `autoattack`: aliased first
    import robustbench.utils

    net = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("corruptions")][RB_NAME]["model"]()
    asked = []

    def fetch(
        name, model_dir, dataset, threat_model
    ):  # what load_model leaves: its layout, a DataParallel file
        asked.append(
            (name, model_dir, dataset, threat_model, os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"))
        )
        folder = Path(model_dir) / dataset / threat_model
        folder.mkdir(parents=True)
        torch.save(
            {"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, folder / f"{name}.pt"
        )
        return net

    data = tmp_path / "data"
    shutil.copytree(grey_root, data)
    monkeypatch.setattr(robustbench.utils, "load_model", fetch)
    args = [
        "--robustbench",
        RB_NAME,
        "--threat-model",
        "corruptions",
        "--model-dir",
        str(tmp_path / "zoo"),
        "--suite",
        "smoke",
        "--n-test",
        "10",
        "--radii",
        "2",
        "--stage",
        "eval",
        "--data-dir",
        str(data),
        "--results-dir",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    assert main(args) == 0
    assert asked == [
        (RB_NAME, str(tmp_path / "zoo"), "cifar10", "corruptions", "1")
    ]  # torch.load forced to weights only
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # and restored
    cells = load_records(tmp_path / "r")
    assert set(cells["run"]) == {RB_NAME} and set(cells["family"]) == {"robustbench"} and len(cells) == 26
    assert main(args) == 0 and len(asked) == 1  # present now: never fetched again


@pytest.mark.slow
@needs_robustbench
def test_an_offline_robustbench_fetch_is_one_line(tmp_path, monkeypatch, capsys):
    from bench.eval.adapters import _robustbench

    _robustbench()  # robustbench imports `autoattack`: aliased first
    import robustbench.utils

    def offline(*args, **kwargs):
        raise ConnectionError(
            "HTTPSConnectionPool(host='drive.google.com'): Max retries exceeded\nFailed to resolve"
        )

    monkeypatch.setattr(robustbench.utils, "load_model", offline)
    code = main(
        [
            "--robustbench",
            RB_NAME,
            "--threat-model",
            "corruptions",
            "--model-dir",
            str(tmp_path / "zoo"),
            "--device",
            "cpu",
            "--results-dir",
            str(tmp_path / "r"),
        ]
    )
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error == (
        f"error: RobustBench checkpoint {tmp_path}/zoo/cifar10/corruptions/{RB_NAME}.pt not found and its download failed "
        f"(ConnectionError: Failed to resolve): fetch it once with robustbench.utils.load_model('{RB_NAME}', "
        f"model_dir='{tmp_path}/zoo', dataset='cifar10', threat_model='corruptions') or copy it there"
    )
    assert not (tmp_path / "r").exists()


# --- bad input: one line, exit 2, nothing recorded -----------------------------------------------


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder with the README's small_cnn.py, its weights, and files that go wrong."""
    SmallCNN = small_cnn_class(tmp_path)
    torch.save(SmallCNN().state_dict(), tmp_path / "small_cnn.pt")
    torch.save({"conv.weight": torch.zeros(2, 3, 1, 1)}, tmp_path / "other.pt")
    (tmp_path / "broken.py").write_text("import torch\nraise RuntimeError('no GPU driver here')\n")
    (tmp_path / "raises.py").write_text("def Net():\n    raise ValueError('width must be even')\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


MODULE = ["--defense", "small_cnn.py:SmallCNN", "--weights", "small_cnn.pt"]
# each mistake: the parts of its one line a user must read (the place, the value, the fix)
BAD = {
    "module does not import": (
        ["--defense", "no_such_pkg.nets:SmallCNN", "--weights", "small_cnn.pt"],
        (
            "--defense no_such_pkg.nets:SmallCNN",
            "cannot import no_such_pkg.nets",
            "ModuleNotFoundError",
            "No module named 'no_such_pkg'",
        ),
    ),
    "module raises": (
        ["--defense", "broken.py:Net", "--weights", "small_cnn.pt"],
        (
            "--defense {tmp}/broken.py:Net",
            "cannot import {tmp}/broken.py",
            "RuntimeError",
            "no GPU driver here",
        ),
    ),
    "no such factory": (
        ["--defense", "small_cnn.py:BigCNN", "--weights", "small_cnn.pt"],
        (
            "--defense {tmp}/small_cnn.py:BigCNN",
            "{tmp}/small_cnn.py has no factory 'BigCNN'; its modules",
            "SmallCNN",
        ),
    ),
    "factory raises": (
        ["--defense", "raises.py:Net", "--weights", "small_cnn.pt"],
        ("--defense {tmp}/raises.py:Net", "Net() raised ValueError", "width must be even"),
    ),
    "weights do not fit": (
        ["--defense", "small_cnn.py:SmallCNN", "--weights", "other.pt"],
        (
            "checkpoint {tmp}/other.pt does not fit SmallCNN",
            "missing keys features.0.weight, features.0.bias, features.3.weight, features.3.bias (+2 more); unexpected keys conv.weight",
        ),
    ),
    "missing weights": (
        ["--defense", "small_cnn.py:SmallCNN"],
        (
            "--defense small_cnn.py:SmallCNN",
            "a defense needs its weights (--weights PATH, a state_dict file)",
        ),
    ),
    "mean of the wrong length": (
        [*MODULE, "--mean", "0.5,0.5", "--std", "0.2,0.2"],
        ("defense small_cnn", "mean needs 3 numbers (one per channel of cifar10), got 2"),
    ),
    "mean not numbers": (
        [*MODULE, "--mean", "a,b,c", "--std", "1,1,1"],
        (
            "--defense small_cnn.py:SmallCNN",
            "mean takes finite numbers, one per channel (e.g. 0.4914,0.4822,0.4465), got 'a,b,c'",
        ),
    ),
    "mean without std": (
        [*MODULE, "--mean", "0.5,0.5,0.5"],
        (
            "--defense small_cnn.py:SmallCNN",
            "give --mean and --std together (one number per channel), or neither",
        ),
    ),
    "weights without a defense": (
        ["--weights", "small_cnn.pt"],
        ("--weights describes a defense", "name it with --defense, --state-dict or --robustbench"),
    ),
    "two sources": (
        [*MODULE, "--state-dict", "resnet8", "small_cnn.pt"],
        (
            "--defense small_cnn.py:SmallCNN",
            "name the defense with exactly one of defense, state-dict, robustbench (got defense, state-dict)",
        ),
    ),
    "a registered name": (
        [*MODULE, "--name", "resnet110"],
        (
            "--defense small_cnn.py:SmallCNN",
            "defense name 'resnet110' reads as a registered model's run",
            "give it another with --name",
        ),
    ),
    "a name that is a path": (
        [*MODULE, "--name", "../up"],
        (
            "--defense small_cnn.py:SmallCNN",
            "defense name '../up' must be 1-100 letters, digits or . _ @ + - (starting with a letter or digit)",
            "give another with --name",
        ),
    ),
    "with --models": (
        [*MODULE, "--models", "resnet8"],
        (
            "--models selects zoo models, and this run evaluates defenses",
            "leave it out (a defense's data set is its --dataset), or run the zoo without --defense",
        ),
    ),
    "with the train stage": (
        [*MODULE, "--stage", "train,eval"],
        (
            "a defense is evaluated here, never trained",
            "leave train out of --stage (e.g. --stage eval,check,stability,report)",
        ),
    ),
    "unknown data set": ([*MODULE, "--dataset", "svhn"], None),
    "state dict that does not fit": (
        ["--state-dict", "resnet8", "small_cnn.pt"],
        ("checkpoint {tmp}/small_cnn.pt does not fit PreActResNet", "missing keys normalize.mean,"),
    ),
    "toml unknown key": (
        ["--defenses", "unknown.toml"],
        (
            "--defenses unknown.toml [mine]",
            "unknown key 'wieghts'; the keys are defense, weights, mean, std, dataset, state-dict, robustbench, model-dir, threat-model",
        ),
    ),
    "toml syntax": (["--defenses", "syntax.toml"], ("--defenses syntax.toml is not valid TOML",)),
    "toml and options": (
        ["--defenses", "syntax.toml", "--weights", "a.pt"],
        ("--weights and --defenses", "name the defenses in one place (the file, or the options)"),
    ),
    "toml weights missing": (
        ["--defenses", "missing.toml"],
        ("checkpoint {tmp}/x.pt not found", "check the path (cwd is {tmp})"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_defense_is_one_line_before_any_work(workspace, capsys, case):
    (workspace / "unknown.toml").write_text(
        '[mine]\ndefense = "small_cnn.py:SmallCNN"\nwieghts = "small_cnn.pt"\n'
    )
    (workspace / "syntax.toml").write_text('[mine\ndefense = "x"\n')
    (workspace / "missing.toml").write_text('[a]\nstate-dict = ["resnet8", "x.pt"]\n')
    args, expected = BAD[case]
    code = main([*args, "--device", "cpu", "--results-dir", str(workspace / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    if expected is not None:
        assert [p for p in expected if p.format(tmp=workspace) not in err[-1]] == [], err[-1]
    assert not (workspace / "r").exists()  # nothing recorded, not even an empty store


@pytest.mark.slow
def test_the_same_weights_built_otherwise_are_refused_not_found_cached(
    workspace, grey_root, capsys, monkeypatch
):
    """The records key a defense's cells by its weights' digest: a run of the same weights
    with another normalisation must not read them as its own."""
    from bench.run import pipeline

    calls = []
    monkeypatch.setattr(pipeline.Driver, "execute", lambda self, tasks, executor: calls.append(len(tasks)))
    base = [
        *MODULE,
        "--suite",
        "smoke",
        "--stage",
        "check",
        "--results-dir",
        "r",
        "--data-dir",
        str(grey_root),
    ]
    assert main([*base, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]) == 0 and calls == [1]
    assert main(base) == 2
    code = hashlib.sha256((workspace / "small_cnn.py").read_bytes()).hexdigest()  # the build's code: its file
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: defense small_cnn on cifar10: the records measured these weights "
        f"({hashlib.sha256((workspace / 'small_cnn.pt').read_bytes()).hexdigest()[:12]}) built as "
        f'{{"code":"{code}","factory":"small_cnn:SmallCNN","mean":[0.5,0.5,0.5],"std":[0.25,0.25,0.25]}}, now built as '
        f'{{"code":"{code}","factory":"small_cnn:SmallCNN","mean":null,"std":null}}: give this build another --name, or use '
        "another --results-dir"
    )
    assert calls == [1]


@pytest.mark.slow
def test_another_file_with_the_same_names_is_another_build(workspace, grey_root, capsys, monkeypatch):
    """The module stem, class name, weights and normalisation were the build's identity: a
    small_cnn.py elsewhere whose SmallCNN negates its logits was served the first one's cells."""
    from bench.run import pipeline

    monkeypatch.setattr(pipeline.Driver, "execute", lambda self, tasks, executor: None)
    other = workspace / "elsewhere"
    other.mkdir()
    (other / "small_cnn.py").write_text(README_SMALL_CNN.replace("return self.", "return -self.", 1))
    assert "return -self." in (other / "small_cnn.py").read_text()
    base = [
        "--weights",
        "small_cnn.pt",
        "--name",
        "cnn",
        "--suite",
        "smoke",
        "--stage",
        "check",
        "--results-dir",
        "r",
        "--data-dir",
        str(grey_root),
    ]
    assert main(["--defense", "small_cnn.py:SmallCNN", *base]) == 0
    capsys.readouterr()
    assert main(["--defense", "elsewhere/small_cnn.py:SmallCNN", *base]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        "error: defense cnn on cifar10: the records measured these weights"
    ) and line.endswith("give this build another --name, or use another --results-dir")
    assert main(["--defense", "small_cnn.py:SmallCNN", *base]) == 0  # the first build is still itself


@pytest.mark.slow
@needs_robustbench
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "Carmon2019Unlabelled",
            ("no cifar10/Linf model 'Carmon2019Unlabelled'", "closest: Carmon2019Unlabeled, Kang2021Stable"),
        ),
        ("Chen2020Adversarial", ("'Chen2020Adversarial' is an ensemble", "choose a single-file model")),
    ],
)
def test_a_robustbench_name_it_cannot_rank_is_one_line(tmp_path, capsys, name, expected):
    code = main(
        [
            "--robustbench",
            name,
            "--model-dir",
            str(tmp_path / "zoo"),
            "--device",
            "cpu",
            "--results-dir",
            str(tmp_path / "r"),
        ]
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: ") and all(p in line for p in expected), line
    assert not (tmp_path / "r").exists() and not (tmp_path / "zoo").exists()  # nothing fetched
