"""Encode a params tree to ``.cbx`` bytes (layout in :mod:`coblax.compress.cbx_format`).

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

from coblax.compress.cbx_format import (
    CODED_FIELDS,
    CRC_BYTES,
    FLAG_HUFFMAN,
    FLAG_META,
    HEADER,
    HEADER_BYTES,
    KIND_CODED,
    KIND_RAW,
    LEAF_HUFFMAN_INDEX,
    LEAF_HUFFMAN_WEIGHTS,
    MAGIC,
    MAX_CODEBOOK,
    RAW_WIDTH,
    VERSION,
    CbxSizeInfo,
    LeafCoding,
    LeafSize,
    dtype_code,
    raw_bytes,
)
from coblax.compress.encode import (
    BitWriter,
    coded_bits,
    huffman_code_lengths,
    huffman_encode,
    relative_index_encode,
)
from coblax.util import flatten_tree, write_bytes_atomic

__all__ = ["encode_cbx", "write_cbx"]

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


def _leaf_entries(name: str, arr: np.ndarray, coding: LeafCoding):
    """Axes, float32 values in storage order and relative-index entries of one coded leaf.

    Returns ``(axes, flat, gaps, values, n_fillers)``; with ``index_bits = 0`` every
    element is an entry and there are no gaps.
    """
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
        return axes, flat, ri.gaps, ri.values, ri.n_fillers
    return axes, flat, np.zeros(0, np.int64), flat, 0


def _encode_leaf(name: str, arr: np.ndarray, coding: LeafCoding):
    """Codec fields, codebook bytes, stream bytes and the size record of one coded leaf."""
    axes, flat, gaps, values, n_fillers = _leaf_entries(name, arr, coding)
    b = int(coding.index_bits)
    n_entries = int(values.size)
    if coding.codebook is None:
        codebook = np.zeros(0, np.float32)
        width = RAW_WIDTH
        symbols = values.view(np.uint32).astype(np.int64)
        w_lengths = None
        w_huff_bits = n_entries * width
    else:
        codebook = np.asarray(coding.codebook, dtype=np.float32)
        if np.any(values == 0) and not np.any(codebook == 0):
            codebook = np.append(codebook, np.float32(0.0))  # fillers / dense zeros need a code
        if codebook.size >= MAX_CODEBOOK:
            raise ValueError(
                f"leaf {name!r}: codebook has {codebook.size} entries, max {MAX_CODEBOOK - 1}"
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
    flags = (LEAF_HUFFMAN_WEIGHTS if coding.huffman_weights else 0) | (
        LEAF_HUFFMAN_INDEX if coding.huffman_index else 0
    )
    nnz = int(np.count_nonzero(flat))
    fields = CODED_FIELDS.pack(
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
        dtype = dtype_code(name, arr)
        if name in coding:
            fields, cb, st, size = _encode_leaf(name, arr, coding[name])
            entry = _table_prefix(name, KIND_CODED, dtype, arr.shape) + fields
            codebooks.append(cb)
            streams.append(st)
            any_huffman |= size.huffman_weights or size.huffman_index
        else:
            entry = _table_prefix(name, KIND_RAW, dtype, arr.shape)
            raws.append(raw_bytes(arr))
            size = LeafSize(
                name, "raw", tuple(arr.shape), int(arr.size), int(np.count_nonzero(arr)),
                raw_bytes=arr.dtype.itemsize * int(arr.size),
            )
        table.append(entry)
        sizes.append(dataclasses.replace(size, table_bytes=len(entry)))
    table_bytes = b"".join(table)
    payload = b"".join(codebooks) + b"".join(streams) + b"".join(raws)
    flags = (FLAG_HUFFMAN if any_huffman else 0) | (FLAG_META if meta_bytes else 0)
    header = HEADER.pack(MAGIC, VERSION, flags, len(flat), len(coding), len(meta_bytes),
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
