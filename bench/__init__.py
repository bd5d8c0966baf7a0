"""inres-bench harness: runs the paper's protocol over the model zoo and any adapter."""

from bench.attacks import autoattack  # noqa: F401  (registers AutoAttack and its cheap stand-in)
