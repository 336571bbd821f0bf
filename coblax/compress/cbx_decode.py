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
    MAX_ELEMENTS,
    MAX_INDEX_BITS,
    RAW_WIDTH,
    READ_CHUNK,
    VERSION,
    CbxError,
    numpy_dtype,
    raw_values,
    restore_dtype,
)
from coblax.compress.encode import (
    BitReader,
    BitstreamError,
    huffman_decode,
    relative_index_decode,
)
from coblax.util import unflatten_tree
from coblax.util.bits import ceil_bytes as _ceil8
from coblax.util.errors import FileLoadError
from coblax.util.limits import parse_json

__all__ = ["decode_cbx", "read_cbx", "read_cbx_layout"]

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


def _read_fixed(reader: BitReader, count: int, nbits: int) -> np.ndarray:
    """``reader.read_array`` in chunks, so its per-bit temporary stays small."""
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, READ_CHUNK):
        stop = min(count, start + READ_CHUNK)
        out[start:stop] = reader.read_array(stop - start, nbits)
    return out


def _decode_leaf(name: str, shape, fields, axes, cb_cur: _Cursor, st_cur: _Cursor) -> np.ndarray:
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
    if huff_w:
        symbols = huffman_decode(w_reader, w_lengths, n_entries)
    else:
        symbols = _read_fixed(w_reader, n_entries, width)
    if k:
        if symbols.size and symbols.max() >= k:
            raise CbxError(f"corrupt .cbx: leaf {name!r} has a weight code >= codebook size {k}")
        values = codebook[symbols]
    else:
        values = symbols.astype(np.uint32).view(np.float32)
    if b:
        if huff_i:
            gaps = huffman_decode(i_reader, g_lengths, n_entries)
        else:
            gaps = _read_fixed(i_reader, n_entries, b)
        flat = relative_index_decode(gaps, values, numel)
    else:
        flat = values.astype(np.float32)
    if w_reader.remaining or i_reader.remaining:
        raise CbxError(
            f"corrupt .cbx: leaf {name!r} streams have {w_reader.remaining + i_reader.remaining} "
            "unread bits"
        )
    if int(np.count_nonzero(flat)) != nnz:
        raise CbxError(
            f"corrupt .cbx: leaf {name!r} decodes to {np.count_nonzero(flat)} nonzeros, table "
            f"says {nnz}"
        )
    return np.transpose(flat.reshape([shape[a] for a in axes]), np.argsort(axes))


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


def _parse_table(table: _Cursor, n_leaves: int, n_coded: int) -> list[tuple]:
    """(name, dtype, shape, coded fields or None, axes or None) of every table entry."""
    entries = []
    total_elements = total_bytes = 0
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
        if total_bytes > MAX_DECODED_BYTES:
            raise CbxError(
                f"corrupt .cbx: leaf {name!r} of shape {tuple(shape)} takes the decoded file beyond "
                f"{MAX_DECODED_BYTES:,} bytes (the reader's limit)"
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
    entries = _parse_table(_Cursor(data[pos : pos + table_len], "layer table"), n_leaves, n_coded)
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
            flat[name] = raw_values(raw_cur.take(size), dtype, shape)
        else:
            values = _decode_leaf(name, shape, fields, axes, cb_cur, st_cur)
            flat[name] = restore_dtype(values, dtype)
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
        entries = _parse_table(table, n_leaves, n_coded)
    except CbxError as err:
        raise CbxError(f"{path}: {err}") from None
    except (struct.error, UnicodeDecodeError) as err:
        raise CbxError(f"{path}: corrupt .cbx: {err}") from None
    return meta, {e[0]: e[2] for e in entries}
