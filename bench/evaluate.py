"""The evaluation API, where users import it: `EvalConfig`, `evaluate_defense` (a suite's
protocol) and `evaluate_protocol` (a protocol of your own).

The engine lives in bench.eval.engine, the call that runs it as the command line would in
bench.run.api; this module keeps the documented import path.
"""

from bench.attacks.perturbations import DEFAULT_STEPS
from bench.eval.engine import evaluate
from bench.eval.protocol import EvalConfig
from bench.run.api import evaluate_defense, evaluate_protocol

__all__ = ["DEFAULT_STEPS", "EvalConfig", "evaluate", "evaluate_defense", "evaluate_protocol"]
