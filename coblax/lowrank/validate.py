"""Argument checks of the public functions (``allocate``, ``finetune``), before any work.

The same rules as the config (:mod:`coblax.app.config`): budgets are real numbers in
(0, 1] (a ``bool``, a string or ``None`` is refused, not converted), ``min_rank >= 1``,
seeds >= 0, sizes >= 1; data are non-empty arrays of one length with integer labels
in ``[0, number of classes)`` -- the classes are the width of the model's output,
found abstractly (``jax.eval_shape``, nothing computed). Every failure is a
``ValueError`` that names the argument. Without these checks a label of -3 was
silently wrapped, 57 gave a misleading "non-finite objective", x and y of different
lengths "cannot reshape", empty data a ``ZeroDivisionError``, and ``mac="0.5"`` or
``mac=True`` were accepted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["check_allocate_arguments", "check_budget", "check_data", "check_finetune_arguments", "check_int"]

_BASES = ("decomposed", "network")


def check_budget(name: str, value: Any) -> float:
    """A budget fraction: a real number (not bool/str/None) in (0, 1]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"budget {name}={value!r} must be a number in (0, 1], got {type(value).__name__}")
    if not math.isfinite(float(value)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"budget {name}={value!r} must be in (0, 1]")
    return float(value)


def check_int(name: str, value: Any, low: int) -> int:
    """An integer (not bool) >= ``low``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be an integer >= {low}, got {type(value).__name__}")
    if int(value) < low:
        raise ValueError(f"{name}={value!r} must be >= {low}")
    return int(value)


def check_data(name: str, data: Any, num_classes: int | None = None, *,
               labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: non-empty, one length, integer labels in [0, num_classes) (if ``labels``)."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"{name} must be a pair (x, y) of arrays, got {type(data).__name__}")
    x, y = data
    if x is None or y is None:
        raise ValueError(f"{name}: x and y must be arrays, not None")
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"{name}: x holds no examples (shape {x.shape})")
    if y.ndim != 1:
        raise ValueError(f"{name}: y must be a 1-D array of integer labels, got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{name}: x has {len(x)} examples but y has {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: labels y must have an integer dtype, got {y.dtype}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name}: x must be a real numeric array, got {x.dtype}")
    low, high = int(y.min()), int(y.max())
    if labels and low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        bad = low if low < 0 else high
        raise ValueError(f"{name}: label {bad} is outside {bound} (the model has "
                         f"{num_classes if num_classes is not None else 'an unknown number of'} outputs)")
    return x, y


def _num_outputs(model: Any, variables: Any, x: np.ndarray, apply_kwargs: Mapping[str, Any]) -> int | None:
    """The width of the model's output on one example, computed abstractly; None if not an array."""
    import jax

    try:
        out = jax.eval_shape(lambda v, xb: model.apply(v, xb, **dict(apply_kwargs)), variables,
                             jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
    except Exception as err:  # noqa: BLE001 - the model cannot run on x: say so, naming the argument
        raise ValueError(f"data: the model cannot be applied to x of shape {x.shape[1:]} per "
                         f"example ({type(err).__name__}: {err})") from None
    shape = getattr(out, "shape", None)
    return int(shape[-1]) if shape else None


def check_allocate_arguments(args: Mapping[str, Any]) -> None:
    """Check ``allocate``'s arguments (its ``locals()``); raise ValueError naming the first bad one."""
    for name in ("mac", "param"):
        check_budget(name, args[name])
    check_int("min_rank", args.get("min_rank", 1), 1)
    check_int("seed", args.get("seed", 0), 0)
    check_int("batch_size", args.get("batch_size", 1), 1)
    basis = args.get("basis", "decomposed")
    if basis not in _BASES:
        raise ValueError(f"basis={basis!r} must be one of {', '.join(_BASES)}")
    # ``method`` is checked by api.resolve_method (a TypeError naming what it accepts)
    rules = args.get("rules", ())
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence) or not all(
            isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(p, str) for p in r) for r in rules):
        raise ValueError(f"rules must be a list of (regex, scheme) string pairs, got {rules!r:.80}")
    apply_kwargs = args.get("apply_kwargs") or {}
    if not isinstance(apply_kwargs, Mapping):
        raise ValueError(f"apply_kwargs must be a mapping of keyword arguments, got {type(apply_kwargs).__name__}")
    if args.get("variables") is None or not isinstance(args["variables"], Mapping):
        raise ValueError("variables must be the model's variables (a mapping with 'params')")
    x, _ = check_data("data", args["data"], labels=False)
    classes = _num_outputs(args["model"], args["variables"], x, apply_kwargs)
    check_data("data", args["data"], classes)
    if args.get("validation_data") is not None:
        check_data("validation_data", args["validation_data"], classes)


def check_finetune_arguments(args: Mapping[str, Any]) -> None:
    """Check ``finetune``'s arguments (its ``locals()``); raise ValueError naming the first bad one."""
    check_data("(x, y)", (args["x"], args["y"]))
    check_int("epochs", args.get("epochs", 1), 0)
    check_int("batch_size", args.get("batch_size", 1), 1)
    check_int("seed", args.get("seed", 0), 0)
    lr = args.get("learning_rate", 1e-4)
    if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, numbers.Real) or not (
            math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"learning_rate={lr!r} must be a finite number > 0")
