"""Decode and validate ``.cbx`` bytes and files (layout in :mod:`coblax.compress.cbx_format`).

Every length, count and code in a file is checked before it is used, so a damaged or
hostile file raises :class:`~coblax.compress.cbx_format.CbxError`, never a bare error.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from coblax.compress.cbx_format import (
    CODED_FIELDS,
    CRC_BYTES,
    DTYPE_NAMES,
    FLAG_META,
    HEADER,
    HEADER_BYTES,
    KIND_CODED,
    KIND_RAW,
    KNOWN_FLAGS,
    LEAF_HUFFMAN_INDEX,
    LEAF_HUFFMAN_WEIGHTS,
    MAGIC,
    MAX_DECODED_BYTES,
    MAX_DECODED_RATIO,
    MAX_ELEMENTS,
    MAX_INDEX_BITS,
    RATIO_FREE_BYTES,
    RAW_WIDTH,
    READ_CHUNK,
    VERSION,
    CbxError,
    numpy_dtype,
)
from coblax.compress.encode import (
    BitReader,
    BitstreamError,
    huffman_decode,
)
from coblax.util import unflatten_tree
from coblax.util.bits import ceil_bytes as _ceil8
from coblax.util.errors import FileLoadError
from coblax.util.limits import aligned_empty, parse_json

__all__ = ["decode_cbx", "decoded_cap", "read_cbx", "read_cbx_layout"]

class _Cursor:
    """Bounds-checked reads from a byte section."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CbxError(
                f"corrupt .cbx: {self.what} section ends early (need {n} bytes at offset "
                f"{self.pos})"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))


#: Bits read per chunk by :func:`_read_fixed`: ``BitReader.read_array`` spends 9 bytes
#: per bit (one unpacked byte and one int64), so a chunk costs at most ~38 MB whatever
#: the field width.
_CHUNK_BITS = 1 << 22


def _read_fixed(reader: BitReader, count: int, nbits: int, out: np.ndarray | None = None,
                table: np.ndarray | None = None) -> np.ndarray:
    """``count`` fixed-width codes, read in chunks so that the per-bit temporary stays small.

    With ``table``, each code c is stored as ``table[c]`` (checked < ``len(table)``);
    without, as its ``uint32`` bit pattern viewed as ``out``'s dtype when ``out`` is
    given, else as int64.
    """
    if out is None:
        out = np.empty(count, dtype=np.int64)
    step = max(1, min(READ_CHUNK, _CHUNK_BITS // max(nbits, 1)))
    for start in range(0, count, step):
        stop = min(count, start + step)
        codes = reader.read_array(stop - start, nbits)
        if table is not None:
            if codes.size and codes.max() >= len(table):
                raise CbxError(f"a weight code >= codebook size {len(table)}")
            out[start:stop] = table[codes]
        elif out.dtype == np.int64:
            out[start:stop] = codes
        else:
            out[start:stop] = codes.astype(np.uint32).view(out.dtype)
    return out


def _positions(gaps: np.ndarray, numel: int) -> np.ndarray:
    """Entry j's flat position sum_{i<=j} (gap_i + 1) - 1 (relative indexing), checked < ``numel``.

    Computed in ``gaps``'s own buffer (int64).
    """
    if gaps.size and gaps.min() < 0:
        raise BitstreamError("negative gap in relative index")
    positions = gaps  # in place: no second array of entries
    positions += 1
    np.cumsum(positions, out=positions)
    positions -= 1
    if positions.size and positions[-1] >= numel:
        raise BitstreamError(f"relative index points at {positions[-1]}, past the end ({numel})")
    return positions


def _place(values: np.ndarray, positions: np.ndarray | None, shape: tuple[int, ...], axes,
           dtype: np.dtype) -> np.ndarray:
    """The leaf in its final dtype and C order, in one aligned buffer.

    The stream holds the leaf transposed to ``axes`` and flattened; entry j sits at
    ``positions[j]`` of that order (every position when ``positions`` is None). A
    sparse leaf's positions are mapped to the original order and scattered into
    zeros, so its zeros are never written (``calloc`` pages stay shared) and no
    transposed copy of the whole leaf is made: the decoded leaf exists once.
    """
    identity = list(axes) == list(range(len(shape)))
    if positions is None and identity and dtype == values.dtype:
        return values.reshape(shape)  # decoded in place (``values`` is aligned)
    out = aligned_empty(shape, dtype, zero=positions is not None)
    flat = out.reshape(-1)
    if positions is None:
        if identity:
            flat[:] = values
        else:
            permuted = values.reshape([shape[a] for a in axes])
            out[...] = np.transpose(permuted, np.argsort(axes))
        return out
    if not identity and positions.size:
        coords = np.unravel_index(positions, [shape[a] for a in axes])
        original = [None] * len(shape)
        for j, a in enumerate(axes):
            original[a] = coords[j]
        positions = np.ravel_multi_index(original, shape)
    flat[positions] = values
    return out


def _decode_leaf(name: str, shape, fields, axes, cb_cur: _Cursor, st_cur: _Cursor,
                 dtype: np.dtype) -> np.ndarray:
    """One coded leaf, checked field by field, as an aligned array of ``dtype`` and ``shape``."""
    flags, b, width, k, nnz, n_entries, wbits, ibits = fields
    if sorted(axes) != list(range(len(shape))):
        raise CbxError(
            f"corrupt .cbx: leaf {name!r} has axes {tuple(axes)}, not a permutation of its "
            "dimensions"
        )
    numel = math.prod(shape)
    if flags & ~(LEAF_HUFFMAN_WEIGHTS | LEAF_HUFFMAN_INDEX) or b > MAX_INDEX_BITS:
        raise CbxError(f"corrupt .cbx: leaf {name!r} has unknown flags {flags} or index_bits {b}")
    if (b == 0 and n_entries != numel) or n_entries > numel + numel:
        raise CbxError(f"corrupt .cbx: leaf {name!r} has {n_entries} entries for {numel} elements")
    huff_w, huff_i = bool(flags & LEAF_HUFFMAN_WEIGHTS), bool(flags & LEAF_HUFFMAN_INDEX)
    if huff_i and not b:
        raise CbxError(f"corrupt .cbx: leaf {name!r} has a Huffman index but no index bits")
    # Every entry costs at least one bit in each stream it is stored in (exactly
    # `width` or `b` bits when not Huffman coded): the declared entry count is
    # checked against the declared stream lengths (themselves checked against the
    # file) before anything is allocated for it.
    if (huff_w and n_entries > wbits) or (not huff_w and n_entries * width != wbits):
        raise CbxError(
            f"corrupt .cbx: leaf {name!r} declares {n_entries} entries but a {wbits}-bit weight stream"
        )
    if b and ((huff_i and n_entries > ibits) or (not huff_i and n_entries * b != ibits)):
        raise CbxError(
            f"corrupt .cbx: leaf {name!r} declares {n_entries} entries but a {ibits}-bit index stream"
        )
    if not b and ibits:
        raise CbxError(f"corrupt .cbx: leaf {name!r} has no index but a {ibits}-bit index stream")
    if nnz > min(numel, n_entries):
        raise CbxError(
            f"corrupt .cbx: leaf {name!r} declares {nnz} nonzeros for {n_entries} entries"
        )
    codebook = np.frombuffer(cb_cur.take(4 * k), dtype="<f4")
    if k == 0 and (width != RAW_WIDTH or huff_w):
        raise CbxError(f"corrupt .cbx: leaf {name!r} has no codebook but weight width {width}")
    if k and width != max(1, math.ceil(math.log2(k))):
        raise CbxError(
            f"corrupt .cbx: leaf {name!r} weight width {width} does not match codebook size {k}"
        )
    w_lengths = np.frombuffer(cb_cur.take(k), dtype=np.uint8) if huff_w else None
    g_lengths = np.frombuffer(cb_cur.take(1 << b), dtype=np.uint8) if huff_i and b else None
    w_reader = BitReader(st_cur.take(_ceil8(wbits)), wbits)
    i_reader = BitReader(st_cur.take(_ceil8(ibits)), ibits)
    # Values are decoded as float32 (the codebook's type, or raw bit patterns), one
    # entry per stored value; a dense leaf's values go straight into one buffer.
    values = aligned_empty(n_entries, np.float32)
    if huff_w:  # in chunks: the symbols are int64, twice the values' size
        for start in range(0, n_entries, READ_CHUNK):
            symbols = huffman_decode(w_reader, w_lengths, min(READ_CHUNK, n_entries - start))
            if symbols.size and symbols.max() >= k:
                raise CbxError(f"corrupt .cbx: leaf {name!r} has a weight code >= codebook size {k}")
            values[start:start + symbols.size] = codebook[symbols]
    else:
        try:
            _read_fixed(w_reader, n_entries, width, out=values, table=codebook if k else None)
        except CbxError as err:
            raise CbxError(f"corrupt .cbx: leaf {name!r} has {err}") from None
    positions = None
    if b:
        gaps = huffman_decode(i_reader, g_lengths, n_entries) if huff_i else _read_fixed(i_reader, n_entries, b)
        positions = _positions(gaps, numel)
    if w_reader.remaining or i_reader.remaining:
        raise CbxError(
            f"corrupt .cbx: leaf {name!r} streams have {w_reader.remaining + i_reader.remaining} "
            "unread bits"
        )
    # Positions are strictly increasing, so the leaf's nonzeros are its values' nonzeros.
    found = int(np.count_nonzero(values))
    if found != nnz:
        raise CbxError(f"corrupt .cbx: leaf {name!r} decodes to {found} nonzeros, table says {nnz}")
    return _place(values, positions, shape, axes, dtype)


def _raw_leaf(data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A raw leaf's little-endian values, copied once into an aligned array."""
    out = aligned_empty(shape, dtype)
    n = dtype.itemsize
    out.reshape(-1).view(f"u{n}")[:] = np.frombuffer(data, dtype=f"<u{n}")
    return out


def _check_frame(data: bytes) -> tuple:
    """The header fields, after checking length, magic, version, section sizes, CRC and flags."""
    if len(data) < HEADER_BYTES + CRC_BYTES:
        raise CbxError(
            f"truncated .cbx: {len(data)} bytes, the header and CRC alone take "
            f"{HEADER_BYTES + CRC_BYTES}"
        )
    header = HEADER.unpack_from(data)
    magic, version, flags, n_leaves, n_coded, meta_len, table_len, payload_len = header
    if magic != MAGIC:
        raise CbxError(f"not a .cbx file: magic bytes {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CbxError(
            f"unsupported .cbx version {version}; this reader supports version {VERSION}"
        )
    expected = HEADER_BYTES + meta_len + table_len + payload_len + CRC_BYTES
    if len(data) < expected:
        raise CbxError(f"truncated .cbx: header declares {expected} bytes, file has {len(data)}")
    if len(data) > expected:
        raise CbxError(
            f"corrupt .cbx: {len(data) - expected} unexpected bytes after the declared end "
            f"({expected})"
        )
    (crc,) = struct.unpack_from("<I", data, expected - CRC_BYTES)
    if zlib.crc32(data[: expected - CRC_BYTES]) != crc:
        raise CbxError("corrupt .cbx: CRC32 mismatch (the file was modified or damaged)")
    if flags & ~KNOWN_FLAGS:
        raise CbxError(f"unsupported .cbx flags {flags:#x}")
    if bool(flags & FLAG_META) != bool(meta_len):
        raise CbxError("corrupt .cbx: the metadata flag does not match the metadata length")
    # The smallest table entry takes 5 bytes (name length, kind, dtype, ndim, empty name).
    if n_coded > n_leaves or 5 * n_leaves > table_len:
        raise CbxError(
            f"corrupt .cbx: {n_leaves} leaves ({n_coded} coded) cannot fit a {table_len}-byte table"
        )
    return header


def decode_cbx(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse ``.cbx`` bytes into (params tree of numpy arrays, metadata dict).

    Checks, in order: length, magic, version, declared section lengths against the
    file length, CRC32, the metadata's types, the layer table (leaf count against
    its length, all elements against :data:`MAX_ELEMENTS`), all sections against
    the payload, and before anything is allocated for a coded leaf its entry and
    nonzero counts against its stream lengths; then every field while decoding.
    Any failure raises :class:`CbxError`; no value from a damaged file is returned.
    """
    data = bytes(data)
    _, _, _, n_leaves, n_coded, meta_len, table_len, payload_len = _check_frame(data)
    try:
        return _decode_body(data, n_leaves, n_coded, meta_len, table_len, payload_len)
    except CbxError:
        raise
    except (BitstreamError, struct.error, UnicodeDecodeError, ValueError, KeyError) as err:
        raise CbxError(f"corrupt .cbx: {err}") from None


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# key -> (check, what it must be) for the metadata keys coblax writes and reads back.
_META_TYPES: dict[str, tuple[Any, str]] = {
    "format": (lambda v: isinstance(v, str), "a string"),
    "name": (lambda v: isinstance(v, str), "a string"),
    "model": (
        lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)
        and isinstance(v.get("options", {}), dict),
        "an object with a string 'name' and an 'options' object",
    ),
    "input_shape": (
        lambda v: isinstance(v, list) and 1 <= len(v) <= 8 and all(_is_int(d, 1) for d in v),
        "a list of 1 to 8 positive integers",
    ),
    "num_classes": (lambda v: _is_int(v, 1), "a positive integer"),
    "dataset": (
        lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)
        and _is_int(v.get("seed", 0)) and (v.get("limit_test") is None or _is_int(v["limit_test"], 1)),
        "an object with a string 'name', an integer 'seed' >= 0 and 'limit_test' null or >= 1",
    ),
    "stages": (
        lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"
    ),
}


def _parse_meta(raw: bytes) -> dict[str, Any]:
    """The metadata block as a dict, the types of coblax's own keys checked."""
    if not raw:
        return {}
    try:
        meta = parse_json(raw, "metadata")
    except FileLoadError as err:
        raise CbxError(f"corrupt .cbx: {err}") from None
    if not isinstance(meta, dict):
        raise CbxError("corrupt .cbx: metadata is not a JSON object")
    for key, (ok, what) in _META_TYPES.items():
        if key in meta and not ok(meta[key]):
            raise CbxError(f"corrupt .cbx: metadata {key!r} must be {what}, got {meta[key]!r:.80}")
    return meta


def decoded_cap(file_bytes: int) -> int:
    """Most bytes the leaves of a ``file_bytes``-byte file may decode to.

    min(:data:`MAX_DECODED_BYTES`, max(:data:`RATIO_FREE_BYTES`,
    :data:`MAX_DECODED_RATIO` x ``file_bytes``)).
    """
    return min(MAX_DECODED_BYTES, max(RATIO_FREE_BYTES, MAX_DECODED_RATIO * file_bytes))


def _parse_table(table: _Cursor, n_leaves: int, n_coded: int, file_bytes: int) -> list[tuple]:
    """(name, dtype, shape, coded fields or None, axes or None) of every table entry."""
    entries = []
    total_elements = total_bytes = 0
    cap = decoded_cap(file_bytes)
    for _ in range(n_leaves):
        (name_len,) = table.unpack("<H")
        name = table.take(name_len).decode("utf-8")
        kind, dtype, ndim = table.unpack("<BBB")
        shape = table.unpack(f"<{ndim}I")
        if dtype not in DTYPE_NAMES or kind not in (KIND_RAW, KIND_CODED):
            raise CbxError(f"corrupt .cbx: leaf {name!r} has unknown kind {kind} or dtype {dtype}")
        total_elements += math.prod(shape)
        if total_elements > MAX_ELEMENTS:
            raise CbxError(
                f"corrupt .cbx: leaf {name!r} of shape {tuple(shape)} takes the file beyond "
                f"{MAX_ELEMENTS:,} elements (the reader's limit)"
            )
        total_bytes += math.prod(shape) * (4 if kind == KIND_CODED else numpy_dtype(dtype).itemsize)
        if total_bytes > cap:
            raise CbxError(
                f"corrupt .cbx: leaf {name!r} of shape {tuple(shape)} takes the decoded file beyond "
                f"{cap:,} bytes (the reader's limit for a {file_bytes:,}-byte file: at most "
                f"{MAX_DECODED_BYTES:,} bytes and {MAX_DECODED_RATIO} x the file size)"
            )
        fields = axes = None
        if kind == KIND_CODED:
            fields = table.unpack(CODED_FIELDS.format)
            axes = list(table.take(ndim))
        entries.append((name, dtype, tuple(shape), fields, axes))
    if table.pos != len(table.data) or sum(e[3] is not None for e in entries) != n_coded:
        raise CbxError(
            "corrupt .cbx: layer table length or coded-leaf count does not match the header"
        )
    return entries


def _decode_body(data, n_leaves, n_coded, meta_len, table_len, payload_len):
    pos = HEADER_BYTES
    meta = _parse_meta(data[pos : pos + meta_len])
    pos += meta_len
    entries = _parse_table(_Cursor(data[pos : pos + table_len], "layer table"), n_leaves, n_coded,
                           len(data))
    pos += table_len
    coded = [e for e in entries if e[3] is not None]
    cb_len = sum(
        4 * f[3]
        + (f[3] if f[0] & LEAF_HUFFMAN_WEIGHTS else 0)
        + ((1 << f[1]) if f[0] & LEAF_HUFFMAN_INDEX and f[1] else 0)
        for *_, f, _ in coded
    )
    st_len = sum(_ceil8(f[6]) + _ceil8(f[7]) for *_, f, _ in coded)
    raw_len = sum(numpy_dtype(e[1]).itemsize * math.prod(e[2]) for e in entries if e[3] is None)
    if cb_len + st_len + raw_len != payload_len:
        raise CbxError(
            f"corrupt .cbx: sections add up to {cb_len + st_len + raw_len} bytes, header says "
            f"{payload_len}"
        )
    cb_cur = _Cursor(data[pos : pos + cb_len], "codebook")
    st_cur = _Cursor(data[pos + cb_len : pos + cb_len + st_len], "stream")
    raw_cur = _Cursor(data[pos + cb_len + st_len : pos + payload_len], "raw")
    flat: dict[str, np.ndarray] = {}
    for name, dtype, shape, fields, axes in entries:
        if name in flat:
            raise CbxError(f"corrupt .cbx: leaf {name!r} appears twice")
        if fields is None:
            size = numpy_dtype(dtype).itemsize * math.prod(shape)
            flat[name] = _raw_leaf(raw_cur.take(size), numpy_dtype(dtype), shape)
        else:
            flat[name] = _decode_leaf(name, shape, fields, axes, cb_cur, st_cur, numpy_dtype(dtype))
    return unflatten_tree(flat), meta


def _read_file(path: str | os.PathLike) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such .cbx file: {path}") from None
    except IsADirectoryError:
        raise CbxError(f"{path} is a folder, not a .cbx file") from None
    except OSError as err:
        raise CbxError(f"cannot read {path}: {err.strerror or err}") from None


def read_cbx(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a ``.cbx`` file: (params tree of numpy arrays, metadata). Raises CbxError."""
    try:
        return decode_cbx(_read_file(path))
    except CbxError as err:
        raise CbxError(f"{path}: {err}") from None


def read_cbx_layout(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(metadata, leaf path -> declared shape) of a ``.cbx`` file, without decoding the payload.

    The frame, CRC, metadata types and layer table are checked as by
    :func:`read_cbx`; raises CbxError (FileNotFoundError for a missing file).
    """
    try:
        data = _read_file(path)
        _, _, _, n_leaves, n_coded, meta_len, table_len, _ = _check_frame(data)
        meta = _parse_meta(data[HEADER_BYTES : HEADER_BYTES + meta_len])
        start = HEADER_BYTES + meta_len
        table = _Cursor(data[start : start + table_len], "layer table")
        entries = _parse_table(table, n_leaves, n_coded, len(data))
    except CbxError as err:
        raise CbxError(f"{path}: {err}") from None
    except (struct.error, UnicodeDecodeError) as err:
        raise CbxError(f"{path}: corrupt .cbx: {err}") from None
    return meta, {e[0]: e[2] for e in entries}
