"""Defenses named on the command line or in a defenses.toml: what to build, checked, and
how to build it again in any worker.

A `DefenseSpec` is plain data (picklable, paths absolute), so that a worker process or a
Ray node rebuilds the defense itself; the driver builds each one once first, so that a
module that does not import, a factory that raises, weights that do not fit or a mean of
the wrong length is one error line before any work. Three sources, one per adapter:

- `module`: `--defense pkg.mod:Factory` (or `path/to/file.py:Factory`) with `--weights`,
  optional `--mean/--std` (none: the network takes [0, 1] inputs);
- `state-dict`: `--state-dict ARCH PATH`, a registered architecture with the user's weights;
- `robustbench`: `--robustbench NAME` (`--model-dir`, `--threat-model`), fetched with
  RobustBench's own loader when its checkpoint is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import os
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch
from torch import nn

from bench.core.numbers import decimal
from bench.data.datasets import dataset_info
from bench.eval.adapters import Defense, module_defense, robustbench_defense, state_dict_defense
from bench.eval.identity import check_name
from models import UserError

MODULE, STATE_DICT, ROBUSTBENCH = "module", "state-dict", "robustbench"
BUILT = "built"  # handed over built, through the Python API (DefenseSpec.of)
# a defenses.toml table's keys: the command line's options, without their dashes
DEFENSES_FILE_LIMIT = 1 << 20  # bytes: a defenses.toml is a few lines per defense
KEYS = (
    "defense",
    "weights",
    "mean",
    "std",
    "dataset",
    "state-dict",
    "robustbench",
    "model-dir",
    "threat-model",
)


@dataclass(frozen=True)
class DefenseSpec:
    """One defense as the user named it; `build()` makes it (see the module docstring)."""

    source: str  # MODULE, STATE_DICT or ROBUSTBENCH
    name: str
    dataset: str = "cifar10"
    target: str = ""  # MODULE: "module:factory" or "file.py:factory"; STATE_DICT: the architecture; ROBUSTBENCH: its name
    weights: str = ""  # MODULE, STATE_DICT: the state_dict file
    # MODULE: the network's input normalisation; STATE_DICT: overrides the data set's
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # ROBUSTBENCH: RobustBench's layout <model_dir>/<dataset>/<threat_model>/<name>.pt
    model_dir: str = "models"
    threat_model: str = "Linf"
    fetch: bool = field(default=True, compare=False)  # ROBUSTBENCH: download a missing checkpoint
    built: Defense | None = field(default=None, compare=False, repr=False)  # BUILT: the defense itself

    @classmethod
    def of(cls, defense: Defense) -> DefenseSpec:
        """A defense handed over built (the Python API), as the one type a run plans with."""
        return cls(BUILT, defense.info.name, defense.info.dataset, built=defense)

    def build(self) -> Defense:
        if self.built is not None:
            return self.built
        if self.source == MODULE:
            return module_defense(
                self.name,
                factory_of(self.target),
                self.weights,
                mean=self.mean,
                std=self.std,
                dataset=self.dataset,
            )
        if self.source == STATE_DICT:
            norm = {} if self.mean is None else {"mean": self.mean, "std": self.std}
            return state_dict_defense(self.target, self.weights, self.dataset, name=self.name, **norm)
        defense = robustbench_defense(
            self.target, self.dataset, self.threat_model, self.model_dir, fetch=self.fetch
        )
        return Defense(defense.model, replace(defense.info, name=self.name))


def factory_of(target: str) -> Callable[[], nn.Module]:
    """The factory `module:attr` (a module path, or a .py file path) names; one error line
    for a module that does not import (its error's last line) or a missing attribute."""
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise UserError(
            f"--defense {target!r} is not module:factory (e.g. my_pkg.nets:SmallCNN or nets.py:SmallCNN)"
        )
    module = _import(module_name, target)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        offered = sorted(
            n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
        )
        raise UserError(
            f"--defense {target}: {module_name} has no factory {attr!r}; its modules: {', '.join(offered) or '-'}"
        )

    def checked() -> nn.Module:
        with users_code(f"--defense {target}: {attr}()"):
            return factory()  # bench.eval.adapters.module_defense checks that it is a network

    # the build the records name: a file as the module it is (nets.py: nets), wherever it lies
    checked.__module__ = Path(module_name).stem if module_name.endswith(".py") else module.__name__
    checked.__qualname__ = attr
    vars(checked)["__wrapped__"] = factory  # its source file is part of the build (adapters.code_digest)
    return checked


class _Exited(BaseException):  # not an Exception: no handler of the user's or ours swallows it
    """os._exit called by a user's code while the harness runs it (see `users_code`)."""

    def __init__(self, code: object):
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def users_code(what: str) -> Iterator[None]:
    """The boundary around a user's code (importing a defense's module, calling its factory):
    whatever way it leaves, an exception, sys.exit, KeyboardInterrupt or os._exit, is one
    error line naming `what`, never the harness's own exit (a sys.exit(0) there would end
    the run as a success having measured nothing). os._exit ends a process without
    unwinding, so it is replaced while the code runs; exit() called from C is not caught."""
    real_exit = os._exit
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()

    def refused(status: int) -> NoReturn:
        raise _Exited(status)

    os._exit = refused
    try:
        yield
    except UserError:
        raise
    except _Exited as err:
        raise UserError(
            f"{what} called os._exit({err.code!r}): a defense must not end the process; remove the call"
        ) from None
    except SystemExit as err:
        raise UserError(
            f"{what} called sys.exit({err.code!r}): a defense must not end the run; remove the call"
        ) from None
    except KeyboardInterrupt:
        raise UserError(f"{what} raised KeyboardInterrupt: a defense must not interrupt the run") from None
    except Exception as err:  # its code's error is the user's
        raise UserError(f"{what} raised {_last_line(err)}") from None
    finally:
        os._exit = real_exit
    changed = [f"torch.set_grad_enabled({not grad})"] if torch.is_grad_enabled() != grad else []
    changed += (
        [f"torch.set_default_dtype({torch.get_default_dtype()})"]
        if torch.get_default_dtype() != dtype
        else []
    )
    if changed:  # attacks need autograd, and every tensor the harness makes would change type
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        raise UserError(
            f"{what} changed torch's global state ({', '.join(changed)}): a defense must leave it as it "
            "found it; remove the call (or make it inside its forward, undone before it returns)"
        )


def _import(module_name: str, target: str) -> ModuleType:
    with users_code(f"--defense {target}: importing {module_name}"):
        return _imported(module_name, target)


def _imported(module_name: str, target: str) -> ModuleType:
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise UserError(f"--defense {target}: {path} is not a file")
            name = "inres_defense_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise UserError(f"--defense {target}: {path} cannot be imported as a module")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            return sys.modules[name]
        if os.getcwd() not in sys.path:  # as `python -m` does: the user's own package, from where they are
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as err:  # an import runs the user's code: any error is theirs
        raise UserError(f"--defense {target}: cannot import {module_name}: {_last_line(err)}") from None


def _last_line(err: BaseException) -> str:
    if isinstance(err, SyntaxError):
        return f"SyntaxError: {err.msg} ({err.filename}, line {err.lineno})"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1]}" if text else type(err).__name__


# --- from the command line and from defenses.toml ---------------------------------------------


def spec_from(values: dict, where: str, base: Path) -> DefenseSpec:
    """A spec from one defense's options (KEYS, plus `name`); `where` names them in errors,
    `base` is the folder relative paths start from."""
    unknown = sorted(set(values) - {*KEYS, "name"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(KEYS)}")
    sources = [k for k in ("defense", "state-dict", "robustbench") if values.get(k) is not None]
    if len(sources) != 1:
        raise UserError(
            f"{where}: name the defense with exactly one of defense, state-dict, robustbench "
            f"(got {', '.join(sources) or 'none'})"
        )
    source = sources[0]
    if values.get("name") is not None:  # given, it is checked as given: an empty --name is no name
        check_name(values["name"], where) if isinstance(values["name"], str) else _text(
            values["name"], "name", where
        )
    dataset = _text(values.get("dataset", "cifar10"), "dataset", where)
    try:
        dataset_info(dataset)
    except UserError as err:  # the line names the file and table (or the option) it came from
        raise UserError(f"{where}: {err}") from None
    allowed = {
        "defense": {"weights", "mean", "std"},
        "state-dict": {"mean", "std"},
        "robustbench": {"model-dir", "threat-model"},
    }
    stray = sorted(
        k
        for k in values
        if k in KEYS and k not in {source, "dataset", *allowed[source]} and values[k] is not None
    )
    if stray:
        raise UserError(f"{where}: {stray[0]} does not apply to a {source} defense")
    mean, std = (_numbers(values.get(k), k, where) for k in ("mean", "std"))
    if source == "defense":
        if values.get("weights") is None:
            raise UserError(f"{where}: a defense needs its weights (--weights PATH, a state_dict file)")
        target, weights = (
            _text(values["defense"], "defense", where),
            _path(values["weights"], base, "weights", where),
        )
        module, _, attr = target.rpartition(":")
        target = f"{_path(module, base, 'defense', where) if module.endswith('.py') else module}:{attr}"
        name = values.get("name") or Path(weights).stem
        spec = DefenseSpec(MODULE, name, dataset, target, weights, mean, std)
    elif source == "state-dict":
        pair = values["state-dict"]
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise UserError(
                f'{where}: state-dict takes an architecture and a path, e.g. ["resnet110", "mine.pt"]'
            )
        weights = _path(pair[1], base, "state-dict", where)
        spec = DefenseSpec(
            STATE_DICT, values.get("name") or Path(weights).stem, dataset, pair[0], weights, mean, std
        )
    else:
        name = _text(values["robustbench"], "robustbench", where)
        spec = DefenseSpec(
            ROBUSTBENCH,
            values.get("name") or name,
            dataset,
            name,
            model_dir=_path(values.get("model-dir", "models"), base, "model-dir", where),
            threat_model=_text(values.get("threat-model", "Linf"), "threat-model", where),
        )
    if (mean is None) != (std is None):
        raise UserError(f"{where}: give --mean and --std together (one number per channel), or neither")
    check_name(_text(spec.name, "name", where), where)
    return spec


def load_defenses(path: str | os.PathLike) -> tuple[DefenseSpec, ...]:
    """The defenses of a TOML file: one table per defense, named by the table, with the
    command line's keys (relative paths from the file's folder)."""
    path = Path(path)
    try:
        if not path.is_file():  # a FIFO would wait for a writer, /dev/zero never ends
            raise UserError(f"--defenses {path} is not a regular file: give a TOML file")
        if path.stat().st_size > DEFENSES_FILE_LIMIT:
            raise UserError(
                f"--defenses {path} is {path.stat().st_size:,} bytes, more than a list of defenses "
                f"takes ({DEFENSES_FILE_LIMIT:,} at most): give a TOML file of [name] tables"
            )
        with open(path, "rb") as file:
            tables = tomllib.loads(file.read(DEFENSES_FILE_LIMIT + 1).decode())
    except OSError as err:
        raise UserError(f"--defenses {path}: cannot read it ({err.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--defenses {path} is not valid TOML: {err}") from None
    if not tables:
        raise UserError(f"--defenses {path} names no defense: give one [name] table per defense")
    specs = []
    for name, values in tables.items():
        where = f"--defenses {path} [{name}]" if name.isprintable() else f"--defenses {path} [{name!r}]"
        if not isinstance(values, dict):
            raise UserError(f'{where} must be a table of options (e.g. defense = "nets.py:SmallCNN")')
        if "name" in values:
            raise UserError(
                f"{where}: unknown key 'name' (the table's name is the defense's); the keys are {', '.join(KEYS)}"
            )
        specs.append(spec_from({**values, "name": name}, where, path.resolve().parent))
    return tuple(specs)


def _text(value: object, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value.strip()


def _path(value: object, base: Path, key: str, where: str) -> str:
    return str((base / Path(os.path.expanduser(_text(value, key, where)))).resolve())


def _numbers(value: Any, key: str, where: str) -> tuple[float, ...] | None:
    """--mean 0.49,0.48,0.45 or mean = [0.49, 0.48, 0.45]."""
    if value is None:
        return None
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        numbers = tuple(
            decimal(v) if isinstance(v, str) else float(v) for v in items if not isinstance(v, bool)
        )
        if len(numbers) != len(items) or not numbers or not all(math.isfinite(v) for v in numbers):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise UserError(
            f"{where}: {key} takes finite numbers, one per channel (e.g. 0.4914,0.4822,0.4465), got {value!r}"
        ) from None
    return numbers
