"""The adapters, where users import them: any model as a `Defense` the harness evaluates.

They live in bench.eval.adapters; this module keeps the documented import path.
"""

from bench.eval.adapters import (
    Defense,
    DefenseInfo,
    Ensemble,
    NormalizedModel,
    ensemble_defense,
    module_defense,
    robustbench_defense,
    state_dict_defense,
    zoo_defense,
)

__all__ = [
    "Defense",
    "DefenseInfo",
    "Ensemble",
    "NormalizedModel",
    "ensemble_defense",
    "module_defense",
    "robustbench_defense",
    "state_dict_defense",
    "zoo_defense",
]
