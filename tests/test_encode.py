"""Bit packing, canonical Huffman and the relative sparse index against hand counts."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coblax.compress.encode import (
    BitReader,
    BitstreamError,
    BitWriter,
    canonical_codes,
    coded_bits,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
    relative_index_decode,
    relative_index_encode,
)


def optimal_prefix_bits(freqs) -> int:
    """Minimal total length of a prefix code: the sum of all merged weights (heapq)."""
    heap = [int(f) for f in freqs if f > 0]
    if len(heap) == 1:
        return heap[0]  # one symbol still costs one bit each
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def test_bitwriter_msb_first_and_padding():
    w = BitWriter()
    w.write(0b101, 3)
    w.write(0b1, 1)
    w.write(0xAB, 8)
    assert w.bit_length == 12
    # 1011 1010 1011 0000 (padded)
    assert w.getvalue() == bytes([0b10111010, 0b10110000])
    r = BitReader(w.getvalue(), 12)
    assert [r.read(3), r.read(1), r.read(8)] == [5, 1, 0xAB]
    assert r.remaining == 0
    with pytest.raises(BitstreamError):
        r.read(1)


def test_bitwriter_array_matches_scalar_writes():
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 32, size=100)
    a, b = BitWriter(), BitWriter()
    a.write_array(vals, 5)
    for v in vals:
        b.write(int(v), 5)
    assert a.getvalue() == b.getvalue() and a.bit_length == 500
    assert len(a.getvalue()) == 63  # ceil(500 / 8)
    np.testing.assert_array_equal(BitReader(a.getvalue(), 500).read_array(100, 5), vals)


def test_bitwriter_rejects_values_too_wide():
    with pytest.raises(ValueError, match="does not fit"):
        BitWriter().write(8, 3)
    with pytest.raises(ValueError):
        BitWriter().write_array([0, 4], 2)


def test_seed_huffman_example():
    """Seed: AAAAAAABCDDD -> A=0, D=10, B=110, C=111, 19 bits (vs 24 with 2-bit codes)."""
    text = "AAAAAAABCDDD"
    alphabet = "ABCD"
    syms = np.array([alphabet.index(c) for c in text])
    freqs = np.bincount(syms, minlength=4)
    lengths = huffman_code_lengths(freqs)
    assert dict(zip(alphabet, lengths.tolist(), strict=True)) == {"A": 1, "B": 3, "C": 3, "D": 2}
    codes = canonical_codes(lengths)
    as_str = {c: format(int(codes[i]), f"0{lengths[i]}b") for i, c in enumerate(alphabet)}
    assert as_str == {"A": "0", "D": "10", "B": "110", "C": "111"}
    w = huffman_encode(syms, lengths)
    assert w.bit_length == 19 == coded_bits(freqs, lengths)
    assert len(syms) * 2 == 24
    np.testing.assert_array_equal(huffman_decode(BitReader(w.getvalue(), 19), lengths, 12), syms)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=300), st.integers(41, 64))
def test_huffman_round_trip_and_optimal(symbols, alphabet_size):
    syms = np.array(symbols)
    freqs = np.bincount(syms, minlength=alphabet_size)
    lengths = huffman_code_lengths(freqs)
    w = huffman_encode(syms, lengths)
    assert w.bit_length == coded_bits(freqs, lengths) == optimal_prefix_bits(freqs)
    r = BitReader(w.getvalue(), w.bit_length)
    np.testing.assert_array_equal(huffman_decode(r, lengths, syms.size), syms)
    assert r.remaining == 0
    # Kraft equality: Huffman codes are complete (except the one-symbol case).
    used = lengths[lengths > 0]
    if used.size > 1:
        assert sum(2.0 ** -int(n) for n in used) == 1.0


def test_single_symbol_alphabet():
    syms = np.full(9, 3)
    lengths = huffman_code_lengths(np.bincount(syms, minlength=5))
    assert lengths.tolist() == [0, 0, 0, 1, 0]
    w = huffman_encode(syms, lengths)
    assert w.bit_length == 9
    np.testing.assert_array_equal(huffman_decode(BitReader(w.getvalue(), 9), lengths, 9), syms)


def test_huffman_decode_rejects_truncated_and_invalid():
    lengths = np.array([1, 2, 0])  # codes 0, 10; "11" is invalid
    with pytest.raises(BitstreamError, match="ended"):
        huffman_decode(BitReader(bytes([0b10000000]), 1), lengths, 1)
    with pytest.raises(BitstreamError, match="invalid"):
        huffman_decode(BitReader(bytes([0b11000000]), 2), lengths, 1)
    with pytest.raises(BitstreamError, match="Kraft"):
        canonical_codes([1, 1, 1])


def test_huffman_encode_rejects_symbol_without_code():
    with pytest.raises(ValueError, match="code length"):
        huffman_encode([0, 2], [1, 1, 0])


def test_relative_index_deep_compression_figure():
    """Han et al. Fig. 2 style, 3-bit gaps: a run of 12 zeros needs one filler."""
    flat = np.zeros(18)
    flat[[1, 4, 17]] = [3.4, 0.9, 1.7]
    ri = relative_index_encode(flat, 3)
    # gaps: 1 (pos 1), 2 (pos 4), then 12 zeros = filler (7 zeros + filler at pos 12) + gap 4.
    assert ri.gaps.tolist() == [1, 2, 7, 4]
    assert ri.values.tolist() == [3.4, 0.9, 0.0, 1.7]
    assert ri.n_fillers == 1
    np.testing.assert_array_equal(relative_index_decode(ri.gaps, ri.values, 18), flat)


@pytest.mark.parametrize("bits", [1, 2, 4, 5])
def test_relative_index_long_gaps_round_trip(bits):
    rng = np.random.default_rng(bits)
    flat = np.zeros(5000, dtype=np.float32)
    pos = np.sort(rng.choice(5000, size=40, replace=False))
    flat[pos] = rng.normal(size=40).astype(np.float32) + 10.0
    ri = relative_index_encode(flat, bits)
    span = 2**bits
    gaps = np.diff(pos, prepend=-1) - 1
    assert ri.n_fillers == int(np.sum(gaps // span))  # hand count of fillers
    assert ri.gaps.size == 40 + ri.n_fillers
    assert ri.gaps.max() <= span - 1
    assert np.count_nonzero(ri.values) == 40
    np.testing.assert_array_equal(relative_index_decode(ri.gaps, ri.values, 5000), flat)


def test_relative_index_edge_cases():
    empty = relative_index_encode(np.zeros(100), 4)
    assert empty.gaps.size == 0 and empty.n_fillers == 0
    decoded = relative_index_decode(empty.gaps, empty.values, 100)
    np.testing.assert_array_equal(decoded, np.zeros(100))
    dense = relative_index_encode(np.arange(1, 11), 2)
    assert dense.gaps.tolist() == [0] * 10 and dense.n_fillers == 0
    # Gap exactly 2^b - 1 fits without a filler; 2^b needs one.
    assert relative_index_encode(np.r_[np.zeros(15), 1.0], 4).n_fillers == 0
    assert relative_index_encode(np.r_[np.zeros(16), 1.0], 4).n_fillers == 1
    with pytest.raises(ValueError, match="index_bits"):
        relative_index_encode(np.ones(3), 0)
    with pytest.raises(BitstreamError, match="past the end"):
        relative_index_decode([3, 3], [1.0, 2.0], 7)


def _naive_decode(data: bytes, nbits: int, lengths, count: int) -> list[int]:
    """Reference: match the bit string against every code as text, symbol by symbol."""
    codes = canonical_codes(lengths)
    table = {format(int(c), f"0{int(n)}b"): s for s, (c, n) in enumerate(zip(codes, lengths, strict=True)) if n}
    bits = "".join(format(b, "08b") for b in data)[:nbits]
    out, pos = [], 0
    while len(out) < count:
        for n in range(1, int(max(lengths)) + 1):
            if bits[pos:pos + n] in table and pos + n <= nbits:
                out.append(table[bits[pos:pos + n]])
                pos += n
                break
    return out


@pytest.mark.parametrize(
    "freqs",
    [
        [5, 1, 1, 3, 0, 2],  # short codes
        [1] * 64,  # every code 6 bits: chains never resynchronize
        [2**i for i in range(24)],  # codes up to 23 bits: the searchsorted path
        list(range(1, 200)),
    ],
)
def test_huffman_decode_matches_reference_on_long_streams(freqs):
    rng = np.random.default_rng(len(freqs))
    p = np.asarray(freqs, float) / np.sum(freqs)
    syms = rng.choice(len(freqs), size=6000, p=p)
    lengths = huffman_code_lengths(np.bincount(syms, minlength=len(freqs)))
    w = huffman_encode(syms, lengths)
    w.write(0b1011, 4)  # trailing bits after the symbols are left unread
    data = w.getvalue()
    reader = BitReader(data, w.bit_length)
    got = huffman_decode(reader, lengths, syms.size)
    np.testing.assert_array_equal(got, syms)
    assert reader.remaining == 4 and reader.read(4) == 0b1011
    head = _naive_decode(data, w.bit_length, lengths, 300)
    assert got[:300].tolist() == head


def test_huffman_decode_is_vectorized():
    """Issue 7: decoding ran one Python iteration per bit. The Python-level work must
    not grow with the stream: count the lines executed in coblax.compress.encode."""
    import sys

    rng = np.random.default_rng(0)
    syms = rng.choice(32, size=100_000, p=rng.dirichlet(np.ones(32)))
    lengths = huffman_code_lengths(np.bincount(syms, minlength=32))
    w = huffman_encode(syms, lengths)
    data, nbits = w.getvalue(), w.bit_length
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if frame.f_code.co_filename.endswith("encode.py"):
            if event == "line":
                lines += 1
            return tracer
        return None

    sys.settrace(tracer)
    try:
        got = huffman_decode(BitReader(data, nbits), lengths, syms.size)
    finally:
        sys.settrace(None)
    np.testing.assert_array_equal(got, syms)
    assert nbits > 400_000
    assert lines < 40_000  # the per-bit loop executed > 10 lines per bit
