"""The README stays true: its defense example runs as printed, in at most 30 lines; its quick
start is two commands, and CI runs both test tiers it names."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_add_defense_example_runs_as_printed(tmp_path, readme_example):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 30
    (tmp_path / "small_cnn.py").write_text(readme_example("small-cnn"))
    script = tmp_path / "my_defense.py"
    script.write_text(code)
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
    )
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"small-cnn [0-9a-f]{12} \(8, 10\)\n", run.stdout)


def test_quick_start_is_two_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", text, re.S).group(1)
    assert block.splitlines() == [
        "pip install -e . && python run_bench.py",
        "pip install -e '.[dev,robustbench,cluster]' && python -m pytest",
    ]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert (
        "python -m pytest --durations=10" in ci and "python -m pytest -m slow --durations=10" in ci
    )  # both tiers
    assert "python -m pytest -m slow" in text  # the README names the integration tier
