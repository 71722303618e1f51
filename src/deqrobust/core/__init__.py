"""The DEQ core: the classifier, state flattening, and the exact / phantom / Jacobian-regularisation
gradients used for training and by ready-made attacks. Imports only :mod:`deqrobust.solvers`."""

from .deq import DEQClassifier, DEQOutput, Solve
from .implicit import exact_output
from .jacobian import jacobian_frobenius_loss
from .phantom import phantom_output
from .state import StateSpec

__all__ = ["DEQClassifier", "DEQOutput", "Solve", "StateSpec", "exact_output", "jacobian_frobenius_loss", "phantom_output"]
