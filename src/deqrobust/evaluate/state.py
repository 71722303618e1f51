"""The resumable state of an evaluation: one entry per finished unit of work (an attack with one
gradient source on one packed batch of the examples it attacks), saved atomically after each unit.
A killed evaluation restarts where it stopped and, since every unit is seeded by its key, ends with
the same numbers."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from ..utils.io import atomic_write_json

STATE_VERSION = 3  # 2: units are packed batches of the examples still to attack; 3: meta (the cost estimate)


@dataclass
class UnitResult:
    """Examples (global indices) an attack broke, with gradient diagnostics and wall time."""

    broken: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    attacked: int = 0
    grad_computed: int = 0
    grad_zero: int = 0
    grad_nonfinite: int = 0
    seconds: float = 0.0

    def merge(self, other: "UnitResult") -> None:
        self.broken += other.broken
        self.nonfinite += other.nonfinite
        self.attacked += other.attacked
        self.grad_computed += other.grad_computed
        self.grad_zero += other.grad_zero
        self.grad_nonfinite += other.grad_nonfinite
        self.seconds += other.seconds


def valid_unit(unit: Any) -> bool:
    """A saved unit has exactly the fields of a :class:`UnitResult`: lists of example indices and
    non-negative numbers."""
    template = asdict(UnitResult())
    if not isinstance(unit, dict) or set(unit) != set(template):
        return False
    for name, value in unit.items():
        if isinstance(template[name], list):
            if not (isinstance(value, list) and all(isinstance(i, int) and i >= 0 for i in value)):
                return False
        elif not (isinstance(value, (int, float)) and value >= 0):
            return False
    return True


def model_identity(model_info: dict[str, Any]) -> dict[str, Any]:
    """What names the model in an evaluation state's fingerprint: its description and, for a checkpoint,
    the hash of its weights, not the path it was read from (a moved run directory, or one named by a
    relative path instead of an absolute one, resumes).

    Example:
        >>> model_identity({"class": "DEQClassifier", "checkpoint": "runs/a/best.safetensors", "tensor_sha256": "ab12"})
        {'class': 'DEQClassifier', 'tensor_sha256': 'ab12'}
    """
    if not model_info.get("tensor_sha256"):
        return dict(model_info)
    return {key: value for key, value in model_info.items() if key != "checkpoint"}


def comparable(fingerprint: Any) -> Any:
    """A fingerprint as it is compared and saved: its model named by :func:`model_identity`."""
    if isinstance(fingerprint, dict) and isinstance(fingerprint.get("model"), dict):
        return dict(fingerprint, model=model_identity(fingerprint["model"]))
    return fingerprint


class EvalState:
    """A key -> result store backed by a JSON file (or memory only when ``path`` is None).

    ``fingerprint`` describes the evaluation (model, data, seed, suite...); a state file written
    for a different fingerprint is refused rather than silently mixed in.
    """

    def __init__(self, path: Optional[Path], fingerprint: dict[str, Any], started: Optional[float] = None) -> None:
        self.path = Path(path) if path is not None else None
        self.fingerprint = comparable(json.loads(json.dumps(fingerprint, sort_keys=True, default=str)))
        self.units: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.resumed = 0
        self.restored: frozenset[str] = frozenset()  # the units an earlier process computed
        self.started = time.perf_counter() if started is None else started  # this process's start (perf_counter)
        self.earlier_wall_s = 0.0  # the wall seconds of the processes before this one, up to the last unit each saved
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"evaluation state {self.path} is not valid JSON ({exc}); delete it to start over") from None
            if not isinstance(data, dict) or not isinstance(data.get("units", {}), dict):
                raise ConfigError(f"evaluation state {self.path} is not a deqrobust evaluation state (expected an "
                                  "object with 'version', 'fingerprint' and 'units'); delete it or use --fresh")
            old = comparable(data.get("fingerprint") or {})  # also states written when the path named the model
            if data.get("version") != STATE_VERSION or old != self.fingerprint:
                differs = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise ConfigError(
                    f"evaluation state {self.path} belongs to a different evaluation (differs in: "
                    f"{', '.join(differs) or 'version'}); use another --out directory or --fresh to start over"
                )
            self.units = data.get("units", {})
            self.meta = data.get("meta", {})
            if not isinstance(self.meta, dict):
                raise ConfigError(f"evaluation state {self.path}: 'meta' is not an object; delete the file or use --fresh")
            earlier = self.meta.get("wall_s", 0.0)
            if not isinstance(earlier, (int, float)) or isinstance(earlier, bool) or not 0 <= earlier < float("inf"):
                raise ConfigError(f"evaluation state {self.path}: meta 'wall_s' is {earlier!r}, not a number of seconds; "
                                  "delete the file or use --fresh")
            self.earlier_wall_s = float(earlier)
            for key, unit in self.units.items():
                if not valid_unit(unit):
                    raise ConfigError(f"evaluation state {self.path}: unit {key!r} is malformed ({unit!r:.120}); "
                                      "delete the file or use --fresh to start over")
            self.resumed = len(self.units)
            self.restored = frozenset(self.units)
        elif self.path is not None:
            self.save()  # every process leaves its state file, even one whose shard had nothing to attack

    def get(self, key: str) -> Optional[Any]:
        return self.units.get(key)

    def restored_seconds(self, key: str) -> float:
        """The seconds earlier processes spent on run ``key``: the sum over its units read back from
        the file (its batches ``key/p<b>``, its shares of trajectories ``key/shared/p<b>``, or the
        unit ``key`` itself), so that a resumed evaluation reports the time its results cost.

        Example:
            >>> state = EvalState(None, {})
            >>> state.units = {"test/final/pgd10/p0": {"seconds": 2.0}, "test/final/pgd10/shared": {"seconds": 9.0}}
            >>> state.restored = frozenset(state.units)
            >>> state.restored_seconds("test/final/pgd10")  # the aggregate of shared parts is not counted again
            2.0
        """
        return sum(float(unit.get("seconds", 0.0)) for name, unit in self.units.items()
                   if name in self.restored and isinstance(unit, dict) and not name.endswith("/shared")
                   and (name == key or name.startswith(key + "/")))

    def put(self, key: str, value: Any) -> None:
        self.units[key] = value
        self.save()

    def set_meta(self, key: str, value: Any) -> None:
        """Keep a fact about the run itself (e.g. its predicted cost) across a resume."""
        self.meta[key] = value
        self.save()

    def wall_s(self) -> float:
        """This evaluation's wall seconds so far: the earlier processes' (up to the last unit each saved:
        a killed process's time after it is lost with the unit) and this one's.

        Example:
            >>> state = EvalState(None, {})
            >>> state.earlier_wall_s = 100.0
            >>> 100.0 <= state.wall_s() < 101.0
            True
        """
        return self.earlier_wall_s + time.perf_counter() - self.started

    def save(self) -> None:
        if self.path is not None:
            self.meta["wall_s"] = self.wall_s()
            atomic_write_json(self.path, {"version": STATE_VERSION, "fingerprint": self.fingerprint,
                                          "units": self.units, "meta": self.meta})
