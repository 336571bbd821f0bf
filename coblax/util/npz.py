"""Bounded reading of ``.npz`` files: sizes and layouts checked before anything is inflated.

``np.load`` trusts a file: it inflates every member of the zip and allocates the
shape each ``.npy`` header declares, so 1 MB of deflated zeros becomes gigabytes.
:func:`npz_layout` reads only the zip's central directory and each member's
``.npy`` header (a few hundred bytes, read through a bounded stream) and checks

* every member is a ``NAME.npy`` of at most :data:`MAX_NPZ_BYTES` declared bytes,
  all members together at most ``max_bytes``, and at most :data:`MAX_NPZ_RATIO`
  declared bytes per byte of the file (``np.savez`` stores members uncompressed,
  so a real export has a ratio close to 1);
* each header is a plain array (no pickled objects, no structured or void dtype,
  at most 8 dimensions) whose shape and dtype account for exactly the member's
  declared size.

:func:`read_npz` then lets the caller check the layout (shapes against a model)
before it materializes the arrays. Zip's own decompressor stops at the declared
size and checks the CRC, so a member cannot inflate beyond what was checked.
Every failure is a :class:`~coblax.util.errors.FileLoadError` naming the file and
the member.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
import zlib
from collections.abc import Callable

import numpy as np

from coblax.util.errors import FileLoadError
from coblax.util.limits import aligned_empty

__all__ = ["MAX_NPZ_BYTES", "MAX_NPZ_MEMBERS", "MAX_NPZ_RATIO", "NpyEntry", "npz_layout", "read_npz"]

#: Declared (inflated) bytes of all members of one ``.npz`` together.
MAX_NPZ_BYTES = 1 << 30
#: Declared bytes per byte of the file (a deflate bomb reaches about 1000).
MAX_NPZ_RATIO = 64
#: Members of one file.
MAX_NPZ_MEMBERS = 100_000
_MAX_NDIM = 8
_MAX_HEADER = 1 << 16
_ALLOWED_KINDS = "biuf"
_READ_STEP = 1 << 20  # bool, signed, unsigned, float


@dataclasses.dataclass(frozen=True)
class NpyEntry:
    """One member of an ``.npz``: its array's name, shape, dtype and declared size."""

    name: str
    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    fortran: bool = False


def _header(fh, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=_MAX_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, SyntaxError) as err:
        raise FileLoadError(f"{where}: not a readable .npy header ({err})") from None
    return tuple(int(d) for d in shape), np.dtype(dtype), bool(fortran)


def npz_layout(path: str | os.PathLike, *, max_bytes: int = MAX_NPZ_BYTES) -> dict[str, NpyEntry]:
    """name -> :class:`NpyEntry` of every array in the file, without inflating any array.

    Raises:
      FileLoadError: not a zip, a member that is not an ``.npy``, a declared size or
        ratio over the caps, a header that is not a plain array of its declared size.
    """
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise FileLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileLoadError(f"{path} is a folder, not an .npz file") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise FileLoadError(f"{path}: not an .npz file (a zip archive of .npy arrays): {err}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS:
            raise FileLoadError(f"{path}: {len(infos):,} members, more than {MAX_NPZ_MEMBERS:,}")
        declared = sum(i.file_size for i in infos)
        cap = min(max_bytes, MAX_NPZ_RATIO * max(file_size, 1))
        if declared > cap:
            raise FileLoadError(
                f"{path}: its members declare {declared:,} bytes inflated from a {file_size:,}-byte "
                f"file; the reader's cap is {cap:,} (at most {max_bytes:,} bytes and "
                f"{MAX_NPZ_RATIO}x the file size)"
            )
        out: dict[str, NpyEntry] = {}
        for info in infos:
            where = f"{path}: member {info.filename!r}"
            if not info.filename.endswith(".npy") or info.is_dir():
                raise FileLoadError(f"{where} is not an .npy array")
            name = info.filename[: -len(".npy")]
            if name in out:
                raise FileLoadError(f"{where} appears twice")
            try:
                with zf.open(info) as fh:
                    shape, dtype, fortran = _header(fh, where)
                    offset = fh.tell()
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as err:
                raise FileLoadError(f"{where}: damaged ({err})") from None
            if dtype.hasobject or dtype.kind not in _ALLOWED_KINDS or dtype.fields or dtype.subdtype:
                raise FileLoadError(f"{where}: dtype {dtype.str} is not a plain bool/int/float array")
            if len(shape) > _MAX_NDIM or any(d < 0 for d in shape):
                raise FileLoadError(f"{where}: shape {shape} is not allowed (at most {_MAX_NDIM} dimensions)")
            nbytes = math.prod(shape) * dtype.itemsize
            if offset + nbytes != info.file_size:
                raise FileLoadError(
                    f"{where}: header declares {shape} {dtype} ({nbytes:,} bytes) but the member "
                    f"holds {info.file_size - offset:,}"
                )
            out[name] = NpyEntry(name, info.filename, shape, dtype, nbytes, fortran)
    return out


def read_npz(
    path: str | os.PathLike,
    check: Callable[[dict[str, NpyEntry]], None] | None = None,
    *,
    max_bytes: int = MAX_NPZ_BYTES,
    only: tuple[str, ...] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``, after :func:`npz_layout` and ``check(layout)`` accepted them.

    ``check`` raises (a :class:`FileLoadError` naming the field) when the layout is
    not what the caller expects; nothing is inflated before it returns.
    """
    path = os.fspath(path)
    layout = npz_layout(path, max_bytes=max_bytes)
    if check is not None:
        check(layout)
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name, entry in layout.items():
                if only is not None and name not in only:
                    continue
                # filled in place (no second copy), aligned so that JAX can wrap it uncopied
                buf = aligned_empty(entry.nbytes, np.uint8)
                with zf.open(entry.member) as fh:
                    _header(fh, f"{path}: member {entry.member!r}")
                    view, filled = memoryview(buf), 0
                    while filled < entry.nbytes:
                        # in 1 MiB steps: ZipExtFile.readinto reads into a new bytes object
                        # and copies it, so one call for the whole member doubled its peak
                        got = fh.readinto(view[filled:filled + _READ_STEP])
                        if not got:
                            raise FileLoadError(f"{path}: member {entry.member!r} is truncated")
                        filled += got
                arr = buf.view(entry.dtype)
                arrays[name] = arr.reshape(entry.shape, order="F" if entry.fortran else "C")
    except FileLoadError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as err:
        raise FileLoadError(f"{path}: damaged ({err})") from None
    return arrays
