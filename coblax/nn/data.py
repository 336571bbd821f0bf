"""Datasets: scikit-learn digits, MNIST, Fashion-MNIST and CIFAR-10 as NumPy arrays.

Every loader returns a :class:`Dataset` with images in NHWC layout, ``float32`` in
[0, 1], and ``int32`` labels. Nothing is downloaded: the file datasets are read from a
directory given by the ``data_dir`` argument or the ``COBLAX_DATA`` environment
variable, and every missing or malformed file raises :class:`DataError` naming the
file and what was expected.

File formats:
  * IDX (MNIST, Fashion-MNIST; LeCun et al., http://yann.lecun.com/exdb/mnist/):
    a 4-byte magic ``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian
    uint32 dimensions, then the big-endian payload in C order.
  * CIFAR-10 "python version" (Krizhevsky 2009): pickled dicts whose ``b"data"`` is
    a uint8 (N, 3072) array holding the R, G and B 32x32 planes one after another.
    Pickle can run arbitrary code, so these files are read with an unpickler that
    only resolves the few globals that NumPy array reconstruction needs.

One module per format -- :mod:`coblax.nn.idx`, :mod:`coblax.nn.cifar`,
:mod:`coblax.nn.digits` -- beside :mod:`coblax.nn.dataset` (the :class:`Dataset` they
return); this module finds the files, draws the ``limit_*`` subsets and batches, and
re-exports the loaders' public names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from coblax.nn.cifar import CIFAR_TEST, CIFAR_TRAIN, load_cifar10_dir
from coblax.nn.dataset import DataError, Dataset
from coblax.nn.digits import load_digits
from coblax.nn.idx import MNIST_FILES, load_mnist_dir, read_idx, write_idx

__all__ = [
    "Dataset",
    "DataError",
    "DATASET_NAMES",
    "load_dataset",
    "read_idx",
    "write_idx",
    "load_mnist_dir",
    "load_cifar10_dir",
    "batches",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10")
ENV_VAR = "COBLAX_DATA"


# ---------------------------------------------------------------- load_dataset

# Sub-directories tried below the data directory, after the directory itself.
_SUBDIRS = {
    "mnist": ("mnist",),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist"),
    "cifar10": ("cifar-10-batches-py", "cifar10"),
}


def _marker_files(name: str) -> list[str]:
    if name == "cifar10":
        return [*CIFAR_TRAIN, CIFAR_TEST]
    return [f"{stem}{ext}" for stem in MNIST_FILES.values() for ext in ("", ".gz")]


_LABELS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def _expected_files(name: str) -> str:
    """The files a dataset's folder must hold, as listed in messages."""
    if name == "cifar10":
        return ", ".join((*CIFAR_TRAIN, CIFAR_TEST))
    return ", ".join(f"{s}[.gz]" for s in MNIST_FILES.values())


def _resolve_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The directory that holds ``name``'s files: ``D`` itself or a known sub-folder.

    Every failure names the folders looked in (or the setting to give) and the files
    expected there.
    """
    label, want = _LABELS[name], _expected_files(name)
    subs = " or ".join(f"{sub}/" for sub in _SUBDIRS[name])
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or None
    if data_dir is None:
        raise DataError(
            f"no data directory for {label}: set the {ENV_VAR} environment variable (or the"
            f" config's [data].dir, data_dir=...) to a folder holding {want} (directly or in"
            f" {subs} below it)"
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data directory {root} for {label} does not exist: expected a folder holding"
            f" {want} (directly or in {subs} below it)"
        )
    candidates = [root, *(root / sub for sub in _SUBDIRS[name])]
    markers = _marker_files(name)
    for cand in candidates:
        # Any one file is enough to pick the folder; the loader then names what is missing.
        if any((cand / m).is_file() for m in markers):
            return cand
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"no {label} files in {root} (looked in {looked}): expected {want}")


def _check_limit(arg: str, value: int | None) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
    ):
        raise ValueError(f"{arg} must be None or a positive int, got {value!r}")


def _stratified_subset(y: np.ndarray, limit: int | None, seed: int) -> np.ndarray | None:
    """Indices (ascending) of ``min(limit, len(y))`` examples with class shares kept.

    Each class's examples are shuffled with ``seed``; the k-th one of a class of size
    n_c gets key (k + 1/2) / n_c, and the ``limit`` smallest keys win. Every class
    then contributes ``limit * n_c / N`` examples up to rounding (within one).
    """
    if limit is None or limit >= len(y):
        return None
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    keys = np.empty(len(y), dtype=np.float64)
    for c in np.unique(y):
        members = order[y[order] == c]  # this class, in shuffled order
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    # Stable sort on keys of the shuffled order: ties broken by the shuffle.
    chosen = order[np.argsort(keys[order], kind="stable")[:limit]]
    return np.sort(chosen)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load a dataset by name.

    Args:
      name: ``"digits"`` (scikit-learn's bundled 8x8 digits, no files needed; fixed
        stratified split 1,437 train / 360 test, independent of ``seed``),
        ``"mnist"``, ``"fashion_mnist"`` (IDX files, (N, 28, 28, 1)) or ``"cifar10"``
        (python-version batches, (N, 32, 32, 3)).
      data_dir: directory with the files, else ``$COBLAX_DATA``. The files are looked
        for directly in it, then in ``mnist/``, ``fashion-mnist/`` or
        ``fashion_mnist/``, ``cifar-10-batches-py/`` or ``cifar10/`` below it. Unused
        for ``"digits"``.
      seed: seeds the choice of the ``limit_*`` subsets (only).
      limit_train, limit_test: keep at most this many examples of the split, chosen
        as a stratified random subset (class shares kept to within one example) and
        returned in their original order. ``None`` keeps all.

    Returns:
      The :class:`Dataset`, images NHWC float32 in [0, 1], labels int32.

    Raises:
      DataError: unknown name, no data directory, or missing/malformed files.
      ValueError: a limit that is not a positive int.
    """
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}: valid names are {', '.join(DATASET_NAMES)}")
    _check_limit("limit_train", limit_train)
    _check_limit("limit_test", limit_test)
    if key == "digits":
        ds = load_digits()
    elif key == "cifar10":
        ds = load_cifar10_dir(_resolve_dir(key, data_dir))
    else:
        ds = load_mnist_dir(_resolve_dir(key, data_dir), name=key)
    idx_train = _stratified_subset(ds.y_train, limit_train, seed)
    idx_test = _stratified_subset(ds.y_test, limit_test, seed + 1)
    if idx_train is None and idx_test is None:
        return ds
    pick = lambda a, i: a if i is None else a[i]  # noqa: E731
    return dataclasses.replace(
        ds,
        x_train=pick(ds.x_train, idx_train),
        y_train=pick(ds.y_train, idx_train),
        x_test=pick(ds.x_test, idx_test),
        y_test=pick(ds.y_test, idx_test),
    )


# --------------------------------------------------------------------- batches


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate over ``(xb, yb)`` mini-batches of ``batch_size`` examples.

    Args:
      x, y: arrays with the same first dimension.
      batch_size: positive number of examples per batch.
      seed: if given, visit the examples in the order of
        ``np.random.default_rng(seed).permutation(len(x))`` (same seed, same order);
        if ``None``, in their stored order.
      drop_last: drop the final batch when it is smaller than ``batch_size``.

    Returns:
      A generator; arguments are checked when this is called, not on first use.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
        batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    n = len(x)
    order = None if seed is None else np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_last else n

    def _gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, stop, batch_size):
            if order is None:
                sl: slice | np.ndarray = slice(start, start + batch_size)
            else:
                sl = order[start : start + batch_size]
            yield x[sl], y[sl]

    return _gen()
