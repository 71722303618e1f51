"""Paper reproduction (``deqrobust reproduce``): the trainings and evaluations behind the paper's
Tables 1–4 and Figure 2, with our numbers beside the paper's (shipped in ``paper_results.json``).
At ``--scale tiny`` the same pipeline runs on the offline default dataset. Imports train and evaluate."""

from .experiments import EXPERIMENTS, SCALES, TARGETS, experiment
from .runner import ReproduceResult, reproduce
from .tables import paper_results

__all__ = ["EXPERIMENTS", "SCALES", "TARGETS", "ReproduceResult", "experiment", "paper_results", "reproduce"]
