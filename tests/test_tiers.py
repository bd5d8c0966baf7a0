"""The two test tiers of tests/conftest.py: the fast tier's budget and its guard against
pipeline work (the slow tier is marked by hand)."""

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).resolve().parent / "conftest.py").read_text()


@pytest.fixture
def sandbox(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(
        "[pytest]\naddopts = -p no:cacheprovider -m 'not slow'\nmarkers = slow: the integration tier\n"
    )
    return pytester


def test_a_fast_test_over_its_budget_fails_and_a_slow_one_does_not(sandbox, monkeypatch):
    monkeypatch.setenv("INRES_TEST_BUDGET_S", "0.3")
    sandbox.makepyfile(
        test_budget="""
import time
import pytest

def test_quick():
    pass

def test_sleeps():
    time.sleep(0.6)

@pytest.mark.slow
def test_slow_sleeps():
    time.sleep(0.6)
"""
    )
    fast = sandbox.runpytest()
    fast.assert_outcomes(passed=1, failed=1, deselected=1)
    assert "test_sleeps: call took 0.6 s, over the fast tier's budget of 0.3 s" in fast.stdout.str()
    sandbox.runpytest("-m", "slow").assert_outcomes(passed=1, deselected=2)
    monkeypatch.delenv(
        "INRES_TEST_BUDGET_S"
    )  # before this test's own report, which the same budget would fail


def test_pipeline_work_in_the_fast_tier_fails(sandbox):
    sandbox.makepyfile(
        test_guard="""
from types import SimpleNamespace
from bench.run import executors

def test_works():
    list(executors.execute(SimpleNamespace(task=SimpleNamespace(kind="train"))))
"""
    )
    result = sandbox.runpytest()
    result.assert_outcomes(failed=1)
    assert "runs the pipeline's work (train) in the fast tier" in result.stdout.str()
