"""inres-bench: the paper's protocol over the model zoo and any defense.

Everything a user needs comes from here, as `timm.create_model` does from timm:

    from bench import module_defense, evaluate_defense

- adapters: `module_defense`, `state_dict_defense`, `robustbench_defense`, `zoo_defense`,
  `ensemble_defense` (each returns a `Defense`: a module on [0, 1] images and its facts);
- evaluation: `evaluate_defense` (a suite's protocol, as the command line runs it),
  `evaluate_protocol` with an `EvalConfig` (a protocol of your own);
- registries: `create_model`, `list_models`, `register_model` (networks),
  `register_dataset`, `DatasetInfo`, `Release` (data sets), `register`, `Perturbation`,
  `Iterative` (attacks and noise);
- `UserError`: every mistake the harness names in one line.
"""

from bench.attacks import autoattack  # noqa: F401  (registers AutoAttack and its cheap stand-in)
from bench.attacks.perturbations import Iterative, Perturbation, register
from bench.data.datasets import DatasetInfo, Release, register_dataset
from bench.eval.adapters import (
    Defense,
    DefenseInfo,
    ensemble_defense,
    module_defense,
    robustbench_defense,
    state_dict_defense,
    zoo_defense,
)
from bench.eval.protocol import EvalConfig
from bench.run.api import evaluate_defense, evaluate_protocol
from models import UserError, create_model, list_models, register_model

__all__ = [
    "DatasetInfo",
    "Defense",
    "DefenseInfo",
    "EvalConfig",
    "Iterative",
    "Perturbation",
    "Release",
    "UserError",
    "create_model",
    "ensemble_defense",
    "evaluate_defense",
    "evaluate_protocol",
    "list_models",
    "module_defense",
    "register",
    "register_dataset",
    "register_model",
    "robustbench_defense",
    "state_dict_defense",
    "zoo_defense",
]
