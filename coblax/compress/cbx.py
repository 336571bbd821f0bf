"""The ``.cbx`` file: a whole params tree with pruned, codebook-quantized, Huffman-coded kernels.

Layout (all integers little-endian; the byte-by-byte description with a worked size
equation is in ``docs/compression.md``)::

    header      36 bytes   magic, version, flags, counts, section lengths
    metadata    meta_len   UTF-8 JSON (model name/options, input shape, classes, dataset)
    layer table table_len  one entry per leaf: name, kind, dtype, shape [+ codec fields, axes]
    payload     payload_len
      codebooks   per coded leaf: K float32 centroids, K Huffman code lengths (u8) if the
                  weights are Huffman coded, 2^b code lengths (u8) if the gaps are
      streams     per coded leaf: weight-code stream, then index (gap) stream, each
                  MSB-first and zero-padded to a whole byte
      raw         per raw leaf: the values in the leaf's own dtype, little-endian, C order
    CRC32       4 bytes    zlib.crc32 of every byte before it

A coded leaf stores its nonzeros in Deep Compression's relative format
(:func:`coblax.compress.encode.relative_index_encode`): one entry per nonzero plus filler
entries, each entry a b-bit gap and a weight code (the index of its codebook value).
Fillers store the zero weight, so a codebook that lacks 0.0 gets a 0.0 appended
when the leaf needs fillers. ``index_bits = 0`` stores every element (no index).

So the file size is exactly
    36 + meta_len + table_len + sum_coded(4K + [K] + [2^b] + ceil(wbits/8) + ceil(ibits/8))
       + sum_raw(itemsize * numel) + 4,
with table_len = sum(2 + len(name) + 3 + 4 ndim) + sum_coded(39 + ndim).

Reference: Han, Mao & Dally (2016) "Deep Compression", ICLR, Sec. 2-4.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from coblax.compress.encode import (
    BitReader,
    BitstreamError,
    BitWriter,
    coded_bits,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
    relative_index_decode,
    relative_index_encode,
)
from coblax.util import flatten_tree, unflatten_tree, write_bytes_atomic
from coblax.util.bits import ceil_bytes as _ceil8
from coblax.util.errors import CoblaxError, FileLoadError
from coblax.util.limits import parse_json

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_BYTES",
    "CRC_BYTES",
    "CbxError",
    "LeafCoding",
    "LeafSize",
    "CbxSizeInfo",
    "encode_cbx",
    "decode_cbx",
    "write_cbx",
    "read_cbx",
    "read_cbx_layout",
    "MAX_ELEMENTS",
    "MAX_DECODED_BYTES",
]

MAGIC = b"\x89CBX\r\n\x1a\n"  # PNG-style: catches 7-bit and newline-mangling transfers
VERSION = 1
# magic, version, flags, n_leaves, n_coded, meta_len, table_len, payload_len
_HEADER = struct.Struct("<8sHHIIIIQ")
HEADER_BYTES = _HEADER.size  # 36
CRC_BYTES = 4
# flags, index_bits, weight width, K, nnz, entries, weight-stream bits, index-stream bits
_CODED_FIELDS = struct.Struct("<BBBIQQQQ")

FLAG_HUFFMAN = 1  # header: at least one stream is Huffman coded
FLAG_META = 2  # header: a metadata block is present
_KNOWN_FLAGS = FLAG_HUFFMAN | FLAG_META
_LEAF_HUFFMAN_WEIGHTS, _LEAF_HUFFMAN_INDEX = 1, 2
_KIND_RAW, _KIND_CODED = 0, 1
_RAW_WIDTH = 32  # weight_width of a coded leaf without codebook: float32 bit patterns
_MAX_INDEX_BITS = 16
_MAX_CODEBOOK = 1 << 16
#: Most elements a reader decodes from one file (all leaves together): 2^28 float32
#: values = 1 GiB. Sparse coded leaves store no trailing zeros, so their declared
#: shapes are not bounded by the file size; this limit is what bounds them.
MAX_ELEMENTS = 1 << 28
#: Most bytes the decoded leaves of one file may take together (each coded leaf as
#: float32, each raw leaf in its dtype): 256 MiB. The element count alone let a
#: 197 KB file of sparse leaves decode to 1 GiB and reach 2.4 GB of RSS in
#: ``coblax evaluate``; this caps the real memory (measured in the README,
#: "Resource caps").
MAX_DECODED_BYTES = 1 << 28
#: Entries read from a fixed-width stream per step: bounds the bit-unpacking
#: temporary (8 bytes per bit) whatever the leaf's size.
_READ_CHUNK = 1 << 20

_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CbxError(CoblaxError, ValueError):
    """A ``.cbx`` file that cannot be read (truncated, corrupt, wrong magic or version)."""


@dataclasses.dataclass(frozen=True)
class LeafCoding:
    """How one leaf (a kernel) is coded.

    Attributes:
      codebook: the shared weight values (k-means centroids); every nonzero of the
        leaf must equal one of them exactly in float32. None stores the nonzeros'
        float32 bit patterns (32 bits each; pruning without quantization).
      index_bits: b, the width of a relative-index gap, in [1, 16]; 0 stores every
        element (dense layout, no index stream).
      huffman_weights: Huffman-code the weight codes (needs a codebook).
      huffman_index: Huffman-code the gaps (needs index_bits > 0).
      axes: order in which the elements are visited: the leaf is transposed by this
        permutation, then flattened in C order (None: as stored). E.g. ``(1, 0)``
        walks a Dense (in, out) kernel one output neuron at a time, as Caffe's
        (out, in) blobs that Deep Compression coded.
    """

    codebook: np.ndarray | None = None
    index_bits: int = 5
    huffman_weights: bool = True
    huffman_index: bool = True
    axes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        b = self.index_bits
        if not isinstance(b, (int, np.integer)) or not 0 <= b <= _MAX_INDEX_BITS:
            raise ValueError(
                f"index_bits must be an int in [0, {_MAX_INDEX_BITS}], got {self.index_bits!r}"
            )
        if self.codebook is None and self.huffman_weights:
            raise ValueError("huffman_weights=True needs a codebook (got codebook=None)")
        if self.index_bits == 0 and self.huffman_index:
            raise ValueError("huffman_index=True needs index_bits > 0 (dense layout has no index)")
        if self.codebook is not None:
            cb = np.asarray(self.codebook)
            if cb.ndim != 1 or not 1 <= cb.size < _MAX_CODEBOOK:
                raise ValueError(
                    f"codebook must be 1-D with 1..{_MAX_CODEBOOK - 1} entries, got shape "
                    f"{cb.shape}"
                )
            if not np.all(np.isfinite(cb)):
                raise ValueError("codebook values must be finite")
        if self.axes is not None and sorted(self.axes) != list(range(len(self.axes))):
            raise ValueError(f"axes must be a permutation of 0..ndim-1, got {self.axes!r}")


@dataclasses.dataclass(frozen=True)
class LeafSize:
    """Where the bytes of one leaf went (bits are exact, bytes are whole).

    ``weight_bits_fixed`` / ``index_bits_fixed`` are the stream lengths with fixed-width
    codes (P+Q), ``weight_bits_huffman`` / ``index_bits_huffman`` with Huffman codes
    (P+Q+H); ``weight_stream_bits`` / ``index_stream_bits`` are what the file holds.
    """

    name: str
    kind: str  # "coded" | "raw"
    shape: tuple[int, ...]
    numel: int
    nnz: int
    n_entries: int = 0
    n_fillers: int = 0
    codebook_size: int = 0
    weight_width: int = 0
    index_bits: int = 0
    huffman_weights: bool = False
    huffman_index: bool = False
    codebook_bytes: int = 0
    code_length_bytes: int = 0
    weight_stream_bits: int = 0
    index_stream_bits: int = 0
    weight_bits_fixed: int = 0
    index_bits_fixed: int = 0
    weight_bits_huffman: int = 0
    index_bits_huffman: int = 0
    raw_bytes: int = 0
    table_bytes: int = 0

    @property
    def payload_bytes(self) -> int:
        """Bytes of this leaf in the payload (codebook, code lengths, streams, raw values)."""
        return (
            self.codebook_bytes
            + self.code_length_bytes
            + _ceil8(self.weight_stream_bits)
            + _ceil8(self.index_stream_bits)
            + self.raw_bytes
        )


@dataclasses.dataclass(frozen=True)
class CbxSizeInfo:
    """Sizes of every section of a ``.cbx`` file; ``total_bytes`` is the file size."""

    total_bytes: int
    header_bytes: int
    meta_bytes: int
    table_bytes: int
    payload_bytes: int
    crc_bytes: int
    leaves: tuple[LeafSize, ...]

    def leaf(self, name: str) -> LeafSize:
        for leaf in self.leaves:
            if leaf.name == name:
                return leaf
        raise KeyError(name)


# ------------------------------------------------------------------------ params trees


def _dtype_code(name: str, arr: np.ndarray) -> int:
    if arr.dtype.name not in _DTYPES:
        raise ValueError(
            f"leaf {name!r} has dtype {arr.dtype.name}; .cbx stores {', '.join(_DTYPES)}"
        )
    return _DTYPES[arr.dtype.name]


def _numpy_dtype(code: int) -> np.dtype:
    name = _DTYPE_NAMES[code]
    if name == "bfloat16":
        import ml_dtypes  # a jax dependency; imported lazily as only bfloat16 needs it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _restore_dtype(values: np.ndarray, code: int) -> np.ndarray:
    return values.astype(_numpy_dtype(code))


def _raw_bytes(arr: np.ndarray) -> bytes:
    """A raw leaf's values in its own dtype, little-endian, C order."""
    n = arr.dtype.itemsize
    return np.ascontiguousarray(arr).view(f"u{n}").astype(f"<u{n}").tobytes()


def _raw_values(data: bytes, code: int, shape: tuple[int, ...]) -> np.ndarray:
    dtype = _numpy_dtype(code)
    n = dtype.itemsize
    return np.frombuffer(data, dtype=f"<u{n}").astype(f"u{n}").view(dtype).reshape(shape)


# ----------------------------------------------------------------------------- encode


def _symbols(name: str, values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of each value in ``codebook`` (first occurrence); every value must be present."""
    order = np.argsort(codebook, kind="stable")
    ordered = codebook[order]
    idx = np.clip(np.searchsorted(ordered, values), 0, ordered.size - 1)
    bad = ordered[idx] != values
    if np.any(bad):
        raise ValueError(
            f"leaf {name!r}: value {values[np.argmax(bad)]!r} is not in its codebook "
            f"({codebook.size} entries); quantize the leaf with that codebook first"
        )
    return order[idx]


def _encode_leaf(name: str, arr: np.ndarray, coding: LeafCoding):
    """Codec fields, codebook bytes, stream bytes and the size record of one coded leaf."""
    axes = tuple(range(arr.ndim)) if coding.axes is None else tuple(coding.axes)
    if len(axes) != arr.ndim:
        raise ValueError(f"leaf {name!r}: axes {axes} do not match its {arr.ndim} dimensions")
    flat = np.transpose(arr.astype(np.float32), axes).ravel()
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"leaf {name!r}: coded leaves must be finite")
    if arr.dtype != np.float32 and not np.array_equal(flat.astype(arr.dtype),
                                                      np.transpose(arr, axes).ravel()):
        raise ValueError(
            f"leaf {name!r}: its {arr.dtype.name} values are not all float32 numbers, and a "
            "coded leaf stores float32 values; store it raw (its own dtype) or cast it first"
        )
    b = int(coding.index_bits)
    if b:
        ri = relative_index_encode(flat, b)
        gaps, values, n_fillers = ri.gaps, ri.values, ri.n_fillers
    else:
        gaps, values, n_fillers = np.zeros(0, np.int64), flat, 0
    n_entries = int(values.size)
    if coding.codebook is None:
        codebook = np.zeros(0, np.float32)
        width = _RAW_WIDTH
        symbols = values.view(np.uint32).astype(np.int64)
        w_lengths = None
        w_huff_bits = n_entries * width
    else:
        codebook = np.asarray(coding.codebook, dtype=np.float32)
        if np.any(values == 0) and not np.any(codebook == 0):
            codebook = np.append(codebook, np.float32(0.0))  # fillers / dense zeros need a code
        if codebook.size >= _MAX_CODEBOOK:
            raise ValueError(
                f"leaf {name!r}: codebook has {codebook.size} entries, max {_MAX_CODEBOOK - 1}"
            )
        width = max(1, math.ceil(math.log2(codebook.size)))
        symbols = _symbols(name, values, codebook)
        freqs = np.bincount(symbols, minlength=codebook.size)
        w_lengths = huffman_code_lengths(freqs)
        w_huff_bits = coded_bits(freqs, w_lengths)
    if b:
        g_freqs = np.bincount(gaps, minlength=1 << b)
        g_lengths = huffman_code_lengths(g_freqs)
        i_huff_bits = coded_bits(g_freqs, g_lengths)
    else:
        g_lengths, i_huff_bits = None, 0

    tables = [codebook.astype("<f4").tobytes()]
    w = BitWriter()
    if coding.huffman_weights:
        tables.append(w_lengths.astype(np.uint8).tobytes())
        huffman_encode(symbols, w_lengths, w)
    else:
        w.write_array(symbols, width)
    i = BitWriter()
    if b and coding.huffman_index:
        tables.append(g_lengths.astype(np.uint8).tobytes())
        huffman_encode(gaps, g_lengths, i)
    elif b:
        i.write_array(gaps, b)
    flags = (_LEAF_HUFFMAN_WEIGHTS if coding.huffman_weights else 0) | (
        _LEAF_HUFFMAN_INDEX if coding.huffman_index else 0
    )
    nnz = int(np.count_nonzero(flat))
    fields = _CODED_FIELDS.pack(
        flags, b, width, codebook.size, nnz, n_entries, w.bit_length, i.bit_length
    )
    fields += bytes(axes)
    size = LeafSize(
        name=name,
        kind="coded",
        shape=tuple(arr.shape),
        numel=int(arr.size),
        nnz=nnz,
        n_entries=n_entries,
        n_fillers=n_fillers,
        codebook_size=int(codebook.size),
        weight_width=width,
        index_bits=b,
        huffman_weights=coding.huffman_weights,
        huffman_index=coding.huffman_index,
        codebook_bytes=4 * int(codebook.size),
        code_length_bytes=sum(len(t) for t in tables[1:]),
        weight_stream_bits=w.bit_length,
        index_stream_bits=i.bit_length,
        weight_bits_fixed=n_entries * width,
        index_bits_fixed=n_entries * b,
        weight_bits_huffman=w_huff_bits,
        index_bits_huffman=i_huff_bits,
    )
    return fields, b"".join(tables), w.getvalue() + i.getvalue(), size


def _table_prefix(name: str, kind: int, dtype: int, shape: tuple[int, ...]) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 0xFFFF or len(shape) > 0xFF or any(d > 0xFFFFFFFF for d in shape):
        raise ValueError(f"leaf {name!r}: name, rank or dimension too large for .cbx")
    fmt = f"<H{len(raw)}sBBB{len(shape)}I"
    return struct.pack(fmt, len(raw), raw, kind, dtype, len(shape), *shape)


def encode_cbx(
    params: Mapping[str, Any],
    coding: Mapping[str, LeafCoding],
    meta: Mapping[str, Any] | None = None,
) -> tuple[bytes, CbxSizeInfo]:
    """Serialize ``params`` to ``.cbx`` bytes.

    Args:
      params: nested dicts of float arrays (a flax params tree).
      coding: leaf path (``"params/fc1/kernel"``) -> :class:`LeafCoding`; leaves not
        named here are stored raw in their own dtype (float32, float16, bfloat16 or
        float64), bit for bit. A coded leaf of another dtype than float32 must hold
        float32 numbers only (its codebook is float32); else ValueError.
      meta: JSON-serializable dict stored verbatim (how to rebuild the model).
    Returns:
      (file bytes, size breakdown).
    """
    flat = flatten_tree(params)
    unknown = sorted(set(coding) - set(flat))
    if unknown:
        raise ValueError(f"coding names leaves not in params: {unknown}; leaves: {sorted(flat)}")
    meta_bytes = b""
    if meta:
        try:
            text = json.dumps(dict(meta), sort_keys=True, separators=(",", ":"))
            meta_bytes = text.encode("utf-8")
        except TypeError as err:
            raise ValueError(f"meta must be JSON-serializable: {err}") from None
    table, codebooks, streams, raws, sizes = [], [], [], [], []
    any_huffman = False
    for name, arr in flat.items():
        dtype = _dtype_code(name, arr)
        if name in coding:
            fields, cb, st, size = _encode_leaf(name, arr, coding[name])
            entry = _table_prefix(name, _KIND_CODED, dtype, arr.shape) + fields
            codebooks.append(cb)
            streams.append(st)
            any_huffman |= size.huffman_weights or size.huffman_index
        else:
            entry = _table_prefix(name, _KIND_RAW, dtype, arr.shape)
            raws.append(_raw_bytes(arr))
            size = LeafSize(
                name, "raw", tuple(arr.shape), int(arr.size), int(np.count_nonzero(arr)),
                raw_bytes=arr.dtype.itemsize * int(arr.size),
            )
        table.append(entry)
        sizes.append(dataclasses.replace(size, table_bytes=len(entry)))
    table_bytes = b"".join(table)
    payload = b"".join(codebooks) + b"".join(streams) + b"".join(raws)
    flags = (FLAG_HUFFMAN if any_huffman else 0) | (FLAG_META if meta_bytes else 0)
    header = _HEADER.pack(MAGIC, VERSION, flags, len(flat), len(coding), len(meta_bytes),
                          len(table_bytes), len(payload))
    body = header + meta_bytes + table_bytes + payload
    data = body + struct.pack("<I", zlib.crc32(body))
    info = CbxSizeInfo(
        total_bytes=len(data),
        header_bytes=HEADER_BYTES,
        meta_bytes=len(meta_bytes),
        table_bytes=len(table_bytes),
        payload_bytes=len(payload),
        crc_bytes=CRC_BYTES,
        leaves=tuple(sizes),
    )
    return data, info


def write_cbx(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    coding: Mapping[str, LeafCoding],
    meta: Mapping[str, Any] | None = None,
) -> CbxSizeInfo:
    """Encode with :func:`encode_cbx` and write atomically (temp file, then rename)."""
    data, info = encode_cbx(params, coding, meta)
    write_bytes_atomic(Path(path), data)
    return info


# ----------------------------------------------------------------------------- decode


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
    for start in range(0, count, _READ_CHUNK):
        stop = min(count, start + _READ_CHUNK)
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
    if flags & ~(_LEAF_HUFFMAN_WEIGHTS | _LEAF_HUFFMAN_INDEX) or b > _MAX_INDEX_BITS:
        raise CbxError(f"corrupt .cbx: leaf {name!r} has unknown flags {flags} or index_bits {b}")
    if (b == 0 and n_entries != numel) or n_entries > numel + numel:
        raise CbxError(f"corrupt .cbx: leaf {name!r} has {n_entries} entries for {numel} elements")
    huff_w, huff_i = bool(flags & _LEAF_HUFFMAN_WEIGHTS), bool(flags & _LEAF_HUFFMAN_INDEX)
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
    if k == 0 and (width != _RAW_WIDTH or huff_w):
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
    header = _HEADER.unpack_from(data)
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
    if flags & ~_KNOWN_FLAGS:
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
        if dtype not in _DTYPE_NAMES or kind not in (_KIND_RAW, _KIND_CODED):
            raise CbxError(f"corrupt .cbx: leaf {name!r} has unknown kind {kind} or dtype {dtype}")
        total_elements += math.prod(shape)
        if total_elements > MAX_ELEMENTS:
            raise CbxError(
                f"corrupt .cbx: leaf {name!r} of shape {tuple(shape)} takes the file beyond "
                f"{MAX_ELEMENTS:,} elements (the reader's limit)"
            )
        total_bytes += math.prod(shape) * (4 if kind == _KIND_CODED else _numpy_dtype(dtype).itemsize)
        if total_bytes > MAX_DECODED_BYTES:
            raise CbxError(
                f"corrupt .cbx: leaf {name!r} of shape {tuple(shape)} takes the decoded file beyond "
                f"{MAX_DECODED_BYTES:,} bytes (the reader's limit)"
            )
        fields = axes = None
        if kind == _KIND_CODED:
            fields = table.unpack(_CODED_FIELDS.format)
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
        + (f[3] if f[0] & _LEAF_HUFFMAN_WEIGHTS else 0)
        + ((1 << f[1]) if f[0] & _LEAF_HUFFMAN_INDEX and f[1] else 0)
        for *_, f, _ in coded
    )
    st_len = sum(_ceil8(f[6]) + _ceil8(f[7]) for *_, f, _ in coded)
    raw_len = sum(_numpy_dtype(e[1]).itemsize * math.prod(e[2]) for e in entries if e[3] is None)
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
            size = _numpy_dtype(dtype).itemsize * math.prod(shape)
            flat[name] = _raw_values(raw_cur.take(size), dtype, shape)
        else:
            values = _decode_leaf(name, shape, fields, axes, cb_cur, st_cur)
            flat[name] = _restore_dtype(values, dtype)
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
