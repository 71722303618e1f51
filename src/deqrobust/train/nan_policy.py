"""What to do about a non-finite loss or gradient (``run.nan_policy``): an action, not an exception.

``skip`` drops the batch (up to ``run.nan_max_skips`` batches), ``lower_lr`` goes back to the last
checkpoint with half the learning rate (up to ``run.nan_max_retries`` times), ``stop`` ends the run.
A policy that has used up its allowance stops.
"""

from __future__ import annotations

from typing import Literal

from .config import RunConfig

__all__ = ["NanAction", "decide", "why_stopped"]

NanAction = Literal["skip", "rollback", "stop"]


def decide(run: RunConfig, skipped_total: int, lr_retries: int) -> NanAction:
    """The action for one more non-finite batch, given the skips and retries already spent.

    Example:
        >>> from deqrobust.train.config import RunConfig
        >>> decide(RunConfig(nan_policy="skip", nan_max_skips=2), 1, 0), decide(RunConfig(nan_policy="skip", nan_max_skips=2), 2, 0)
        ('skip', 'stop')
        >>> decide(RunConfig(nan_policy="lower_lr", nan_max_retries=1), 0, 0), decide(RunConfig(nan_policy="stop"), 0, 0)
        ('rollback', 'stop')
    """
    if run.nan_policy == "skip" and skipped_total < run.nan_max_skips:
        return "skip"
    if run.nan_policy == "lower_lr" and lr_retries < run.nan_max_retries:
        return "rollback"
    return "stop"


def why_stopped(run: RunConfig) -> str:
    """The hint printed when a run stops on a non-finite value under ``run.nan_policy``."""
    return {
        "stop": 'lower optim.lr, add Jacobian regularisation, or set run.nan_policy = "skip" / "lower_lr"',
        "skip": f"more than run.nan_max_skips = {run.nan_max_skips} batches were skipped",
        "lower_lr": f"the learning rate was already halved run.nan_max_retries = {run.nan_max_retries} times",
    }[run.nan_policy]
