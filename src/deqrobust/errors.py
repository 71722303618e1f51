"""Exceptions (and warnings) with messages that name the problem. Everything here subclasses a builtin."""


class DEQInputError(ValueError):
    """An input tensor has the wrong shape, dtype, or non-finite values."""


class ConfigError(ValueError):
    """An unknown or invalid configuration key or value."""


class DivergenceError(RuntimeError):
    """The forward solver diverged (non-finite or exploding residual) on some samples."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, untrusted (pickled code), or for another architecture."""


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupted (checksum mismatch), or in an unexpected format."""


class NotADEQWarning(UserWarning):
    """A model evaluated as a DEQ is not one the library can reach: it is attacked with its own
    gradient only (see :meth:`deqrobust.evaluate.target.AttackTarget.downgrade`)."""
