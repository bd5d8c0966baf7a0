"""robustbench's wheel installs a top-level `tests` package; ours must never be confused with it."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_this_file_is_ours_and_no_foreign_tests_package_is_loaded():
    assert Path(__file__).resolve().parent == REPO / "tests"
    loaded = sys.modules.get("tests")  # pytest's importlib mode may register ours as a namespace
    if loaded is not None:
        places = [loaded.__file__] if loaded.__file__ else list(loaded.__path__)
        assert all(Path(p).resolve().is_relative_to(REPO) for p in places), places


def test_models_and_bench_come_from_this_checkout():
    import bench
    import models

    for module in (models, bench):
        assert Path(module.__file__).resolve().is_relative_to(REPO)
