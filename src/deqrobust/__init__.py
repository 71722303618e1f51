"""deqrobust: adversarially robust deep equilibrium models, evaluated fully white-box.

Layout (dependencies point one way): ``solvers`` <- ``core`` <- ``gradients`` (intermediate-state
estimators) <- ``defenses`` / ``attacks`` <- ``evaluate`` / ``train`` <- ``cli``; ``models``,
``nn`` and ``data`` are leaves used by the upper layers.
"""

__version__ = "0.1.0"

from .attackable import attackable  # noqa: E402
from .core import DEQClassifier  # noqa: E402

__all__ = ["DEQClassifier", "__version__", "attackable"]
