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
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from coblax.util.errors import CoblaxError

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
_NUM_CLASSES = 10


class DataError(CoblaxError, ValueError):
    """A dataset that cannot be found or read; the message names the file and why."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of an image classification dataset.

    ``eq=False`` because fields are arrays: equality and hashing are by identity.

    Attributes:
      name: dataset name (one of :data:`DATASET_NAMES`).
      x_train, x_test: images, shape (N, H, W, C), float32 in [0, 1].
      y_train, y_test: labels, shape (N,), int32 in [0, num_classes).
      num_classes: number of classes.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(
                    f"Dataset {self.name!r}: x_{split} must be (N, H, W, C) and y_{split} (N,),"
                    f" got {x.shape} and {y.shape}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset {self.name!r}: train images {self.x_train.shape[1:]} and test images"
                f" {self.x_test.shape[1:]} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, (H, W, C)."""
        return tuple(self.x_train.shape[1:])


# --------------------------------------------------------------------------- IDX

# IDX type code -> (big-endian dtype, name used in messages).
_IDX_TYPES: dict[int, tuple[np.dtype, str]] = {
    0x08: (np.dtype(">u1"), "ubyte"),
    0x09: (np.dtype(">i1"), "byte"),
    0x0B: (np.dtype(">i2"), "short"),
    0x0C: (np.dtype(">i4"), "int"),
    0x0D: (np.dtype(">f4"), "float"),
    0x0E: (np.dtype(">f8"), "double"),
}
_IDX_CODE_OF: dict[np.dtype, int] = {
    dt.newbyteorder("="): code for code, (dt, _) in _IDX_TYPES.items()
}


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # A truncated .gz ends before its end-of-stream marker (EOFError).
        raise DataError(f"{path}: not a complete gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def read_idx(
    path: str | os.PathLike,
    *,
    expected_type: int | None = None,
    expected_ndim: int | None = None,
) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a native-endian NumPy array.

    Layout: bytes 0-1 are zero, byte 2 is the type code (0x08 ubyte, 0x09 byte,
    0x0B short, 0x0C int, 0x0D float, 0x0E double), byte 3 is ``ndim``; then
    ``ndim`` big-endian uint32 sizes; then ``prod(sizes)`` big-endian items.

    Args:
      path: file name; ``*.gz`` is decompressed transparently.
      expected_type: if given, the type code the file must have.
      expected_ndim: if given, the number of dimensions the file must have.

    Returns:
      Array of shape ``sizes`` and the type code's dtype, in native byte order.

    Raises:
      DataError: missing file, bad magic, unexpected type/ndim, or a payload whose
        length does not match the header (truncated or trailing bytes).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if expected_type is not None and expected_ndim is not None:
        want = (
            f"expected IDX magic 0x0000{expected_type:02X}{expected_ndim:02X}"
            f" ({_IDX_TYPES[expected_type][1]}, {expected_ndim}-D)"
        )
    else:
        codes = ", ".join(f"0x{c:02X} {n}" for c, (_, n) in _IDX_TYPES.items())
        want = f"expected IDX magic 0x0000<type><ndim> with type in {{{codes}}} and ndim >= 1"
    if len(raw) < 4:
        raise DataError(f"{path}: {want}, but the file has only {len(raw)} bytes")
    magic = struct.unpack(">I", raw[:4])[0]
    zero, code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if (
        zero != 0
        or code not in _IDX_TYPES
        or ndim == 0
        or (expected_type is not None and code != expected_type)
        or (expected_ndim is not None and ndim != expected_ndim)
    ):
        raise DataError(f"{path}: {want}, found 0x{magic:08X}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: expected a {header}-byte header for {ndim} dimensions, file has {len(raw)}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_TYPES[code][0]
    total = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != total:
        raise DataError(
            f"{path}: expected {total} bytes (shape {tuple(shape)}, {_IDX_TYPES[code][1]}),"
            f" file has {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # copy: writable, native order


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped if the name ends in ``.gz``).

    The inverse of :func:`read_idx`. Supported dtypes: uint8, int8, int16, int32,
    float32, float64 (any byte order); ``array.ndim`` must be in 1..255.
    """
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODE_OF:
        allowed = ", ".join(str(dt.newbyteorder("=")) for dt, _ in _IDX_TYPES.values())
        raise ValueError(f"write_idx: array dtype must be one of {allowed}, got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: array.ndim must be in 1..255, got {array.ndim}")
    code = _IDX_CODE_OF[native]
    payload = (
        struct.pack(">BBBB", 0, 0, code, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + np.ascontiguousarray(array, dtype=_IDX_TYPES[code][0]).tobytes()
    )
    if path.suffix == ".gz":
        with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime=0: byte-identical reruns
            f.write(payload)
    else:
        path.write_bytes(payload)


# ------------------------------------------------------------------ MNIST-likes

_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find_idx(d: Path, stem: str) -> Path | None:
    # Plain first: it needs no decompression.
    for candidate in (d / stem, d / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: expected labels in [0, {num_classes}), found range"
            f" [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int32)


def load_mnist_dir(d: str | os.PathLike, name: str = "mnist") -> Dataset:
    """Load an MNIST-format directory (MNIST, Fashion-MNIST) of IDX files.

    Looks in ``d`` for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or ``.gz``
    (plain preferred). Images must be 3-D ubyte, labels 1-D ubyte in [0, 10), and the
    image and label counts of each split must agree.

    Returns:
      Dataset with images (N, rows, cols, 1) float32 = pixel / 255 (28x28 for the
      real files) and int32 labels.
    """
    d = Path(d)
    found = {key: _find_idx(d, stem) for key, stem in _MNIST_FILES.items()}
    missing = [f"{_MNIST_FILES[k]}[.gz]" for k, p in found.items() if p is None]
    if missing:
        raise DataError(f"missing MNIST files in {d}: expected {', '.join(missing)}")
    arrays: dict[str, np.ndarray] = {}
    for key, path in found.items():
        assert path is not None
        is_images = key.startswith("x")
        arr = read_idx(path, expected_type=0x08, expected_ndim=3 if is_images else 1)
        if is_images:
            arrays[key] = (arr.astype(np.float32) / np.float32(255.0))[..., None]
        else:
            arrays[key] = _check_labels(path, arr, _NUM_CLASSES)
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise DataError(
                f"{found[f'y_{split}']}: expected {nx} labels to match"
                f" {found[f'x_{split}']}, found {ny}"
            )
    return Dataset(name=name, num_classes=_NUM_CLASSES, **arrays)


# --------------------------------------------------------------------- CIFAR-10

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


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
    labels = _check_labels(path, labels, _NUM_CLASSES)
    # Rows hold the R, G, B planes (each 32x32 row-major) one after another: NCHW -> NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images.astype(np.float32) / np.float32(255.0), labels


def load_cifar10_dir(d: str | os.PathLike) -> Dataset:
    """Load the CIFAR-10 python-version batches ``data_batch_1..5`` and ``test_batch``.

    Returns:
      Dataset with images (N, 32, 32, 3) float32 = pixel / 255 and int32 labels.
    """
    d = Path(d)
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise DataError(f"missing CIFAR-10 files in {d}: {', '.join(missing)}")
    train = [_load_cifar_batch(d / n) for n in _CIFAR_TRAIN]
    x_test, y_test = _load_cifar_batch(d / _CIFAR_TEST)
    return Dataset(
        name="cifar10",
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
        num_classes=_NUM_CLASSES,
    )


# ---------------------------------------------------------------------- digits


def _load_digits() -> Dataset:
    """scikit-learn's 8x8 digits with a fixed stratified 80/20 split (1,437 / 360)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # pixel values are 0..16
    y = digits.target.astype(np.int32)
    # random_state is fixed (not the caller's seed) so every run sees the same split.
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, _NUM_CLASSES)


# ---------------------------------------------------------------- load_dataset

# Sub-directories tried below the data directory, after the directory itself.
_SUBDIRS = {
    "mnist": ("mnist",),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist"),
    "cifar10": ("cifar-10-batches-py", "cifar10"),
}


def _marker_files(name: str) -> list[str]:
    if name == "cifar10":
        return [*_CIFAR_TRAIN, _CIFAR_TEST]
    return [f"{stem}{ext}" for stem in _MNIST_FILES.values() for ext in ("", ".gz")]


_LABELS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def _expected_files(name: str) -> str:
    """The files a dataset's folder must hold, as listed in messages."""
    if name == "cifar10":
        return ", ".join((*_CIFAR_TRAIN, _CIFAR_TEST))
    return ", ".join(f"{s}[.gz]" for s in _MNIST_FILES.values())


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
        ds = _load_digits()
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
