"""The two test tiers of tests/conftest.py: what puts a test in the slow tier, the fast
tier's budget, and its guard against pipeline work."""

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).resolve().parent / "conftest.py").read_text()

SAMPLES = '''
import subprocess, sys
import run_bench
from bench.train.loop import train

COMMAND = [sys.executable, "run_bench.py", "--dry-run"]


def helper():
    return run_bench.main(["--list-models"])


def test_unit():
    assert 1 + 1 == 2


def test_cli_in_process():
    assert run_bench.main(["--list-models"]) == 0


def test_cli_through_a_helper():
    assert helper() == 0


def test_cli_in_a_process():
    subprocess.run([sys.executable, "run_bench.py", "--help"], capture_output=True)


def test_cli_from_a_module_list():
    subprocess.run(COMMAND, capture_output=True)


def test_trains():
    train


def test_mentions_the_cli_in_text():
    assert "python run_bench.py --help".startswith("python")
'''


@pytest.fixture
def sandbox(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -m 'not slow'\nmarkers = slow: the integration tier\n")
    return pytester


def collected(result) -> list[str]:
    return sorted(line.split("::")[1] for line in result.outlines if "::" in line)


def test_a_test_is_slow_by_what_it_calls(sandbox):
    sandbox.makepyfile(test_samples=SAMPLES)
    slow = collected(sandbox.runpytest("-m", "slow", "--collect-only", "-q"))
    assert slow == ["test_cli_from_a_module_list", "test_cli_in_a_process", "test_cli_in_process",
                    "test_cli_through_a_helper", "test_trains"]  # fmt: skip
    assert collected(sandbox.runpytest("--collect-only", "-q")) == ["test_mentions_the_cli_in_text", "test_unit"]


def test_a_fixture_that_runs_the_cli_makes_its_users_slow(sandbox):
    sandbox.makepyfile(test_fixtures='''
import pytest
import run_bench

@pytest.fixture
def results():
    return run_bench.main(["--list-models"])

@pytest.fixture
def copied(results):
    return results

def test_uses_it(copied):
    pass

def test_uses_the_pipeline(pipeline):
    pass

def test_alone():
    pass
''')
    assert collected(sandbox.runpytest("-m", "slow", "--collect-only", "-q")) == ["test_uses_it", "test_uses_the_pipeline"]


def test_a_fast_test_over_its_budget_fails_and_a_slow_one_does_not(sandbox, monkeypatch):
    monkeypatch.setenv("INRES_TEST_BUDGET_S", "0.3")
    sandbox.makepyfile(test_budget='''
import time
import run_bench

def test_quick():
    pass

def test_sleeps():
    time.sleep(0.6)

def test_slow_sleeps():
    run_bench
    time.sleep(0.6)
    run_bench.main
''')
    fast = sandbox.runpytest()
    fast.assert_outcomes(passed=1, failed=1, deselected=1)
    assert "test_sleeps: call took 0.6 s, over the fast tier's budget of 0.3 s" in fast.stdout.str()
    sandbox.runpytest("-m", "slow").assert_outcomes(passed=1, deselected=2)
    monkeypatch.delenv("INRES_TEST_BUDGET_S")  # before this test's own report, which the same budget would fail


def test_pipeline_work_in_the_fast_tier_fails(sandbox):
    sandbox.makepyfile(test_guard='''
from types import SimpleNamespace
from bench.run import executors

def test_works():
    list(executors.execute(SimpleNamespace(kind="train")))
''')
    result = sandbox.runpytest()
    result.assert_outcomes(failed=1)
    assert "runs the pipeline's work (train) in the fast tier" in result.stdout.str()
