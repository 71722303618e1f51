"""Defenses built from the intermediate states (paper Sec. 5.2; docs/method.md §8).

* ``final`` — ``h(z_out)``, the model's own output.
* ``early:<n>`` — ``h(z_n)``: the solver runs n steps only.
* ``ensemble`` — ``h(mean(z_1..z_N, z_out))`` (the authors' set) or ``ensemble:trajectory`` —
  ``h(mean(z_1..z_N))``; a running sum, O(1) memory in N.
* ``entropy[(options)][:final|:early:<n>]`` — input entropy reduction (the follow-up's test-time
  defense, :mod:`~deqrobust.defenses.entropy`): the input is purified while the solver runs; read at
  the last but one state by default.

Imports :mod:`deqrobust.core`, :mod:`deqrobust.solvers`, :mod:`deqrobust.utils` and the input checks of
:mod:`deqrobust.validate` only.
"""

from .defense import (Defense, DefendedForward, defended_forward, defended_logits, defended_logits_many, purify_input,
                      valid_defenses)
from .entropy import EntropyReduction, prediction_entropy

__all__ = ["Defense", "DefendedForward", "EntropyReduction", "defended_forward", "defended_logits",
           "defended_logits_many", "prediction_entropy", "purify_input", "valid_defenses"]
