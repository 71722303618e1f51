"""The white-box evaluation protocol: every defense against the attack candidates (chosen on the dev
split, or every source with ``exhaustive=True``), per-example worst case, early exit chosen on dev,
obfuscation sanity checks, a cost estimate, JSON / Markdown / PNG reports.

Imports everything below it (attacks, defenses, gradients, core, data splits); nothing imports it
except the CLI and the reproduction scripts.
"""

from .api import estimate, evaluate
from .checkpoint import evaluate_checkpoint, evaluate_own_model, parse_eps
from .cost import CostEstimate
from .options import EvaluationOptions, dev_size
from .results import EvaluationResult, result_schema
from .suites import PRESETS, SUITES, AttackSpec, Suite, get_suite

__all__ = ["PRESETS", "SUITES", "AttackSpec", "CostEstimate", "EvaluationOptions", "EvaluationResult", "Suite",
           "dev_size", "estimate", "evaluate", "evaluate_checkpoint", "evaluate_own_model", "get_suite", "parse_eps",
           "result_schema"]
