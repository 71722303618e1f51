"""The white-box evaluation protocol (SPEC §6): every attack × every defense, per-example worst
case, early exit chosen on dev, obfuscation sanity checks, JSON / Markdown / PNG reports.

Imports everything below it (attacks, defenses, gradients, core, data splits); nothing imports it
except the CLI and the reproduction scripts.
"""

from .protocol import evaluate, evaluate_checkpoint
from .results import EvaluationResult, result_schema
from .suites import PRESETS, SUITES, AttackSpec, Suite, get_suite

__all__ = ["PRESETS", "SUITES", "AttackSpec", "EvaluationResult", "Suite", "evaluate", "evaluate_checkpoint", "get_suite", "result_schema"]
