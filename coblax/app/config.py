"""TOML configs validated into frozen dataclasses.

``parse_dataclass`` is the one validator: unknown keys, wrong types and bad values
raise :class:`ConfigError` naming the key (``budgets.mac``) and what is allowed.
Every key of an experiment config is documented in the README.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "load_toml",
    "parse_dataclass",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "DecomposeConfig",
    "BudgetConfig",
    "CoblaConfig",
    "FinetuneConfig",
    "RunConfig",
    "load_run_config",
]


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the allowed values."""


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _check(value: Any, tp, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} has the wrong type ({_type_name(tp)})")
    if origin is tuple:
        (elem, *_rest) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a scalar where a list is allowed means a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_check(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return parse_dataclass(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def parse_dataclass(cls, data: dict, where: str = ""):
    """Build frozen dataclass ``cls`` from ``data``; run its ``validate()`` if any."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; allowed keys{' in [' + where + ']' if where else ''}: "
            f"{', '.join(names)}"
        )
    kwargs = {k: _check(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or 'config'}: {err}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def _choice(value: str, allowed, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; valid values: {', '.join(allowed)}")


def _positive(value, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} = {value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset; ``dir`` overrides ``COBLAX_DATA`` for file datasets."""

    name: str = "digits"
    dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None

    def validate(self, where: str) -> None:
        _choice(self.name, ("digits", "mnist", "fashion_mnist", "cifar10"), f"{where}.name")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model by name plus its own options (passed to ``build_model``)."""

    name: str
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name if not self.options else f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Base-model training."""

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"

    def validate(self, where: str) -> None:
        _positive(self.epochs, f"{where}.epochs", allow_zero=True)
        _positive(self.batch_size, f"{where}.batch_size")
        _positive(self.learning_rate, f"{where}.learning_rate")
        _choice(self.optimizer, ("adam", "sgd", "momentum"), f"{where}.optimizer")


@dataclasses.dataclass(frozen=True)
class DecomposeConfig:
    """Which layers are decomposed and how convolutions are matricized."""

    schemes: tuple[str, ...] = ("tai",)
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def validate(self, where: str) -> None:
        if not self.schemes:
            raise ConfigError(f"{where}.schemes must name at least one scheme: tai, zhang")
        for s in self.schemes:
            _choice(s, ("tai", "zhang"), f"{where}.schemes")


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """Budget pairs (mac[i], param[i]) as fractions of the original cost."""

    mac: tuple[float, ...] = (0.5,)
    param: tuple[float, ...] = (0.5,)
    basis: str = "decomposed"
    min_rank: int = 1

    def validate(self, where: str) -> None:
        _choice(self.basis, ("decomposed", "network"), f"{where}.basis")
        for key, values in (("mac", self.mac), ("param", self.param)):
            for v in values:
                if not 0.0 < v <= 1.0:
                    raise ConfigError(f"{where}.{key} = {v!r} is outside (0, 1]")
        if len(self.mac) != len(self.param) and 1 not in (len(self.mac), len(self.param)):
            raise ConfigError(
                f"{where}.mac and {where}.param must have the same length (or one of them one value)"
            )
        _positive(self.min_rank, f"{where}.min_rank")

    def pairs(self) -> list[tuple[float, float]]:
        n = max(len(self.mac), len(self.param))
        mac = self.mac * n if len(self.mac) == 1 else self.mac
        param = self.param * n if len(self.param) == 1 else self.param
        return list(zip(mac, param))


@dataclasses.dataclass(frozen=True)
class CoblaConfig:
    """COBLA's relaxed solve and rounding."""

    objective_size: int = 1000
    validation_size: int = 500
    batch_size: int = 250
    max_iter: int = 100
    ftol: float = 1e-6
    roundings: int = 10
    warm_start: str = "uniform"
    saturation_rounds: int = 5
    solver: str = "structured"
    window: int | None = None
    data_parallel: bool = False

    def validate(self, where: str) -> None:
        for key in ("objective_size", "validation_size", "batch_size", "max_iter", "roundings"):
            _positive(getattr(self, key), f"{where}.{key}")
        _positive(self.ftol, f"{where}.ftol")
        _positive(self.saturation_rounds, f"{where}.saturation_rounds", allow_zero=True)
        _choice(self.solver, ("slsqp", "structured"), f"{where}.solver")
        if self.window is not None:
            _positive(self.window, f"{where}.window")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning of the factored network (all factors and other params trainable)."""

    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-4
    optimizer: str = "adam"

    def validate(self, where: str) -> None:
        TrainConfig.validate(self, where)  # same rules


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole ``coblax run`` experiment."""

    seed: int = 0
    methods: tuple[str, ...] = ("cobla", "uniform")
    models: tuple[ModelConfig, ...] = (ModelConfig("mlp"),)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    budgets: BudgetConfig = BudgetConfig()
    cobla: CoblaConfig = CoblaConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    method_options: dict = dataclasses.field(default_factory=dict)
    cache_dir: str | None = None
    name: str = ""

    def validate(self, where: str) -> None:
        if not self.methods:
            raise ConfigError("methods must list at least one method")
        if not self.models:
            raise ConfigError("models must list at least one model")


def _models_from(value, where: str) -> list[dict]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, dict):
            if "name" not in item:
                raise ConfigError(f"{where}[{i}] needs a name")
            rest = {k: v for k, v in item.items() if k != "name"}
            out.append({"name": item["name"], "options": rest})
        else:
            raise ConfigError(f"{where}[{i}]: expected a model name or table, got {item!r}")
    return out


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate an experiment config."""
    raw = load_toml(path)
    if "models" in raw:
        raw = dict(raw, models=_models_from(raw["models"], "models"))
    if "decompose" in raw and "scheme" in raw["decompose"]:  # singular spelling accepted
        dec = dict(raw["decompose"])
        if "schemes" in dec:
            raise ConfigError("decompose: give either scheme or schemes, not both")
        dec["schemes"] = dec.pop("scheme")
        raw = dict(raw, decompose=dec)
    cfg = parse_dataclass(RunConfig, raw)
    from coblax.nn.models import MODEL_NAMES
    from coblax.lowrank.registry import allocator_names

    valid_methods = allocator_names()
    for m in cfg.methods:
        if m not in valid_methods:
            raise ConfigError(f"methods: unknown method {m!r}; valid methods: {', '.join(valid_methods)}")
    for key in cfg.method_options:
        if key not in valid_methods:
            raise ConfigError(f"method_options.{key}: unknown method; valid methods: {', '.join(valid_methods)}")
    for i, mc in enumerate(cfg.models):
        if mc.name not in MODEL_NAMES:
            raise ConfigError(f"models[{i}].name = {mc.name!r} is not allowed; valid models: {', '.join(MODEL_NAMES)}")
    if cfg.cobla.warm_start not in ("constant",) and cfg.cobla.warm_start not in valid_methods:
        raise ConfigError(
            f"cobla.warm_start = {cfg.cobla.warm_start!r}; valid: constant, {', '.join(m for m in valid_methods if m != 'cobla')}"
        )
    return cfg
