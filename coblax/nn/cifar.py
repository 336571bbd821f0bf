"""CIFAR-10 "python version" batches (Krizhevsky 2009).

Pickled dicts whose ``b"data"`` is a uint8 (N, 3072) array holding the R, G and B 32x32
planes one after another. Pickle can run arbitrary code, so these files are read with
an unpickler that only resolves the few globals that NumPy array reconstruction needs.

Reference: Krizhevsky (2009) "Learning Multiple Layers of Features from Tiny Images".
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from coblax.nn.dataset import (
    NUM_CLASSES,
    DataError,
    Dataset,
    check_labels,
)

__all__ = [
    "CIFAR_TRAIN",
    "CIFAR_TEST",
    "load_cifar10_dir",
]


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` restricted to latin-1.

    Python 3 writes ``bytes`` into protocol 0-2 pickles as
    ``_codecs.encode(text, "latin1")``; only that use is let through.
    """
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode allowed only with latin1, got {encoding!r}")
    return text.encode("latin1")


def _numpy_reconstruct() -> Any:
    # NumPy 2 moved numpy.core to numpy._core; numpy.core still works but warns.
    core = getattr(np, "_core", None)
    if core is None:  # pragma: no cover - NumPy 1.x
        core = np.core
    return core.multiarray._reconstruct


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals NumPy array pickles need."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path}: expected a CIFAR-10 python pickle, failed to read: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    # Keys are bytes in the official (Python 2) files; accept str for re-pickled copies.
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
        data.shape[1] != 3 * 32 * 32
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: expected b'data' as a uint8 (N, 3072) array, found {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: expected b'labels' as a list of ints") from None
    if labels.shape != (len(data),):
        raise DataError(
            f"{path}: expected {len(data)} labels to match b'data', found shape {labels.shape}"
        )
    labels = check_labels(path, labels, NUM_CLASSES)
    # Rows hold the R, G, B planes (each 32x32 row-major) one after another: NCHW -> NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images.astype(np.float32) / np.float32(255.0), labels


def load_cifar10_dir(d: str | os.PathLike) -> Dataset:
    """Load the CIFAR-10 python-version batches ``data_batch_1..5`` and ``test_batch``.

    Returns:
      Dataset with images (N, 32, 32, 3) float32 = pixel / 255 and int32 labels.
    """
    d = Path(d)
    names = (*CIFAR_TRAIN, CIFAR_TEST)
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise DataError(f"missing CIFAR-10 files in {d}: {', '.join(missing)}")
    train = [_load_cifar_batch(d / n) for n in CIFAR_TRAIN]
    x_test, y_test = _load_cifar_batch(d / CIFAR_TEST)
    return Dataset(
        name="cifar10",
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
        num_classes=NUM_CLASSES,
    )

