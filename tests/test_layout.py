"""The layout as docs/ARCHITECTURE.md draws it: short modules, no import cycles, one name per
concept. The layers themselves are import-linter's contracts (pyproject.toml), which
`.ci/run` checks with `lint-imports`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# as `ruff format` lays the code out (one argument a line where a call does not fit 110 columns);
# a module is one kind of output or one stage (bench/reports/writer.py: REPORT.md and the writing)
MAX_LINES = 600
SOURCES = sorted([*ROOT.glob("bench/**/*.py"), *ROOT.glob("models/*.py"), ROOT / "run_bench.py"])


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """The project modules `path` imports, at any depth of the file: lazy imports and
    imports for type hints alone count, since they couple modules as much."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module.split(".")[0] in ("bench", "models")
        ):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from bench.eval import engine`
        elif isinstance(node, ast.ImportFrom) and node.level:  # models' own relative imports
            package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
            found.add(f"{package}.{node.module}" if node.module else package)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SOURCES}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, once, as found by a depth-first search."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_is_longer_than_max_lines():
    long = {module_name(p): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules (at most {MAX_LINES} lines each): {long}"


def test_there_are_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():  # the test above could not fail without it
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_models_never_import_the_harness():
    assert {
        m: sorted(d for d in deps if d.startswith("bench"))
        for m, deps in graph().items()
        if m.startswith("models") and any(d.startswith("bench") for d in deps)
    } == {}


def test_one_name_per_concept():
    """No two classes of the project share a name (there was a second NoiseGroup), and
    `spec` names no variable of a suite, data set, perturbation or table slot."""
    owners: dict[str, list[str]] = {}
    for path in SOURCES:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                owners.setdefault(node.name, []).append(module_name(path))
    assert {name: where for name, where in owners.items() if len(where) > 1} == {}
    loose = [
        f"{module_name(p)}:{n.lineno}"
        for p in SOURCES
        if p.name != "defenses.py"
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Name) and n.id == "spec"
    ]
    assert loose == []


def test_each_sub_package_says_what_it_holds():
    for init in sorted(ROOT.glob("bench/*/__init__.py")):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init.relative_to(ROOT)} has no docstring"


def test_users_import_everything_from_one_path():
    """The README's and the docs' examples import from `bench` alone: each name there is the
    object its module defines, and no other module re-exports it (no shims)."""
    import bench
    import models
    from bench.attacks import perturbations
    from bench.data import datasets
    from bench.eval import adapters, protocol
    from bench.run import api

    for name in bench.__all__:
        owner = {
            **vars(adapters),
            **vars(api),
            **vars(protocol),
            **vars(perturbations),
            **vars(datasets),
            **vars(models),
        }
        assert getattr(bench, name) is owner[name], name
    assert not [p.name for p in (ROOT / "bench").glob("*.py") if p.name != "__init__.py"]  # no shim modules
    inits = [
        p.parent.name
        for p in ROOT.glob("bench/*/__init__.py")
        if any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(ast.parse(p.read_text())))
    ]
    assert inits == []  # sub-packages say what they hold; they re-export nothing
    examples = [
        line
        for text in (ROOT / "README.md", *(ROOT / "docs").glob("*.md"))
        for line in text.read_text().splitlines()
        if line.startswith(("from bench", "import bench"))
    ]
    assert examples and all(re.match(r"from bench import \w", line) for line in examples), examples
