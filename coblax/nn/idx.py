"""IDX files (MNIST, Fashion-MNIST) and the MNIST-format directory loader.

IDX (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic
``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian uint32 dimensions, then the
big-endian payload in C order.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from coblax.nn.dataset import (
    NUM_CLASSES,
    DataError,
    Dataset,
    check_labels,
    read_file_bytes,
)

__all__ = [
    "MNIST_FILES",
    "read_idx",
    "write_idx",
    "load_mnist_dir",
]


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
    raw = read_file_bytes(path)
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


MNIST_FILES = {
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
    found = {key: _find_idx(d, stem) for key, stem in MNIST_FILES.items()}
    missing = [f"{MNIST_FILES[k]}[.gz]" for k, p in found.items() if p is None]
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
            arrays[key] = check_labels(path, arr, NUM_CLASSES)
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise DataError(
                f"{found[f'y_{split}']}: expected {nx} labels to match"
                f" {found[f'x_{split}']}, found {ny}"
            )
    return Dataset(name=name, num_classes=NUM_CLASSES, **arrays)

