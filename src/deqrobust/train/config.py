"""Training configs: TOML files validated into nested dataclasses, ``--set`` overrides, TOML output.

Sections: ``[model]``, ``[deq]`` (DEQ solver/gradient settings; MDEQ models only), ``[data]``,
``[optim]``, ``[pretrain]``, ``[jacobian]``, ``[attack]``, ``[eval]``, ``[run]``; top-level
``description``. Unknown sections or keys are a :class:`~deqrobust.errors.ConfigError` that lists
the valid ones. Float values may be written as fractions (``eps = "8/255"``). Shipped configs live
in ``deqrobust/train/configs/*.toml``. Imports only the standard library and :mod:`deqrobust.errors`.

Example:
    >>> config = load_config("digits-tiny-unroll")
    >>> config.model.name, config.deq.grad, config.run.nan_policy
    ('mdeq-tiny', 'phantom', 'stop')
    >>> config = apply_overrides(config, ["optim.lr=5e-4", "attack.eps=8/255"])
    >>> config.optim.lr, round(config.attack.eps * 255, 6)
    (0.0005, 8.0)
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError
from ..utils.numbers import parse_fraction
from .registry import TASKS  # filled by .tasks, which the package imports: the built-in objectives and the user's

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "AttackConfig",
    "DEQConfig",
    "DataConfig",
    "EvalConfig",
    "JacobianConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_toml",
    "list_configs",
    "load_config",
    "parse_fraction",
]


def _check_choice(section: str, key: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ConfigError(f"[{section}] {key} = {value!r} is invalid; valid: {', '.join(map(str, valid))}")


def _check_range(section: str, key: str, ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"[{section}] {key} must be {what}, got {value!r}")


@dataclass
class ModelConfig:
    """``build_model(name, num_classes, in_channels, dropout=, mean=, std=, final_norm=)``; unset options
    keep the model's defaults (MDEQ dropout: 0 for tiny/small, 0.3 for large/xl; ``final_norm``: on, MDEQs only)."""

    name: str = "mdeq-tiny"
    dropout: Optional[float] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    final_norm: Optional[bool] = None


@dataclass
class DEQConfig:
    """:class:`~deqrobust.core.DEQClassifier` solver and gradient settings (docs/method.md §2–3).

    The defaults are the paper's "8/7" Broyden setting with the phantom gradient of the authors'
    code (k = 5 damped steps, λ = 0.5, after one undamped step).
    """

    f_solver: str = "broyden"
    f_max_iter: int = 8
    f_tol: float = 1e-3
    f_stop_mode: str = "rel"
    f_return: str = "lowest"
    b_solver: str = "broyden"
    b_max_iter: int = 7
    b_tol: float = 1e-6
    grad: str = "phantom"
    phantom_steps: int = 5
    phantom_damping: float = 0.5
    phantom_undamped_first: bool = True
    on_divergence: str = "nan"

    def validate(self) -> None:
        _check_choice("deq", "grad", self.grad, ("exact", "phantom"))
        _check_range("deq", "f_max_iter", self.f_max_iter >= 1, ">= 1", self.f_max_iter)
        _check_range("deq", "b_max_iter", self.b_max_iter >= 1, ">= 1", self.b_max_iter)


@dataclass
class DataConfig:
    """Dataset and dev hold-out. ``train_subset`` keeps a fixed random subset of the training split
    (quick runs and tests); ``augment`` applies the dataset's default crop/flip."""

    dataset: str = "digits"
    root: Optional[str] = None
    download: bool = True
    dev_size: Optional[int] = None
    dev_seed: int = 0
    train_subset: Optional[int] = None
    augment: bool = True

    def validate(self) -> None:
        if self.train_subset is not None:
            _check_range("data", "train_subset", self.train_subset >= 2, ">= 2", self.train_subset)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule; the schedule is a function of the global iteration."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"
    min_lr: float = 0.0
    grad_clip: Optional[float] = None

    def validate(self) -> None:
        _check_choice("optim", "name", self.name, ("adam", "sgd"))
        _check_choice("optim", "schedule", self.schedule, ("cosine", "constant"))
        _check_range("optim", "lr", self.lr > 0, "> 0", self.lr)
        _check_range("optim", "betas", len(self.betas) == 2, "a list of two floats", self.betas)


@dataclass
class PretrainConfig:
    """Clean training of the weight-tied ``layers``-layer unroll for the first ``iterations``
    iterations (MDEQ's pretraining; DEQ models only). Counted inside the epoch budget."""

    iterations: int = 0
    layers: int = 8

    def validate(self) -> None:
        _check_range("pretrain", "iterations", self.iterations >= 0, ">= 0", self.iterations)
        _check_range("pretrain", "layers", self.layers >= 1, ">= 1", self.layers)


@dataclass
class JacobianConfig:
    """Jacobian regularisation: with probability ``prob`` per iteration add ``weight`` × the
    Hutchinson estimate of ``||J_f||_F² / D``; off from epoch ``stop_epoch`` (0-based, ``None``:
    never off). While it is active, each training solve uses ``f_max_iter ± f_thres_delta``."""

    weight: float = 0.0
    prob: float = 0.0
    stop_epoch: Optional[int] = None
    f_thres_delta: int = 0

    def validate(self) -> None:
        _check_range("jacobian", "prob", 0.0 <= self.prob <= 1.0, "in [0, 1]", self.prob)
        _check_range("jacobian", "weight", self.weight >= 0, ">= 0", self.weight)
        _check_range("jacobian", "f_thres_delta", self.f_thres_delta >= 0, ">= 0", self.f_thres_delta)


@dataclass
class AttackConfig:
    """The training objective and its inner attack (docs/method.md §11).

    ``pgd-at``: loss ``(1-w)·CE(x_adv) + w·CE(x)`` with ``w = clean_weight``; PGD from a uniform
    random start. ``trades``: ``CE(x) + β·KL(p(x) || p(x_adv))``, inner KL attack from
    ``x + trades_init_std·N(0, 1)``. ``random-states``: TRADES with every forward at a depth drawn
    uniformly from ``1..f_max_iter`` (:class:`~deqrobust.train.tasks.RandomStates`). ``alpha``
    defaults to ``eps / 4``.
    """

    objective: str = "pgd-at"
    norm: str = "Linf"
    eps: float = 8 / 255
    alpha: Optional[float] = None
    steps: int = 10
    random_start: bool = True
    clean_weight: float = 0.0
    trades_beta: float = 6.0
    trades_init_std: float = 0.001

    def validate(self) -> None:
        _check_choice("attack", "objective", self.objective, tuple(TASKS))
        _check_choice("attack", "norm", self.norm, ("Linf", "L2"))
        _check_range("attack", "eps", self.eps > 0, "> 0", self.eps)
        _check_range("attack", "steps", self.steps >= 1, ">= 1", self.steps)
        _check_range("attack", "clean_weight", 0.0 <= self.clean_weight <= 1.0, "in [0, 1]", self.clean_weight)

    @property
    def step_size(self) -> float:
        return self.eps / 4 if self.alpha is None else self.alpha


@dataclass
class EvalConfig:
    """Per-epoch model selection on the dev split: clean and PGD-``pgd_steps`` accuracy (attack
    ``eps`` / ``norm`` / step size of ``[attack]`` unless set here) on the first ``dev_examples``
    dev examples (``None``: all)."""

    dev_examples: Optional[int] = None
    pgd_steps: int = 10
    pgd_alpha: Optional[float] = None
    batch_size: Optional[int] = None
    seed: int = 0
    every_epochs: int = 1

    def validate(self) -> None:
        _check_range("eval", "pgd_steps", self.pgd_steps >= 1, ">= 1", self.pgd_steps)
        if self.dev_examples is not None:
            _check_range("eval", "dev_examples", self.dev_examples >= 1, ">= 1", self.dev_examples)
        _check_range("eval", "every_epochs", self.every_epochs >= 1, ">= 1", self.every_epochs)


@dataclass
class RunConfig:
    """Length, batch, seed, hardware and fault handling of a run.

    ``nan_policy`` for a non-finite loss: ``stop`` (error naming the iteration, last good checkpoint
    kept), ``skip`` (drop the batch, counted; at most ``nan_max_skips``), ``lower_lr`` (halve the
    learning rate and go back to the last good checkpoint, at most ``nan_max_retries`` times).
    ``amp``: ``auto`` = bf16 autocast on CUDA, float32 on CPU; ``off`` = float32 everywhere (the
    paper's DEQ configs: bf16 is coarser than the solver tolerance). ``checkpoint_every_iters``: also
    write the resumable ``last`` checkpoint every N iterations (0: only at epoch ends). ``threads``:
    torch intra-op threads while training (``None``: leave as is); small CPU models run fastest, and
    far more robustly on a busy machine, with 1 (OpenMP threads of tiny ops spin when preempted).
    """

    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    checkpoint_every_iters: int = 0
    nan_policy: str = "stop"
    nan_max_skips: int = 20
    nan_max_retries: int = 3
    threads: Optional[int] = None

    def validate(self) -> None:
        _check_range("run", "epochs", self.epochs >= 1, ">= 1", self.epochs)
        _check_range("run", "batch_size", self.batch_size >= 2, ">= 2", self.batch_size)
        _check_choice("run", "amp", self.amp, ("auto", "bf16", "off"))
        _check_choice("run", "nan_policy", self.nan_policy, ("stop", "skip", "lower_lr"))
        if self.threads is not None:
            _check_range("run", "threads", self.threads >= 1, ">= 1", self.threads)
        _check_range(
            "run", "checkpoint_every_iters", self.checkpoint_every_iters >= 0, ">= 0", self.checkpoint_every_iters
        )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"[run] device = {self.device!r} is invalid; valid: auto, cpu, cuda, cuda:N")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "deq": DEQConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "pretrain": PretrainConfig,
    "jacobian": JacobianConfig,
    "attack": AttackConfig,
    "eval": EvalConfig,
    "run": RunConfig,
}
TOP_LEVEL = ("description",)


@dataclass
class TrainConfig:
    """A whole training config. ``deq`` is ``None`` for non-DEQ models (ResNet, WRN)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    deq: Optional[DEQConfig] = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    jacobian: JacobianConfig = field(default_factory=JacobianConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    description: str = ""
    name: str = "custom"

    @property
    def is_deq(self) -> bool:
        from ..models import is_deq

        return is_deq(self.model.name)

    def validate(self) -> "TrainConfig":
        """Check cross-section consistency and every section; return ``self``."""
        if self.is_deq and self.deq is None:
            self.deq = DEQConfig()
        if not self.is_deq:
            if self.deq is not None:
                raise ConfigError(f"[deq] only applies to MDEQ models, not {self.model.name!r}; remove the section")
            if self.pretrain.iterations or self.jacobian.weight:
                raise ConfigError(f"[pretrain] and [jacobian] only apply to MDEQ models, not {self.model.name!r}")
        if self.attack.objective == "random-states":  # the method as released, or an error before any work
            if self.deq is None:
                raise ConfigError(f"attack.objective = 'random-states' draws a DEQ's depth; {self.model.name!r} is not a DEQ")
            if self.deq.grad == "exact" or self.deq.f_return != "lowest":
                raise ConfigError("attack.objective = 'random-states' needs deq.grad = 'phantom' (the unrolled gradient at "
                                  "the drawn state) and deq.f_return = 'lowest' (the lowest-residual iterate), got "
                                  f"grad={self.deq.grad!r}, f_return={self.deq.f_return!r}")
            if self.jacobian.f_thres_delta:
                raise ConfigError("attack.objective = 'random-states' draws every forward's depth; set "
                                  "jacobian.f_thres_delta = 0 (it would be ignored)")
        for name in SECTIONS:
            section = getattr(self, name)
            if section is not None and hasattr(section, "validate"):
                section.validate()
        return self


# ---------------------------------------------------------------------- value conversion
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, hint: Any, where: str, from_string: bool) -> Any:
    """Coerce ``value`` (a TOML value, or a string from ``--set``) to the type ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (from_string and isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return _convert(value, inner, where, from_string)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if from_string and isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if from_string and isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, int):
                return value
            if isinstance(value, str) and from_string:
                return int(value.strip())
            raise ValueError("expected an integer")
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return parse_fraction(value)
            raise ValueError("expected a number or a fraction string like '8/255'")
        if hint is str:
            if isinstance(value, str):
                return value
            raise ValueError("expected a string")
        if origin is list:
            if from_string and isinstance(value, str):
                value = tomllib.loads(f"v = {value}")["v"]
            if not isinstance(value, list):
                raise ValueError("expected a list")
            return [_convert(v, args[0], where, from_string) for v in value]
    except ValueError as exc:
        raise ConfigError(f"{where} = {value!r}: {exc}") from None
    raise ConfigError(f"{where}: unsupported field type {hint!r}")  # pragma: no cover


def _valid_keys(cls: type) -> str:
    return ", ".join(f.name for f in fields(cls))


def _section_from_dict(name: str, data: Any) -> Any:
    cls = SECTIONS[name]
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table, got {type(data).__name__}")
    hints = _hints(cls)
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in [{name}]; valid keys: {_valid_keys(cls)}")
    kwargs = {k: _convert(v, hints[k], f"{name}.{k}", from_string=False) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], name: str = "custom") -> TrainConfig:
    """Validate a nested dict (parsed TOML) into a :class:`TrainConfig`."""
    unknown = sorted(set(data) - set(SECTIONS) - set(TOP_LEVEL) - {"name"})
    if unknown:
        raise ConfigError(
            f"unknown section(s) or key(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}; "
            f"valid top-level keys: {', '.join(TOP_LEVEL)}"
        )
    kwargs: dict[str, Any] = {k: _section_from_dict(k, v) for k, v in data.items() if k in SECTIONS}
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError("description must be a string")
    config = TrainConfig(**kwargs, description=description, name=str(data.get("name", name)))
    return config.validate()


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as a nested JSON-friendly dict (``None`` sections/values kept as ``None``)."""
    return dataclasses.asdict(config)


CONFIG_DIR = "configs"


def list_configs() -> list[str]:
    """Names of the shipped configs.

    Example:
        >>> "digits-tiny-unroll" in list_configs() and "cifar10-large-unroll-8-7" in list_configs()
        True
    """
    folder = resources.files("deqrobust.train") / CONFIG_DIR
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_config(name_or_path: str | Path) -> TrainConfig:
    """Load a shipped config by name (see :func:`list_configs`) or a TOML file by path.

    Raises:
        ConfigError: unknown name, unreadable TOML, unknown section/key, or an invalid value.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.suffix == ".toml" or path.is_file() or "/" in text:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw, name = path.read_text(encoding="utf-8"), path.stem
    else:
        resource = resources.files("deqrobust.train") / CONFIG_DIR / f"{text}.toml"
        if not resource.is_file():
            raise ConfigError(f"unknown config {text!r}; shipped configs: {', '.join(list_configs())} (or give a path)")
        raw, name = resource.read_text(encoding="utf-8"), text
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {name_or_path}: invalid TOML: {exc}") from exc
    return config_from_dict(data, name=name)


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Return a copy of ``config`` with ``section.key=value`` overrides applied (type-converted)."""
    config = dataclasses.replace(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        dotted, value = item.split("=", 1)
        dotted = dotted.strip()
        if dotted in TOP_LEVEL:
            setattr(config, dotted, value)
            continue
        if "." not in dotted:
            raise ConfigError(
                f"--set key {dotted!r} needs a section, e.g. optim.lr; valid sections: {', '.join(SECTIONS)}"
            )
        section_name, key = dotted.split(".", 1)
        if section_name not in SECTIONS:
            raise ConfigError(f"--set: unknown section {section_name!r}; valid sections: {', '.join(SECTIONS)}")
        cls = SECTIONS[section_name]
        section = getattr(config, section_name)
        section = cls() if section is None else dataclasses.replace(section)
        hints = _hints(cls)
        if key not in hints:
            raise ConfigError(f"--set: unknown key {key!r} in [{section_name}]; valid keys: {_valid_keys(cls)}")
        setattr(section, key, _convert(value, hints[key], dotted, from_string=True))
        setattr(config, section_name, section)
    return config.validate()


# ---------------------------------------------------------------------- TOML output
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")  # pragma: no cover


def config_to_toml(config: TrainConfig) -> str:
    """The resolved config as TOML (``None`` values omitted); ``load_config`` reads it back equal.

    Example:
        >>> import tempfile, pathlib
        >>> config = load_config("digits-tiny-exact")
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "digits-tiny-exact.toml"
        >>> _ = path.write_text(config_to_toml(config))
        >>> load_config(path) == config
        True
    """
    lines = [f"description = {_toml_value(config.description)}", f"name = {_toml_value(config.name)}"]
    for name in SECTIONS:
        section = getattr(config, name)
        if section is None:
            continue
        lines.append(f"\n[{name}]")
        for f in fields(section):
            value = getattr(section, f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
