"""The ``.cbx`` file: a whole params tree with pruned, codebook-quantized, Huffman-coded kernels.

One import point for the three modules of the format: :mod:`coblax.compress.cbx_format`
(layout constants, :class:`LeafCoding`, size records, :class:`CbxError`),
:mod:`coblax.compress.cbx_encode` (:func:`encode_cbx`, :func:`write_cbx`) and
:mod:`coblax.compress.cbx_decode` (:func:`decode_cbx`, :func:`read_cbx`,
:func:`read_cbx_layout`). The byte-by-byte layout is in ``cbx_format``'s docstring and
``docs/compression.md``.

Reference: Han, Mao & Dally (2016) "Deep Compression", ICLR, Sec. 2-4.
"""

from __future__ import annotations

from coblax.compress.cbx_decode import decode_cbx, decoded_cap, read_cbx, read_cbx_layout
from coblax.compress.cbx_encode import encode_cbx, write_cbx
from coblax.compress.cbx_format import (
    CRC_BYTES,
    HEADER_BYTES,
    MAGIC,
    MAX_DECODED_BYTES,
    MAX_DECODED_RATIO,
    MAX_ELEMENTS,
    RATIO_FREE_BYTES,
    VERSION,
    CbxError,
    CbxSizeInfo,
    LeafCoding,
    LeafSize,
)

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
    "MAX_DECODED_RATIO",
    "RATIO_FREE_BYTES",
    "decoded_cap",
]
