"""Attacks: one per file on a thin base (:class:`Attack`, override ``get_logits``).

* :class:`PGD` — ours: random start, restarts, per-example early stop, optional gradient override.
* :class:`APGD`, :class:`APGDT`, :class:`FABT`, :class:`Square` — AutoAttack's algorithms from
  ``pyautoattack`` (the reference code), wrapped to our interface.
* The paper's named settings (PGD-10, PGD-1000, AutoAttack standard / plus) are
  ``deqrobust.evaluate.suites.PRESETS``.

Every attack returns points projected onto the ε-ball ∩ [0, 1]. Attacks take any callable model;
for a DEQ pass an :func:`deqrobust.attackable.attackable` module. Imports torch and pyautoattack only.
"""

from .apgd import APGD
from .apgd_t import APGDT
from .base import Attack, ThreatModel, project
from .fab_t import FABT
from .pgd import PGD
from .shared_pgd import SharedPGD
from .square import Square

__all__ = ["APGD", "APGDT", "Attack", "FABT", "PGD", "SharedPGD", "Square", "ThreatModel", "project"]
