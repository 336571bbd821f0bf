"""Lossless encoding for compressed weights: bit packing, canonical Huffman, relative index.

Three pieces, each a pure function (plus a tiny bit writer/reader):

* :class:`BitWriter` / :class:`BitReader` pack integers MSB-first into bytes; the
  last byte is padded with zero bits.
* Canonical Huffman coding (Huffman 1952). Code lengths come from the Huffman
  algorithm on symbol frequencies; codes are assigned canonically (shorter codes
  first, ties by symbol), so a codebook is fully described by its code lengths.
  The coded length of a message with frequencies f_s is sum_s f_s * len_s, the
  minimum over all prefix codes.
* Deep Compression's relative sparse index (Han et al. 2016, Sec. 2 and Fig. 2):
  every stored entry carries the gap (number of zeros) since the previous entry in
  a fixed width of b bits. A gap larger than 2^b - 1 is bridged by "filler" entries:
  each filler skips 2^b - 1 zeros and stores a zero weight at the next position.

Reference: Huffman, D. (1952) "A Method for the Construction of Minimum-Redundancy
Codes"; Han, Mao & Dally (2016) "Deep Compression", ICLR.
"""

from __future__ import annotations

import heapq

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "BitWriter",
    "BitReader",
    "BitstreamError",
    "huffman_code_lengths",
    "canonical_codes",
    "huffman_encode",
    "huffman_decode",
    "coded_bits",
]

# The sparse relative-index code has its own module; its names stay importable here.


class BitstreamError(ValueError):
    """A bit stream that cannot be decoded: read past its end or an invalid code."""


# ---------------------------------------------------------------------------- bit I/O


class BitWriter:
    """Accumulate bits MSB-first; :meth:`getvalue` returns them packed into bytes."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._nbits = 0

    @property
    def bit_length(self) -> int:
        """Number of bits written so far (before padding to a whole byte)."""
        return self._nbits

    def write(self, value: int, nbits: int) -> None:
        """Append the ``nbits`` low bits of the non-negative int ``value``, MSB first."""
        if nbits < 0:
            raise ValueError(f"nbits must be >= 0, got {nbits}")
        if value < 0 or value >> nbits:
            raise ValueError(f"value {value} does not fit in {nbits} unsigned bits")
        if nbits == 0:
            return
        bits = np.array([(value >> (nbits - 1 - i)) & 1 for i in range(nbits)], dtype=np.uint8)
        self.write_bits(bits)

    def write_array(self, values: ArrayLike, nbits: int) -> None:
        """Append every value of ``values`` in a fixed width of ``nbits`` bits (vectorized)."""
        v = np.asarray(values, dtype=np.int64).ravel()
        if not 0 <= nbits <= 62:
            raise ValueError(f"nbits must be in [0, 62], got {nbits}")
        if v.size and (v.min() < 0 or v.max() >> nbits):
            raise ValueError(f"values must lie in [0, 2**{nbits} - 1]")
        if nbits == 0 or v.size == 0:
            return
        shifts = np.arange(nbits - 1, -1, -1, dtype=np.int64)
        self.write_bits(((v[:, None] >> shifts) & 1).astype(np.uint8).ravel())

    def write_bits(self, bits: ArrayLike) -> None:
        """Append raw bits (an array of 0/1)."""
        b = np.asarray(bits, dtype=np.uint8).ravel()
        if b.size and b.max() > 1:
            raise ValueError("bits must be 0 or 1")
        self._chunks.append(b)
        self._nbits += int(b.size)

    def getvalue(self) -> bytes:
        """The bits packed MSB-first into ceil(bit_length / 8) bytes, zero padded."""
        if not self._chunks:
            return b""
        return np.packbits(np.concatenate(self._chunks)).tobytes()


class BitReader:
    """Read MSB-first bits from ``data``; ``bit_length`` limits the readable bits.

    The bytes are kept packed; reads unpack only the bytes they touch.
    """

    def __init__(self, data: bytes, bit_length: int | None = None) -> None:
        self._data = np.frombuffer(bytes(data), dtype=np.uint8)
        total = 8 * int(self._data.size)
        if bit_length is None:
            bit_length = total
        if not 0 <= bit_length <= total:
            raise BitstreamError(
                f"bit_length {bit_length} exceeds the {total} bits of data"
            )
        self._end = int(bit_length)
        self._pos = 0

    @property
    def position(self) -> int:
        """Bits consumed so far."""
        return self._pos

    @property
    def remaining(self) -> int:
        """Bits left before ``bit_length``."""
        return self._end - self._pos

    def _take(self, n: int) -> np.ndarray:
        if n < 0:
            raise ValueError(f"nbits must be >= 0, got {n}")
        if n > self.remaining:
            raise BitstreamError(
                f"read of {n} bits past the end of the stream ({self.remaining} left)"
            )
        first = self._pos // 8
        skip = self._pos - 8 * first
        out = np.unpackbits(self._data[first : (self._pos + n + 7) // 8])[skip : skip + n]
        self._pos += n
        return out

    def read(self, nbits: int) -> int:
        """Read one unsigned integer of ``nbits`` bits."""
        value = 0
        for bit in self._take(nbits).tolist():
            value = (value << 1) | bit
        return value

    def read_array(self, count: int, nbits: int) -> np.ndarray:
        """Read ``count`` unsigned integers of ``nbits`` bits each (vectorized), as int64."""
        if not 0 <= nbits <= 62:
            raise ValueError(f"nbits must be in [0, 62], got {nbits}")
        bits = self._take(count * nbits).astype(np.int64).reshape(count, nbits)
        weights = np.left_shift(np.int64(1), np.arange(nbits - 1, -1, -1, dtype=np.int64))
        return bits @ weights if nbits else np.zeros(count, dtype=np.int64)


# --------------------------------------------------------------------------- Huffman


def huffman_code_lengths(frequencies: ArrayLike) -> np.ndarray:
    """Huffman code length of every symbol from its frequency.

    Repeatedly merges the two least frequent subtrees (ties broken by creation
    order, so the result is deterministic); a symbol's code length is its depth.
    Symbols with frequency 0 get length 0 (absent). A single present symbol gets
    length 1 so that every stored symbol costs at least one bit.

    Args:
      frequencies: non-negative counts, indexed by symbol (length K).
    Returns:
      int64 array of K code lengths; sum f_s * len_s is minimal among prefix codes.
    """
    freqs = np.asarray(frequencies)
    if freqs.ndim != 1:
        raise ValueError(f"frequencies must be 1-D, got shape {freqs.shape}")
    if freqs.size and (not np.all(np.isfinite(freqs)) or freqs.min() < 0):
        raise ValueError("frequencies must be finite and >= 0")
    lengths = np.zeros(freqs.size, dtype=np.int64)
    present = np.flatnonzero(freqs > 0)
    if present.size == 1:
        lengths[present] = 1
    if present.size <= 1:
        return lengths
    # Nodes 0..n-1 are the leaves, n.. the merged ones; parent pointers give depths.
    n = int(present.size)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    heap: list[tuple[float, int]] = [(float(freqs[s]), i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    for node in range(n, 2 * n - 1):
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))  # node ids increase: ties break by creation
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(2 * n - 3, -1, -1):  # parents have larger ids than children
        depth[node] = depth[parent[node]] + 1
    lengths[present] = depth[:n]
    return lengths


def _check_lengths(lengths: ArrayLike) -> np.ndarray:
    lens = np.asarray(lengths, dtype=np.int64).ravel()
    if lens.size and lens.min() < 0:
        raise ValueError("code lengths must be >= 0")
    if lens.size and lens.max() > 62:
        raise ValueError(f"code lengths must be <= 62, got {lens.max()}")
    # Kraft: a prefix code with these lengths exists iff sum 2^-len <= 1.
    used = lens[lens > 0].tolist()
    if used:
        top = max(used)
        if sum(1 << (top - n) for n in used) > (1 << top):
            raise BitstreamError("code lengths violate the Kraft inequality")
    return lens


def canonical_codes(lengths: ArrayLike) -> np.ndarray:
    """Canonical Huffman codes for the given code lengths.

    Symbols are ordered by (length, symbol); the first gets code 0 and each next
    code is the previous plus one, shifted left when the length grows (DEFLATE,
    RFC 1951 Sec. 3.2.2). Returns int64 codes (0 for absent symbols).
    """
    lens = _check_lengths(lengths)
    codes = np.zeros(lens.size, dtype=np.int64)
    code, prev_len = 0, 0
    for s in sorted(np.flatnonzero(lens > 0).tolist(), key=lambda s: (lens[s], s)):
        code <<= int(lens[s]) - prev_len
        codes[s] = code
        code += 1
        prev_len = int(lens[s])
    return codes


def coded_bits(frequencies: ArrayLike, lengths: ArrayLike) -> int:
    """Length in bits of a message with these symbol frequencies: sum_s f_s * len_s."""
    f = np.asarray(frequencies, dtype=np.int64)
    return int(np.sum(f * np.asarray(lengths, dtype=np.int64)))


def huffman_encode(
    symbols: ArrayLike, lengths: ArrayLike, writer: BitWriter | None = None
) -> BitWriter:
    """Append the canonical codes of ``symbols`` to ``writer`` (a new one if None).

    Every symbol must have a positive code length. Vectorized: each symbol's code
    is expanded to its bits through a (K, max_len) table.
    """
    writer = BitWriter() if writer is None else writer
    lens = _check_lengths(lengths)
    sym = np.asarray(symbols, dtype=np.int64).ravel()
    if sym.size == 0:
        return writer
    if sym.min() < 0 or sym.max() >= lens.size or np.any(lens[sym] == 0):
        raise ValueError("every symbol must be in range and have a positive code length")
    codes = canonical_codes(lens)
    top = int(lens.max())
    # Left-align each code in `top` bits; then keep the first len_s bits of each row.
    shifts = np.arange(top - 1, -1, -1, dtype=np.int64)
    table = ((np.left_shift(codes, top - lens)[:, None] >> shifts) & 1).astype(np.uint8)
    keep = np.arange(top)[None, :] < lens[sym][:, None]
    writer.write_bits(table[sym][keep])
    return writer


def _windows(data: np.ndarray, start: int, nbits: int, width: int) -> np.ndarray:
    """The ``width`` bits from every bit position p in [start, start + nbits), as uint64.

    MSB first; bits past the end of ``data`` read as 0. Built from big-endian words
    at every byte offset (``width`` <= 57) or bit by bit (wider), without Python
    loops over positions.
    """
    if nbits == 0:
        return np.zeros(0, dtype=np.uint64)
    first, last = start // 8, (start + nbits + 7) // 8
    chunk = data[first:last]
    off = start - 8 * first
    if width > 57:
        bits = np.concatenate([np.unpackbits(chunk), np.zeros(width, np.uint8)]).astype(np.uint64)
        win = np.zeros(nbits, dtype=np.uint64)
        for k in range(width):
            win = (win << np.uint64(1)) | bits[off + k : off + k + nbits]
        return win
    n = chunk.size
    nbytes = (width + 7 + 7) // 8  # bytes that hold `width` bits at any bit offset
    buf = np.zeros(n + nbytes, dtype=np.uint64)
    buf[:n] = chunk
    words = np.zeros(n, dtype=np.uint64)
    for k in range(nbytes):  # big-endian word of `nbytes` bytes starting at every byte
        words = (words << np.uint64(8)) | buf[k : k + n]
    shifts = np.uint64(8 * nbytes - width) - np.arange(8, dtype=np.uint64)
    mask = np.uint64((1 << width) - 1)
    win = ((words[:, None] >> shifts[None, :]) & mask).ravel()
    return win[off : off + nbits]


def _follow(nxt: np.ndarray, nbits: int, width: int, block: int = 4096, sync: int = 24
            ) -> np.ndarray:
    """Positions 0 = p_0 < p_1 < ... with p_{i+1} = nxt[p_i], while p_i < nbits.

    ``nxt`` maps a bit position to the start of the next code (nbits: end of
    stream, nbits + 1: error; both absorbing). Vectorized over blocks of ``block``
    bits: (1) from each of the first ``width`` positions of every block -- the true
    chain enters each block at one of them, since no code is longer than
    ``width`` -- the chains are followed to the block's end, all at once; after
    ``sync`` steps the chains that have merged (Huffman codes resynchronize within
    a few symbols) are followed only once; (2) a walk over the blocks picks each
    block's true entry from the previous block's exit, and the chains from those
    entries are followed again, recording their positions.
    """
    n_blocks = -(-nbits // block)
    ends = np.minimum((np.arange(n_blocks, dtype=np.int64) + 1) * block, nbits)
    entries = np.zeros(n_blocks, dtype=np.int64)
    reached = 1
    if n_blocks > 1:
        starts = np.arange(n_blocks, dtype=np.int64)[:, None] * block + np.arange(width)[None, :]
        pos = np.minimum(starts, nbits).ravel()
        end = np.repeat(ends, width)
        for _ in range(sync):
            pos = np.where(pos < end, nxt[pos], pos)
        # merged chains: follow each distinct (block, position) once
        keys, inverse = np.unique(end * (nbits + 2) + pos, return_inverse=True)
        upos, uend = keys % (nbits + 2), keys // (nbits + 2)
        while True:
            active = upos < uend
            if not active.any():
                break
            upos = np.where(active, nxt[upos], upos)
        exits = upos[inverse.ravel()].reshape(n_blocks, width).tolist()
        e = 0
        for j in range(n_blocks - 1):
            e = exits[j][e - j * block]
            if e >= nbits:
                break
            entries[j + 1] = e
            reached = j + 2
    ends = ends[:reached]
    pos = entries[:reached]
    visited = []
    while True:
        active = pos < ends
        if not active.any():
            break
        visited.append(np.where(active, pos, -1))
        pos = np.where(active, nxt[pos], pos)
    if not visited:
        return np.zeros(0, dtype=np.int64)
    chain = np.stack(visited, axis=1).ravel()
    return chain[chain >= 0]


_TABLE_BITS = 20  # decode through a 2^L lookup table up to this code length


def huffman_decode(reader: BitReader, lengths: ArrayLike, count: int) -> np.ndarray:
    """Decode ``count`` symbols coded with the canonical code of ``lengths``.

    Table-driven and vectorized. With L the longest code, the L bits from every
    position of the stream are read as one integer w (a left-aligned code). The
    canonical codes of each length are consecutive integers and shorter codes come
    first, so the code at a position is found from w alone: through a table of
    2^L (length, symbol) entries for L <= 20, else as the smallest length l with
        w < limit[l] = (first_code[l] + count[l]) << (L - l)
    (``searchsorted``) and the ((w >> (L - l)) - first_code[l])-th length-l symbol.
    The positions where codes really start are then followed from bit 0
    (:func:`_follow`). Raises BitstreamError on an invalid code or a read past the
    end.

    The per-bit arrays take ~25 bytes per bit of stream, so a long stream is decoded
    in spans of :data:`_SPAN_BITS` bits (a span ends before the first code that
    crosses its end, where the next one starts): the temporaries stay below ~15 MB
    whatever the stream's length.
    """
    lens = _check_lengths(lengths)
    out = np.zeros(count, dtype=np.int64)
    if count == 0:
        return out
    present = np.flatnonzero(lens > 0)
    if present.size == 0:
        raise BitstreamError("cannot decode symbols with an empty code")
    code = _code_tables(lens, present)
    done = 0
    while done < count:
        span = min(reader.remaining, _SPAN_BITS)
        last = span == reader.remaining
        symbols, used = _decode_span(reader._data, reader._pos, span, code, count - done, last, done, count)
        out[done:done + symbols.size] = symbols
        done += symbols.size
        reader._pos += used
    return out


_SPAN_BITS = 1 << 19


def _code_tables(lens: np.ndarray, present: np.ndarray) -> dict:
    """The lookup structures of the canonical code of ``lens`` (see :func:`huffman_decode`)."""
    ordered = np.array(sorted(present.tolist(), key=lambda s: (lens[s], s)), dtype=np.int64)
    top = int(lens.max())
    code = {"ordered": ordered, "top": top}
    if top <= _TABLE_BITS:
        # entries [c << (L - l), (c + 1) << (L - l)) decode to the symbol of code c
        span = np.left_shift(1, top - lens[ordered])
        tab_len = np.zeros(1 << top, dtype=np.int8)
        tab_sym = np.zeros(1 << top, dtype=np.int64)
        used = int(span.sum())
        tab_len[:used] = np.repeat(lens[ordered], span)
        tab_sym[:used] = np.repeat(ordered, span)
        code.update(tab_len=tab_len, tab_sym=tab_sym)
    else:
        n_of_len = np.bincount(lens[present], minlength=top + 1)
        first_code, first_index = np.zeros(top + 1, np.int64), np.zeros(top + 1, np.int64)
        c = index = 0
        for ln in range(1, top + 1):
            c = (c + int(n_of_len[ln - 1])) << 1 if ln > 1 else 0
            first_code[ln], first_index[ln] = c, index
            index += int(n_of_len[ln])
        limits = np.array([(int(first_code[ln]) + int(n_of_len[ln])) << (top - ln)
                           for ln in range(1, top + 1)], dtype=np.uint64)
        code.update(first_code=first_code, first_index=first_index, limits=limits)
    return code


def _decode_span(data: np.ndarray, start: int, nbits: int, code: dict, want: int, last: bool,
                 done: int, count: int) -> tuple[np.ndarray, int]:
    """Up to ``want`` symbols from bits [start, start + nbits): (symbols, bits used).

    In the stream's ``last`` span every symbol must be there; in an earlier one the
    span stops before the first code that does not fit in it.
    """
    top = code["top"]
    win = _windows(data, start, nbits, top)
    if "tab_len" in code:
        length = code["tab_len"][win]
    else:
        slot = np.searchsorted(code["limits"], win, side="right")  # length - 1; top: invalid
        length = np.where(slot < top, slot + 1, 0)
        del slot
    ok = length > 0
    pos_t = np.int32 if nbits < 2**31 - 2 else np.int64
    # Near the end: a code needing bits past the end, or no code in what is left.
    tail = np.arange(max(nbits - top, 0), nbits)
    left = nbits - tail
    ended = np.zeros(nbits, dtype=bool)
    ended[tail] = (length[tail] > left) | (~ok[tail] & (left < top))
    ok &= ~ended
    nxt = np.empty(nbits + 2, dtype=pos_t)
    nxt[:nbits] = np.where(ok, np.arange(nbits, dtype=pos_t) + length, nbits + 1)
    nxt[nbits], nxt[nbits + 1] = nbits, nbits + 1
    chain = _follow(nxt, nbits, top)[:want]
    del nxt
    bad = np.flatnonzero(~ok[chain])
    if bad.size:
        i = int(bad[0])
        if not ended[chain[i]]:
            raise BitstreamError(f"invalid Huffman code at symbol {done + i}")
        if last:
            raise BitstreamError(f"stream ended inside symbol {done + i} of {count}")
        chain = chain[:i]  # the next span starts at the code that did not fit
        stop = int(chain[-1] + length[chain[-1]]) if i else 0
    elif chain.size < want and last:
        raise BitstreamError(f"stream ended inside symbol {done + chain.size} of {count}")
    else:
        stop = int(chain[-1] + length[chain[-1]]) if chain.size else 0
    if not chain.size and not last:
        raise BitstreamError(f"no Huffman code fits {nbits} bits at symbol {done}")
    lc = length[chain].astype(np.int64)
    if "tab_sym" in code:
        symbols = code["tab_sym"][win[chain]]
    else:
        offsets = (win[chain] >> (top - lc).astype(np.uint64)).astype(np.int64) - code["first_code"][lc]
        symbols = code["ordered"][code["first_index"][lc] + offsets]
    return symbols, stop


# ------------------------------------------------------------------ relative index


# The sparse relative-index code lives in coblax.compress.relative_index (which raises
# this module's BitstreamError); its names are resolved here on first use, so that the
# two modules import each other without a cycle.
_RELATIVE = ("RelativeIndex", "relative_index_encode", "relative_index_decode")


def __getattr__(name: str):
    if name in _RELATIVE:
        from coblax.compress import relative_index

        return getattr(relative_index, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
