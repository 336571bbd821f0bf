"""A generic schema for TOML configs: frozen dataclasses validated key by key.

``parse_dataclass`` is the one validator. Each dataclass declares every key in one
place, its field: the type annotation says what type a value must have and
:func:`setting` what range or choices it must respect, e.g.

    tol: float = setting(1e-4, gt=0, le=0.1)
    optimizer: str = setting("adam", choices=("adam", "sgd", "momentum"))

Unknown keys, wrong types, non-finite numbers (NaN, inf), integers beyond
``INT_MAX`` and values outside their range or choices are all collected and
reported together by one :class:`ConfigError`, each problem naming its key
(``budgets.mac``) and what is allowed. A ``validate(where)`` method, if any, adds
the checks that relate several keys. The run's own dataclasses are in
:mod:`coblax.app.config`; this module knows nothing of models or methods.
"""

from __future__ import annotations

import collections.abc
import dataclasses
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
    "Reported",
    "INT_MAX",
    "setting",
    "read_config_text",
    "load_toml",
    "check_value",
    "is_sequence_type",
    "parse_dataclass",
    "check_choice",
    "check_positive",
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


class Reported(Exception):
    """A nested value whose problems were already added to the list."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def is_sequence_type(tp) -> bool:
    origin = typing.get_origin(tp)
    return origin in (tuple, list, collections.abc.Sequence)


def check_value(value: Any, tp, where: str, problems: Problems) -> Any:
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
                return check_value(value, arg, where, problems)
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
    if is_sequence_type(tp):
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a scalar where a list is allowed means a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(check_value(v, elem, f"{where}[{i}]", problems) for i, v in enumerate(value))
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
            raise Reported()
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
            value = check_value(data[f.name], hints[f.name], key, problems)
        except ConfigError as err:
            problems.add(key, str(err))
            continue
        except Reported:
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


# Helpers for validate() methods that check by hand (ConfigError on a bad value).


def check_choice(value: str, allowed, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; valid values: {', '.join(allowed)}")


def check_positive(value, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} = {value!r} must be {'>= 0' if allow_zero else '> 0'}")
