"""The ``.cbx`` format: layout constants, leaf types and dtype codes.

A ``.cbx`` file is a whole params tree with pruned, codebook-quantized, Huffman-coded kernels.
The encoder is :mod:`coblax.compress.cbx_encode`, the decoder :mod:`coblax.compress.cbx_decode`;
:mod:`coblax.compress.cbx` exports both.

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
import struct

import numpy as np

from coblax.util.bits import ceil_bytes as _ceil8
from coblax.util.errors import CoblaxError

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_BYTES",
    "CRC_BYTES",
    "CbxError",
    "LeafCoding",
    "LeafSize",
    "CbxSizeInfo",
    "MAX_ELEMENTS",
    "MAX_DECODED_BYTES",
    "MAX_DECODED_RATIO",
    "RATIO_FREE_BYTES",
]

MAGIC = b"\x89CBX\r\n\x1a\n"  # PNG-style: catches 7-bit and newline-mangling transfers
VERSION = 1
# magic, version, flags, n_leaves, n_coded, meta_len, table_len, payload_len
HEADER = struct.Struct("<8sHHIIIIQ")
HEADER_BYTES = HEADER.size  # 36
CRC_BYTES = 4
# flags, index_bits, weight width, K, nnz, entries, weight-stream bits, index-stream bits
CODED_FIELDS = struct.Struct("<BBBIQQQQ")

FLAG_HUFFMAN = 1  # header: at least one stream is Huffman coded
FLAG_META = 2  # header: a metadata block is present
KNOWN_FLAGS = FLAG_HUFFMAN | FLAG_META
LEAF_HUFFMAN_WEIGHTS, LEAF_HUFFMAN_INDEX = 1, 2
KIND_RAW, KIND_CODED = 0, 1
RAW_WIDTH = 32  # weight_width of a coded leaf without codebook: float32 bit patterns
MAX_INDEX_BITS = 16
MAX_CODEBOOK = 1 << 16
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
#: Most decoded bytes per byte of the file, for a file decoding to more than
#: :data:`RATIO_FREE_BYTES`. The absolute cap still let a 3 KB file of sparse
#: leaves (one 17-bit filler entry per 65,536 zeros) decode to 256 MiB; with this,
#: evaluating a file costs at most ~130 MB per MB of file beyond the fixed cost
#: (README, "Resource caps"). Deep Compression reaches 35-49x on whole networks
#: (Han et al. 2016, Table 1), well below it.
MAX_DECODED_RATIO = 64
#: Decoded bytes a file may always have, whatever its ratio (tiny models and
#: all-zero test leaves compress beyond 64x, and 1 MiB costs nothing to decode).
RATIO_FREE_BYTES = 1 << 20
#: Entries read from a fixed-width stream per step: bounds the bit-unpacking
#: temporary (8 bytes per bit) whatever the leaf's size.
READ_CHUNK = 1 << 20

DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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
        if not isinstance(b, (int, np.integer)) or not 0 <= b <= MAX_INDEX_BITS:
            raise ValueError(
                f"index_bits must be an int in [0, {MAX_INDEX_BITS}], got {self.index_bits!r}"
            )
        if self.codebook is None and self.huffman_weights:
            raise ValueError("huffman_weights=True needs a codebook (got codebook=None)")
        if self.index_bits == 0 and self.huffman_index:
            raise ValueError("huffman_index=True needs index_bits > 0 (dense layout has no index)")
        if self.codebook is not None:
            cb = np.asarray(self.codebook)
            if cb.ndim != 1 or not 1 <= cb.size < MAX_CODEBOOK:
                raise ValueError(
                    f"codebook must be 1-D with 1..{MAX_CODEBOOK - 1} entries, got shape "
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


def dtype_code(name: str, arr: np.ndarray) -> int:
    if arr.dtype.name not in DTYPES:
        raise ValueError(
            f"leaf {name!r} has dtype {arr.dtype.name}; .cbx stores {', '.join(DTYPES)}"
        )
    return DTYPES[arr.dtype.name]


def numpy_dtype(code: int) -> np.dtype:
    name = DTYPE_NAMES[code]
    if name == "bfloat16":
        import ml_dtypes  # a jax dependency; imported lazily as only bfloat16 needs it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def restore_dtype(values: np.ndarray, code: int) -> np.ndarray:
    return values.astype(numpy_dtype(code))


def raw_bytes(arr: np.ndarray) -> bytes:
    """A raw leaf's values in its own dtype, little-endian, C order."""
    n = arr.dtype.itemsize
    return np.ascontiguousarray(arr).view(f"u{n}").astype(f"<u{n}").tobytes()


def raw_values(data: bytes, code: int, shape: tuple[int, ...]) -> np.ndarray:
    dtype = numpy_dtype(code)
    n = dtype.itemsize
    return np.frombuffer(data, dtype=f"<u{n}").astype(f"u{n}").view(dtype).reshape(shape)
