"""Resource caps for every file coblax reads, and a bounded JSON parser.

A file given to coblax (results JSON, the header of an ``.npz`` export, ``.cbx``
metadata, study results) is untrusted: a few bytes of nested brackets make
Python's parser recurse until ``RecursionError``, ``1e999`` parses as ``inf``,
``10**400`` as an integer no float can hold, and a big file is read whole. The
caps below bound what one file may make coblax do; :func:`parse_json` applies
them before (depth, size) and while (numbers) parsing, so every failure is one
:class:`~coblax.util.errors.FileLoadError` naming the file.

Caps (documented in the README, "Resource caps"):

* :data:`MAX_JSON_BYTES` -- 64 MiB of JSON text per file;
* :data:`MAX_JSON_DEPTH` -- 64 levels of nested arrays/objects;
* numbers: finite floats only (no ``NaN``, ``Infinity``, nor a literal that
  overflows to infinity), integers of at most :data:`MAX_JSON_INT_DIGITS` digits
  (|n| < 2^63).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from coblax.util.errors import FileLoadError

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_JSON_INT_DIGITS", "aligned_empty", "json_depth",
           "parse_json", "return_large_frees"]

MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
MAX_JSON_INT_DIGITS = 19
_INT_LIMIT = 2**63
# A JSON string literal (escapes included): removed before counting brackets, so
# that brackets inside strings do not count as nesting.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)

#: Byte alignment of the buffers the readers decode into: JAX's CPU client wraps a
#: NumPy array aligned to 64 bytes without copying it (``jax.device_put``), so a
#: decoded leaf lives in memory once, not twice.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...] | int, dtype: np.typing.DTypeLike, *,
                  zero: bool = False) -> np.ndarray:
    """A C-contiguous array whose data starts on an :data:`ALIGNMENT`-byte boundary.

    ``zero=True`` zero-fills it through ``np.zeros`` (``calloc``: pages that are
    never written are never made resident).
    """
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = (np.zeros if zero else np.empty)(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


#: Allocations from this size up get their own mapping (see :func:`return_large_frees`).
MMAP_THRESHOLD = 1 << 20


def return_large_frees() -> bool:
    """Make glibc give every allocation of :data:`MMAP_THRESHOLD` bytes or more back on free.

    glibc raises its mmap threshold after each large free (up to 32 MiB), so the
    next batches' buffers come from per-thread heaps that keep them: ``coblax
    evaluate`` grew by one batch of activations per XLA thread, ~1x the decoded
    parameters more than it needs. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``)
    maps them anew each time and returns them. Process-wide, so only the short
    ``evaluate`` command sets it. Returns False where it does not apply (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def json_depth(blob: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text, in one vectorized pass (no recursion)."""
    text = _STRING.sub(b'""', blob)
    codes = np.frombuffer(text, dtype=np.uint8)
    step = (np.isin(codes, (ord("["), ord("{"))).astype(np.int32)
            - np.isin(codes, (ord("]"), ord("}"))).astype(np.int32))
    return int(np.cumsum(step).max()) if step.size else 0


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range (not a finite float)")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer {text[:40]}... has more than {MAX_JSON_INT_DIGITS} digits")
    value = int(text)
    if abs(value) >= _INT_LIMIT:
        raise ValueError(f"integer {text} is out of range (|n| >= 2^63)")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def parse_json(blob: bytes | str, where: str, *, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON within the caps; raise :class:`FileLoadError` naming ``where``.

    Args:
      blob: the JSON text (bytes are decoded as UTF-8).
      where: what to name in errors (the file, or ``"FILE: header"``).
      max_bytes, max_depth: the caps (defaults :data:`MAX_JSON_BYTES`, :data:`MAX_JSON_DEPTH`).
    """
    if isinstance(blob, str):
        blob = blob.encode("utf-8", "surrogatepass")
    if len(blob) > max_bytes:
        raise FileLoadError(f"{where}: {len(blob):,} bytes of JSON, more than the {max_bytes:,}-byte cap")
    depth = json_depth(blob)
    if depth > max_depth:
        raise FileLoadError(f"{where}: JSON nested {depth} levels deep, more than the cap of {max_depth}")
    try:
        text = blob.decode("utf-8")
        return json.loads(text, parse_float=_finite_float, parse_int=_bounded_int,
                          parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise FileLoadError(f"{where}: not UTF-8 ({err})") from None
    except RecursionError:  # the pre-scan makes this unreachable; kept as a guard
        raise FileLoadError(f"{where}: JSON nested too deeply") from None
    except ValueError as err:
        raise FileLoadError(f"{where}: not valid JSON ({err})") from None
