"""TOML configs validated into frozen dataclasses.

``parse_dataclass`` is the one validator. Each dataclass declares every key in one
place, its field: the type annotation says what type a value must have and
:func:`setting` what range or choices it must respect, e.g.

    tol: float = setting(1e-4, gt=0, le=0.1)
    optimizer: str = setting("adam", choices=("adam", "sgd", "momentum"))

Unknown keys, wrong types, non-finite numbers (NaN, inf), integers beyond
``INT_MAX`` and values outside their range or choices are all collected and
reported together by one :class:`ConfigError`, each problem naming its key
(``budgets.mac``) and what is allowed. A ``validate(where)`` method, if any, adds
the checks that relate several keys. Every key of an experiment config is
documented in the README.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from coblax.util.errors import CoblaxError

__all__ = [
    "ConfigError",
    "Problems",
    "INT_MAX",
    "setting",
    "read_config_text",
    "load_toml",
    "parse_dataclass",
    "check_model_options",
    "check_method_options",
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

#: Largest integer any config key accepts (sizes, counts, seeds): int32's maximum.
INT_MAX = 2**31 - 1


class ConfigError(CoblaxError, ValueError):
    """Invalid configuration; the message names the key and the allowed values.

    ``problems`` holds every problem found, one message each.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


class Problems(list):
    """Problems found so far (messages), and which top-level keys they concern."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    def add(self, key: str, message: str) -> None:
        if message not in self:
            self.append(message)
        self.keys.add(key.split(".")[0].split("[")[0])

    def error(self, source: str | None = None) -> ConfigError:
        """One :class:`ConfigError` listing every problem (prefixed by ``source``)."""
        head = f"{source}: " if source else ""
        if len(self) == 1:
            return ConfigError(head + self[0], list(self))
        lines = "\n".join(f"  - {p}" for p in self)
        return ConfigError(f"{head}{len(self)} problems:\n{lines}", list(self))


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    allowed: str = "values",
    nonempty: bool = False,
    unique: bool = False,
) -> Any:
    """A dataclass field with its constraints (checked by :func:`parse_dataclass`).

    Args:
      default, factory: the default value (or a factory for mutable ones).
      gt, ge, le: bounds on a number (on each element of a list).
      choices: the allowed strings, or a function returning them (looked up lazily,
        e.g. from the registry); ``allowed`` names them in messages ("methods").
      nonempty: a list must have at least one element.
      unique: a list must not repeat an element.
    """
    meta = {"gt": gt, "ge": ge, "le": le, "choices": choices, "allowed": allowed,
            "nonempty": nonempty, "unique": unique}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ------------------------------------------------------------------------- reading


def read_config_text(path: str | Path) -> str:
    """The text of a config file; every way it can fail is a :class:`ConfigError` naming it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; expected a TOML config file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})"
        ) from None


def load_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a missing, unreadable or invalid file is a ConfigError."""
    text = read_config_text(path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


# ---------------------------------------------------------------------- validation


class _Reported(Exception):
    """A nested value whose problems were already added to the list."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _is_sequence_type(tp) -> bool:
    origin = typing.get_origin(tp)
    return origin in (tuple, list, collections.abc.Sequence)


def _check(value: Any, tp, where: str, problems: Problems) -> Any:
    """``value`` converted to ``tp`` (lists -> tuples); ConfigError if it has the wrong type."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
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
                return _check(value, arg, where, problems)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} has the wrong type ({_type_name(tp)})"
        )
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{where} = {value!r} is not allowed; valid values: {', '.join(map(repr, allowed))}"
            )
        return value
    if _is_sequence_type(tp):
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a scalar where a list is allowed means a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_check(v, elem, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        before = len(problems)
        obj = parse_dataclass(tp, value, where, problems)
        if len(problems) > before or obj is None:
            raise _Reported()
        return obj
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if abs(value) > INT_MAX:
            raise ConfigError(
                f"{where} = {value} is out of range; integers must lie in [-{INT_MAX}, {INT_MAX}]"
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type):  # any other class: accept its instances only
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    return value  # a type we cannot check (a callable, a protocol...): the builder decides


def _range_text(gt, ge, le) -> str:
    if gt is not None and le is not None:
        return f"is outside ({gt:g}, {le:g}]"
    if ge is not None and le is not None:
        return f"is outside [{ge:g}, {le:g}]"
    if gt is not None:
        return f"must be > {gt:g}"
    if ge is not None:
        return f"must be >= {ge:g}"
    return f"must be <= {le:g}"


def _constrain(value: Any, meta: typing.Mapping[str, Any], where: str) -> list[str]:
    """Messages for every constraint of :func:`setting` that ``value`` breaks."""
    if not meta:
        return []
    out: list[str] = []
    items = list(value) if isinstance(value, tuple) else [value]
    if isinstance(value, tuple):
        if meta.get("nonempty") and not value:
            out.append(f"{where} is empty; give at least one value")
        if meta.get("unique"):
            seen = set()
            for v in value:
                if v in seen:
                    out.append(f"{where} lists {v!r} twice")
                seen.add(v)
    gt, ge, le = meta.get("gt"), meta.get("ge"), meta.get("le")
    choices = meta.get("choices")
    if callable(choices):
        choices = tuple(choices())
    for v in items:
        if v is None:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (gt is not None and not v > gt) or (ge is not None and not v >= ge) or (
                le is not None and not v <= le
            ):
                out.append(f"{where} = {v!r} {_range_text(gt, ge, le)}")
        if choices is not None and v not in choices:
            out.append(
                f"{where} = {v!r} is not allowed; valid {meta.get('allowed', 'values')}: "
                f"{', '.join(choices)}"
            )
    return out


def parse_dataclass(cls, data: dict, where: str = "", problems: Problems | None = None):
    """Build frozen dataclass ``cls`` from ``data`` and check every key.

    With ``problems`` given, every problem is added to it and the dataclass is
    returned with the defaults in place of bad values (None if it cannot be built);
    without, the problems are raised together as one :class:`ConfigError`.
    """
    collect = problems is not None
    problems = problems if collect else Problems()
    start = len(problems)
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        problems.add(where or "config", f"{where or 'config'}: expected a table, got {data!r}")
        if not collect:
            raise problems.error()
        return None
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for key in sorted(set(data) - set(names), key=str):
        problems.add(
            f"{prefix}{key}",
            f"unknown config key {prefix}{key}; allowed keys{' in [' + where + ']' if where else ''}: "
            f"{', '.join(names)}",
        )
    kwargs = {}
    for f in fields:
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        try:
            value = _check(data[f.name], hints[f.name], key, problems)
        except ConfigError as err:
            problems.add(key, str(err))
            continue
        except _Reported:
            continue
        broken = _constrain(value, f.metadata, key)
        for message in broken:
            problems.add(key, message)
        if not broken:
            kwargs[f.name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError as err:  # a __post_init__ check
        problems.add(where or "config", str(err))
        obj = None
    except (TypeError, ValueError) as err:  # a required key missing, or a bad value above
        if len(problems) == start:
            problems.add(where or "config", f"{where or 'config'}: {err}")
        obj = None
    validate = getattr(obj, "validate", None)
    if validate is not None and len(problems) == start:
        try:
            validate(where)
        except ConfigError as err:
            for message in err.problems:
                problems.add(where or "config", message)
    if not collect and len(problems) > start:
        raise problems.error()
    return obj


# Helpers for validate() methods that check by hand.


def _choice(value: str, allowed, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; valid values: {', '.join(allowed)}")


def _positive(value, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} = {value!r} must be {'>= 0' if allow_zero else '> 0'}")


# ----------------------------------------------------- model and method options


def _model_names() -> tuple[str, ...]:
    from coblax.nn.models import MODEL_NAMES

    return MODEL_NAMES


def _method_names() -> tuple[str, ...]:
    from coblax.lowrank.registry import allocator_names

    return tuple(allocator_names())


def _warm_starts() -> tuple[str, ...]:
    return ("constant",) + tuple(m for m in _method_names() if m != "cobla")


def _int_leaves(value: Any, tp) -> list[int]:
    """The integers of an int option (or of each element of a Sequence[int] option)."""
    if value is None:
        return []
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _int_leaves(value, args[0]) if len(args) == 1 else []
    if tp is int:
        return [value]
    if _is_sequence_type(tp) and typing.get_args(tp)[:1] == (int,):
        return list(value)
    return []


def check_model_options(name: str, options: dict, where: str) -> list[str]:
    """Problems with a bundled model's ``options``, checked against the model's own fields.

    Unknown options list the model's fields; values are checked against the fields'
    type annotations; layer sizes (integer options) must be >= 1. That the model
    can be built with them is checked later on the data's input shape.
    """
    from coblax.nn.models import MODEL_NAMES, build_model

    if name not in MODEL_NAMES:
        return [f"{where}.name = {name!r} is not allowed; valid models: {', '.join(MODEL_NAMES)}"]
    module = build_model(name, num_classes=2)
    cls = type(module)
    fixed = {"parent", "name", "num_classes"}
    fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: leave types to the builder
        hints = {}
    problems: list[str] = []
    for key in sorted(options):
        value = options[key]
        if key not in fields:
            problems.append(
                f"{where}.{key}: unknown option of model {name!r}; its options: "
                f"{', '.join(fields) or '(none)'}"
            )
            continue
        tp = hints.get(key, Any)
        try:
            checked = _check(value, tp, f"{where}.{key}", Problems())
        except (ConfigError, _Reported) as err:
            problems.append(str(err) or f"{where}.{key}: wrong type")
            continue
        for v in _int_leaves(checked, tp):
            if v < 1:
                problems.append(f"{where}.{key} = {value!r}: layer sizes must be >= 1")
                break
    return problems


def _allocator_options(factory) -> tuple[dict[str, Any], bool]:
    """(option name -> type, accepts any keyword) of an allocator factory."""
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        try:
            hints = typing.get_type_hints(factory)
        except Exception:  # noqa: BLE001
            hints = {}
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(factory)
                if f.init and f.name != "name"}, False
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}, True
    opts, anything = {}, False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            anything = True
        elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "name":
            ann = p.annotation
            opts[p.name] = Any if ann is inspect.Parameter.empty or isinstance(ann, str) else ann
    return opts, anything


def check_method_options(method: str, options: Any, where: str) -> list[str]:
    """Problems with ``method_options.<method>``, checked against the allocator's options."""
    from coblax.lowrank.registry import allocator_factory

    if not isinstance(options, dict):
        return [f"{where}: expected a table of options, got {options!r}"]
    factory = allocator_factory(method)
    known, anything = _allocator_options(factory)
    problems: list[str] = []
    for key in sorted(options):
        if key not in known and not anything:
            problems.append(
                f"{where}.{key}: unknown option of method {method!r}; its options: "
                f"{', '.join(sorted(known)) or '(none)'}"
            )
            continue
        try:
            _check(options[key], known.get(key, Any), f"{where}.{key}", Problems())
        except (ConfigError, _Reported) as err:
            problems.append(str(err) or f"{where}.{key}: wrong type")
    if method == "cobla" and "warm_start" in options and options["warm_start"] not in _warm_starts():
        problems.append(
            f"{where}.warm_start = {options['warm_start']!r} is not allowed; valid values: "
            f"{', '.join(_warm_starts())}"
        )
    if not problems:
        try:
            factory(**options)
        except (TypeError, ValueError) as err:
            problems.append(f"{where}: {err}")
    return problems


# ------------------------------------------------------------------------- configs

_OPTIMIZERS = ("adam", "sgd", "momentum")
_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset; ``dir`` overrides ``COBLAX_DATA`` for file datasets."""

    name: str = setting("digits", choices=_DATASETS)
    dir: str | None = None
    limit_train: int | None = setting(None, ge=1)
    limit_test: int | None = setting(None, ge=1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model by name plus its own options (passed to ``build_model``)."""

    name: str = setting(choices=_model_names, allowed="models")
    options: dict = setting(factory=dict)

    @property
    def label(self) -> str:
        return self.name if not self.options else f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Base-model training."""

    epochs: int = setting(20, ge=0)
    batch_size: int = setting(64, ge=1)
    learning_rate: float = setting(1e-3, gt=0)
    optimizer: str = setting("adam", choices=_OPTIMIZERS)


@dataclasses.dataclass(frozen=True)
class DecomposeConfig:
    """Which layers are decomposed and how convolutions are matricized."""

    schemes: tuple[str, ...] = setting(("tai",), choices=("tai", "zhang"), nonempty=True, unique=True)
    layers: tuple[str, ...] = setting((), unique=True)
    exclude: tuple[str, ...] = setting((), unique=True)
    spectrum: str = setting("weight", choices=("weight", "whitened"))
    whiten_eps: float = setting(1e-6, gt=0)


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """Budget pairs (mac[i], param[i]) as fractions of the original cost."""

    mac: tuple[float, ...] = setting((0.5,), gt=0.0, le=1.0, nonempty=True)
    param: tuple[float, ...] = setting((0.5,), gt=0.0, le=1.0, nonempty=True)
    basis: str = setting("decomposed", choices=("decomposed", "network"))
    min_rank: int = setting(1, ge=1)

    def validate(self, where: str) -> None:
        if len(self.mac) != len(self.param) and 1 not in (len(self.mac), len(self.param)):
            raise ConfigError(
                f"{where}.mac and {where}.param must have the same length (or one of them one value)"
            )
        pairs = self.pairs()
        if len(set(pairs)) != len(pairs):
            raise ConfigError(f"{where}: a budget pair (mac, param) is listed twice: {pairs}")

    def pairs(self) -> list[tuple[float, float]]:
        n = max(len(self.mac), len(self.param))
        mac = self.mac * n if len(self.mac) == 1 else self.mac
        param = self.param * n if len(self.param) == 1 else self.param
        return list(zip(mac, param))


@dataclasses.dataclass(frozen=True)
class CoblaConfig:
    """COBLA's relaxed solve and rounding."""

    objective_size: int = setting(1000, ge=1)
    validation_size: int = setting(500, ge=1)
    batch_size: int = setting(250, ge=1)
    max_iter: int = setting(100, ge=1)
    tol: float = setting(1e-4, gt=0, le=0.1)
    rtol: float = setting(3e-3, gt=0, le=0.1)
    atol: float = setting(1e-8, ge=0)
    roundings: int = setting(10, ge=1)
    warm_start: str = setting("pos_exact", choices=_warm_starts)
    saturation_rounds: int = setting(5, ge=0)
    monotone: bool = False
    continuation: tuple[float, ...] = setting((), ge=0)
    local_search: int = setting(60, ge=0)
    select: str = setting("accuracy", choices=("accuracy", "loss"))
    mask_values: str = setting("relaxed", choices=("relaxed", "ones", "plain"))
    solver: str = setting("structured", choices=("slsqp", "structured"))
    window: int | None = setting(None, ge=1)
    data_parallel: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning of the factored network (all factors and other params trainable).

    ``recalibrate_bn = N`` re-estimates the BatchNorm statistics of the factored
    network on N training batches before each evaluation (:mod:`coblax.nn.bn`).
    """

    epochs: int = setting(5, ge=0)
    batch_size: int = setting(64, ge=1)
    learning_rate: float = setting(1e-4, gt=0)
    optimizer: str = setting("adam", choices=_OPTIMIZERS)
    recalibrate_bn: int = setting(0, ge=0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole ``coblax run`` experiment.

    ``seeds`` repeats every record once per seed (base model, data subsets and
    objective/validation split, rounding, fine-tuning); absent, the run has the one
    seed ``seed``. :attr:`seed_list` is the seeds a run repeats over.
    """

    seed: int = setting(0, ge=0)
    seeds: tuple[int, ...] | None = setting(None, ge=0, nonempty=True, unique=True)
    methods: tuple[str, ...] = setting(("cobla", "uniform"), choices=_method_names, allowed="methods",
                                       nonempty=True, unique=True)
    models: tuple[ModelConfig, ...] = setting((ModelConfig("mlp"),), nonempty=True)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    budgets: BudgetConfig = BudgetConfig()
    cobla: CoblaConfig = CoblaConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    method_options: dict = setting(factory=dict)
    cache_dir: str | None = None
    name: str = ""

    @property
    def seed_list(self) -> tuple[int, ...]:
        """The seeds every record is repeated for: ``seeds``, else ``(seed,)``."""
        return (self.seed,) if self.seeds is None else tuple(self.seeds)


def _models_from(value, where: str, problems: Problems) -> list:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, dict):
            if "name" not in item:
                problems.add(where, f"{where}[{i}] needs a name (valid models: {', '.join(_model_names())})")
                continue
            rest = {k: v for k, v in item.items() if k != "name"}
            out.append({"name": item["name"], "options": rest})
        else:
            problems.add(where, f"{where}[{i}]: expected a model name or table, got {item!r}")
    return out


def parse_run_config(raw: dict, problems: Problems) -> RunConfig:
    """Validate a config dict into a :class:`RunConfig`, adding every problem to ``problems``.

    Bad values are replaced by their defaults in the returned config (which is
    only meant for further checks when ``problems`` is not empty).
    """
    raw = dict(raw)
    if "seed" in raw and "seeds" in raw:
        problems.add("seeds", "give either seed or seeds, not both (seeds lists every seed)")
        raw.pop("seed")
    if "models" in raw:
        raw["models"] = _models_from(raw["models"], "models", problems)
    dec = raw.get("decompose")
    if isinstance(dec, dict) and "scheme" in dec:  # singular spelling accepted
        dec = dict(dec)
        if "schemes" in dec:
            problems.add("decompose", "decompose: give either scheme or schemes, not both")
            dec.pop("scheme")
        else:
            dec["schemes"] = dec.pop("scheme")
        raw["decompose"] = dec
    cfg = parse_dataclass(RunConfig, raw, "", problems)
    if cfg is None:  # pragma: no cover - every RunConfig field has a default
        cfg = RunConfig()
    for i, mc in enumerate(cfg.models):
        for message in check_model_options(mc.name, mc.options, f"models[{i}]"):
            problems.add("models", message)
    labels = [mc.label for mc in cfg.models]
    for label in sorted({lb for lb in labels if labels.count(lb) > 1}):
        problems.add("models", f"models: {label} is listed twice")
    method_options = raw.get("method_options", {})
    if isinstance(method_options, dict):
        valid = _method_names()
        for method in sorted(method_options):
            where = f"method_options.{method}"
            if method not in valid:
                problems.add(where, f"{where}: unknown method; valid methods: {', '.join(valid)}")
                continue
            for message in check_method_options(method, method_options[method], where):
                problems.add(where, message)
    return cfg


def load_run_config(path: str | Path, problems: Problems | None = None) -> RunConfig:
    """Read and validate an experiment config.

    Every problem is reported together in one :class:`ConfigError` that names the
    file; with ``problems`` given they are added to it instead.
    """
    raw = load_toml(path)
    own = Problems() if problems is None else problems
    cfg = parse_run_config(raw, own)
    if problems is None and own:
        raise own.error(str(path))
    return cfg
