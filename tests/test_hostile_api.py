"""Round five of hostile input through the Python API, a defenses TOML and the terminal: the
API refuses what the command line refuses, a defense that breaks during evaluation is one
line, odd TOML values name their file, table and key, and any encoding can be written."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import run_bench
from bench.eval.adapters import module_defense, state_dict_defense
from bench.eval.defenses import KEYS, factory_of, load_defenses
from bench.eval.identity import NAME
from bench.eval.protocol import EvalConfig
from bench.records.load import load_records
from bench.run.api import evaluate_defense, evaluate_protocol
from bench.run.reaper import descendants
from models import UserError, create_model

REPO = Path(__file__).resolve().parents[1]
GREY = {"mean": (0, 0, 0), "std": (1, 1, 1)}


# --- EvalConfig refuses what the command line refuses -------------------------------------------


@pytest.mark.parametrize(
    ("values", "parts"),
    [
        ({"seed": -1}, ("EvalConfig.seed", "[0, 4294967296)", "-1")),
        ({"steps": 1.5}, ("EvalConfig.steps", "integer", "1.5")),
        (
            {"n_test": 2.5},
            ("EvalConfig.n_test 2.5", "whole number of test images", "None: the whole test set"),
        ),
        ({"n_test": 0}, ("EvalConfig.n_test 0", "must be positive")),
        ({"steps": True}, ("EvalConfig.steps", "integer", "True")),
        ({"noise_source": "bogus"}, ("EvalConfig.noise_source", "auto, released, generated", "'bogus'")),
        ({"radii_255": (1, "2")}, ("EvalConfig.radii_255", "tuple of numbers", "(1, '2')")),
        ({"radii_255": [1, 2]}, ("EvalConfig.radii_255", "tuple of numbers", "[1, 2]")),
        ({"radii_255": (1, 300)}, ("EvalConfig.radii_255 1,300", "[0, 255]", "got 300")),
        ({"alpha_255": "2"}, ("EvalConfig.alpha_255", "positive number of 1/255", "'2'")),
        (
            {"subsets": (("autoattack", 0.5),)},
            ("EvalConfig.subsets autoattack 0.5", "whole number of test images"),
        ),
        ({"channels_last": 1}, ("EvalConfig.channels_last", "True or False", "got 1")),
    ],
)
def test_an_eval_config_the_command_line_would_refuse_is_refused_when_made(values, parts):
    """Before: seed=-1 recorded 23 cells, then raised numpy's ValueError; 1.5 steps became 1;
    noise_source="bogus" ran. The line names the field, the value and what it must be."""
    with pytest.raises(UserError) as err:
        EvalConfig(**values)
    assert all(part in str(err.value) for part in parts), str(err.value)


ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 300), max_size=3).map(tuple),
)
FIELDS = (
    "seed",
    "steps",
    "n_test",
    "batch_size",
    "noise_source",
    "radii_255",
    "alpha_255",
    "preset",
    "device",
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), ANY, max_size=3))
def test_any_eval_config_is_made_or_refused_in_one_line(values):
    """Every value of every field: an EvalConfig whose fields are what they claim, or one
    UserError line; never a TypeError, OverflowError or ValueError from inside."""
    try:
        config = EvalConfig(**values)
    except UserError as err:
        assert "\n" not in str(err)
        return
    for name in ("seed", "steps"):
        assert type(getattr(config, name)) is int and getattr(config, name) >= 0
    assert all(type(e) in (int, float) and 0 <= e <= 255 for e in config.radii_255)
    assert config.n_test is None or (type(config.n_test) is int and config.n_test >= 1)
    hash(config)  # a cache key: every field hashable


# --- the API refuses what the command line refuses ------------------------------------------------


class Grey(nn.Module):
    """conftest's GreyLevel classifier (70% on grey_root), with a forward that can be told to fail."""

    def __init__(self, levels: type[nn.Module], fail=None):
        super().__init__()
        self.net, self.fail, self.calls = levels(), fail, 0

    def forward(self, x):
        self.calls += 1
        if self.fail is not None:
            self.fail(self, x)
        return self.net(x)


@pytest.fixture
def grey(grey_defense, tmp_path):
    """module_defense of a Grey, by name and failure."""
    levels = type(grey_defense.model.net)
    torch.save(Grey(levels).state_dict(), tmp_path / "grey.pt")
    return lambda name="grey", fail=None: module_defense(
        name, lambda: Grey(levels, fail), tmp_path / "grey.pt", **GREY
    )


@pytest.mark.parametrize("name", ["../../pwn", "a\n| 0 | FAKE | 99.99 |", "resnet110", ""])
def test_a_name_the_command_line_refuses_is_refused_by_every_adapter(grey, tmp_path, name):
    """Before: module_defense(name="x\\n| 0 | FAKE |") plus evaluate_protocol put a FAKE row into the leaderboard."""
    with pytest.raises(UserError, match=r"^module_defense: defense name .* (must be|reads as)"):
        grey(name)
    torch.save(create_model("resnet8").state_dict(), tmp_path / "resnet8.pt")
    with pytest.raises(
        UserError,
        match=r"^state_dict_defense\('resnet8', '.*'\): defense name 'resnet8' reads as a registered",
    ):
        state_dict_defense("resnet8", tmp_path / "resnet8.pt")  # named after its file, as --state-dict


def test_more_test_images_than_there_are_and_a_negative_seed_are_refused_before_work(
    grey, grey_root, tmp_path
):
    """Before: n_test=5000 was shrunk to the 100 test images in silence."""
    defense = grey()
    with pytest.raises(UserError) as err:
        evaluate_protocol(defense, EvalConfig(n_test=5000), tmp_path / "r", grey_root, progress=False)
    said = str(err.value)
    assert all(
        p in said
        for p in ("EvalConfig.n_test", "5,000", "100 test images of cifar10", str(grey_root), "at most 100")
    )
    with pytest.raises(
        UserError, match=r"^evaluate_protocol: seed .* must be an integer in \[0, 2\*\*32\), got -1$"
    ):
        evaluate_protocol(defense, EvalConfig(), tmp_path / "r", grey_root, seed=-1, progress=False)
    assert not (tmp_path / "r").exists()


def test_another_eval_seed_is_another_cell(grey, grey_root, tmp_path):
    """Before: EvalConfig.seed was not in the cell's key: seed 5 was served seed 0's cells."""
    defense = grey()
    config = {"radii_255": (20.0,), "iterative_radii_255": (20.0,), "steps": 2}
    first = evaluate_protocol(defense, EvalConfig(**config), tmp_path / "r", grey_root, progress=False)
    second = evaluate_protocol(
        defense, EvalConfig(**config, seed=5), tmp_path / "r", grey_root, progress=False
    )
    assert (
        len(first) == 24 and len(second) == 24 + 1
    )  # PGD again (its random start); the rest is the same cells
    params = set(load_records(tmp_path / "r").query("perturbation == 'pgd'")["params"])
    assert params == {'{"alpha_255":2.0,"steps":2}', '{"alpha_255":2.0,"seed":5,"steps":2}'}


# --- a defense that breaks during evaluation is one line ----------------------------------------


def only_two(net, x):
    if len(x) != 2:
        raise RuntimeError(f"expected a batch of 2, got {len(x)}")


def after_25(net, x):
    if net.calls > 25:  # the build check, the probe, clean, 20 noise cells, FGSM's 2 passes
        raise RuntimeError("out of patience")


def no_gradients(net, x):
    if x.requires_grad:  # the build check and the cells without attacks pass
        raise RuntimeError("no input gradients here")


@pytest.mark.slow
def test_a_forward_that_fails_in_the_sanity_checks_is_one_line_naming_the_stage(grey, grey_root, tmp_path):
    """A defense of the user's that breaks in the check stage (a worker, through the
    pipeline): one line naming it, its data set, the stage and its error; not a traceback."""
    with pytest.raises(UserError) as err:
        evaluate_defense(
            grey(fail=no_gradients),
            tmp_path / "r",
            grey_root,
            progress=False,
            suite="smoke",
            stages=("check",),
            n_test=20,
            device="cpu",
        )
    said = str(err.value)
    assert "\n" not in said and all(
        p in said
        for p in (
            "defense grey on cifar10",
            "its sanity checks",
            "no input gradients here",
            "fix its forward",
        )
    ), said


def test_a_forward_that_fails_on_the_evaluations_batches_is_one_line_before_any_cell(
    grey, grey_root, tmp_path
):
    defense = grey(fail=only_two)  # the build check's batch of 2 passes
    with pytest.raises(UserError) as err:
        evaluate_protocol(defense, EvalConfig(batch_size=64), tmp_path / "r", grey_root, progress=False)
    said = str(err.value)
    assert all(
        p in said
        for p in ("defense grey", "64x3x32x32", "expected a batch of 2, got 64", "check its forward")
    )
    assert not (tmp_path / "r" / "records.sqlite").exists() or load_records(tmp_path / "r").empty


def test_a_forward_that_fails_after_some_calls_names_the_cell_and_keeps_the_finished_ones(
    grey, grey_root, tmp_path
):
    defense = grey(fail=after_25)
    with pytest.raises(UserError) as err:
        evaluate_protocol(
            defense, EvalConfig(radii_255=(1.0,), steps=4), tmp_path / "r", grey_root, progress=False
        )
    kept = len(load_records(tmp_path / "r"))
    said = str(err.value)
    assert all(
        p in said for p in ("defense grey", "ifgsm@1", "out of patience", f"{kept} cells", "fix its forward")
    )
    assert kept == 1 + 20 + 1  # clean, the noise cells, FGSM


class IntegerLogits(nn.Module):
    def forward(self, x):
        return torch.zeros(len(x), 10, dtype=torch.int64)


def test_integer_logits_are_refused_at_the_build_check(tmp_path):
    """Before: refused only after 21 cells, with a traceback."""
    torch.save({}, tmp_path / "none.pt")
    with pytest.raises(UserError) as err:
        module_defense("ints", IntegerLogits, tmp_path / "none.pt", **GREY)
    said = str(err.value)
    assert all(
        p in said for p in ("defense ints", "torch.int64", "expected finite floating-point (2, 10) logits")
    )


@pytest.mark.parametrize(
    ("call", "said"),
    [
        ("torch.set_grad_enabled(False)", "torch.set_grad_enabled(False)"),
        ("torch.set_default_dtype(torch.float64)", "torch.set_default_dtype(torch.float64)"),
    ],
)
def test_a_module_that_changes_torchs_global_state_at_import_is_refused(tmp_path, call, said):
    module = tmp_path / f"state_{abs(hash(call))}.py"
    module.write_text(f"import torch\n{call}\nNet = torch.nn.Linear\n")
    with pytest.raises(UserError) as err:
        factory_of(f"{module}:Net")
    message = str(err.value)
    assert all(
        p in message for p in (f"--defense {module}:Net", "torch's global state", said, "remove the call")
    )
    assert torch.is_grad_enabled() and torch.get_default_dtype() == torch.float32


def test_a_subnormal_std_is_named_not_blamed_on_the_weights(tmp_path):
    torch.save({}, tmp_path / "none.pt")
    with pytest.raises(
        UserError, match=r"^defense tiny: std must be finite numbers of at least 1.18e-38 \(float32's"
    ):
        module_defense("tiny", IntegerLogits, tmp_path / "none.pt", mean=(0, 0, 0), std=(1e-40, 1, 1))


# --- a defenses TOML: every odd value names the file, the table and the key -------------------------


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('[a]\ndefense = "n.py:Net"\nweights = 5\n', "[a]: weights must be a non-empty string, got 5"),
        (
            '[a]\ndefense = "n.py:Net"\nweights = "w.pt"\nmean = ['
            + "9" * 400
            + ", 1, 1]\nstd = [1, 1, 1]\n",
            "[a]: mean takes finite numbers, one per channel (e.g. 0.4914,0.4822,0.4465), got ["
            + "9" * 400
            + ", 1, 1]",
        ),
        (
            '["a\\nb"]\ndefense = "n.py:Net"\nweights = "w.pt"\n',
            "['a\\nb']: defense name 'a\\nb' must be 1-100 letters, digits or . _ @ + -",
        ),
        (
            '[a]\nstate-dict = ["resnet8", 5]\n',
            '[a]: state-dict takes an architecture and a path, e.g. ["resnet110", "mine.pt"]',
        ),
        ('[a]\nrobustbench = "X"\nmodel-dir = 3\n', "[a]: model-dir must be a non-empty string, got 3"),
    ],
)
def test_an_odd_toml_value_is_one_line_naming_file_table_and_key(tmp_path, text, said):
    path = tmp_path / "defenses.toml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_defenses(path)
    assert str(err.value).startswith(f"--defenses {path} {said}") and "\n" not in str(err.value)


def toml_value(value) -> str:
    """`value` written as TOML (strings as JSON's escapes, which TOML reads alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else str(value)


HOSTILE = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["n.py:Net", "w.pt", "resnet8", "cifar10", "Linf", "../../pwn"]),
    st.integers(-(2**80), 2**80),
    st.floats(),
    st.booleans(),
    st.lists(st.one_of(st.floats(), st.integers(-(10**400), 10**400), st.text(max_size=4)), max_size=4),
)
TABLES = st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.dictionaries(st.sampled_from(KEYS), HOSTILE, max_size=4),
    min_size=1,
    max_size=2,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(tables=TABLES)
@example(tables={"0": {"dataset": "n.py:Net", "defense": ""}})  # an unknown data set named no file
def test_any_defenses_toml_is_read_or_refused_in_one_line(tmp_path, tables):
    """Every key with hostile values (huge integers, NaN, newlines, lists of anything): specs
    with the types they claim, or one line naming the file."""
    path = tmp_path / "defenses.toml"
    path.write_text(
        "".join(
            f"[{json.dumps(name)}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
            for name, values in tables.items()
        )
    )
    try:
        specs = load_defenses(path)
    except UserError as err:
        assert str(err).startswith(f"--defenses {path}") and "\n" not in str(err), str(err)
        return
    for spec in specs:
        assert NAME.fullmatch(spec.name) and isinstance(spec.target, str) and isinstance(spec.weights, str)
        assert spec.mean is None or all(isinstance(m, float) and math.isfinite(m) for m in spec.mean)


def test_a_defenses_file_without_end_is_refused_before_reading(tmp_path):
    """Before: /dev/zero read until MemoryError, and a FIFO hung."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)
    for path, said in (
        (Path("/dev/zero"), "is not a regular file: give a TOML file"),
        (fifo, "is not a regular file: give a TOML file"),
        (big, "is 2,000,000 bytes, more than a list of defenses takes (1,048,576 at most)"),
    ):
        with pytest.raises(UserError) as err:
            load_defenses(path)
        assert str(err.value).startswith(f"--defenses {path} {said}")


# --- the terminal: one line, any encoding --------------------------------------------------------


@pytest.mark.slow
def test_an_error_line_holding_a_newline_stays_one_line(tmp_path, capsys):
    path = tmp_path / "defenses.toml"
    path.write_text('["a\\nb"]\ndefense = "n.py:Net"\nweights = "w.pt"\n')
    assert run_bench.main(["--defenses", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --defenses {path} ['a\\nb']: defense name")


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv", [["--help"], ["--list-models"], ["--stage", "summary", "--results-dir", "absent"]]
)
def test_a_terminal_that_cannot_write_lambda_gets_escapes_not_a_traceback(argv, tmp_path):
    """Before: --help, the dry run and the summary raised UnicodeEncodeError on 'λ'."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    run = subprocess.run(
        [sys.executable, str(REPO / "run_bench.py"), *argv], cwd=tmp_path, env=env, capture_output=True
    )
    assert b"UnicodeEncodeError" not in run.stderr and b"Traceback" not in run.stderr, run.stderr[-500:]
    out = run.stdout + run.stderr
    assert all(b < 128 for b in out) and (b"\\u03bb" in out or argv[0] != "--help")


# --- nothing outlives its driver -------------------------------------------------------------


WORKERS_DRIVER = """
import time
from bench.run.executors import Processes
pool = Processes(2, 0)
print(*(p.pid for p, _ in pool._workers), flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc (Linux)")
def test_local_workers_die_with_a_sigkilled_driver():
    """Before: killing the driver of --workers 2 left both workers alive, asleep on a pipe."""
    driver = subprocess.Popen(
        [sys.executable, "-c", WORKERS_DRIVER], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    workers = [int(pid) for pid in driver.stdout.readline().split()]
    assert len(workers) == 2 and set(workers) <= set(descendants(driver.pid))
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 30
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [
            p
            for p in workers
            if Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
        ]
    assert alive == []
