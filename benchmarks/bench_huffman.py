"""Benchmark: table-driven, vectorized Huffman decoding vs. the former per-bit Python loop.

Codes a stream of N symbols (default 10^6, drawn from a skewed distribution over 64
symbols, like k-means weight codes), decodes it with ``coblax.compress.encode.huffman_decode``
and with the reference decoder below (the library's decoder before issue 7: one
Python iteration per bit over a byte-per-bit copy of the stream), checks that both
give the symbols back and prints both times and their ratio, measured in this run.
Usage (from the repository root, so that this checkout's coblax is imported):
    PYTHONPATH=. python benchmarks/bench_huffman.py [--n 1000000] [--symbols 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from coblax.compress.encode import (
    BitReader,
    BitstreamError,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
)


def reference_decode(data: bytes, bit_length: int, lengths: np.ndarray, count: int) -> np.ndarray:
    """The former decoder: canonical decoding bit by bit in Python (kept here as reference)."""
    lens = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(count, dtype=np.int64)
    present = np.flatnonzero(lens > 0)
    ordered = sorted(present.tolist(), key=lambda s: (lens[s], s))
    top = int(lens.max())
    n_of_len = np.bincount(lens[present], minlength=top + 1).tolist()
    first_code, first_index = [0] * (top + 1), [0] * (top + 1)
    code = index = 0
    for length in range(1, top + 1):
        code = (code + n_of_len[length - 1]) << 1 if length > 1 else 0
        first_code[length], first_index[length] = code, index
        index += n_of_len[length]
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:bit_length].tolist()
    pos, nbits = 0, len(bits)
    for i in range(count):
        code, length = 0, 0
        while True:
            if pos >= nbits:
                raise BitstreamError(f"stream ended inside symbol {i} of {count}")
            code = (code << 1) | bits[pos]
            pos += 1
            length += 1
            offset = code - first_code[length]
            if offset < n_of_len[length]:
                out[i] = ordered[first_index[length] + offset]
                break
            if length >= top:
                raise BitstreamError(f"invalid Huffman code at symbol {i}")
    return out


def _best(fn, repeats: int) -> tuple[float, float]:
    """Best wall-clock and best CPU (process) time of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000, help="symbols in the stream")
    ap.add_argument("--symbols", type=int, default=64, help="alphabet size")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(args.symbols, 0.5))
    syms = rng.choice(args.symbols, size=args.n, p=p)
    lengths = huffman_code_lengths(np.bincount(syms, minlength=args.symbols))
    writer = huffman_encode(syms, lengths)
    data, nbits = writer.getvalue(), writer.bit_length

    new = huffman_decode(BitReader(data, nbits), lengths, args.n)
    old = reference_decode(data, nbits, lengths, args.n)
    assert np.array_equal(new, syms) and np.array_equal(old, syms), "round trip failed"
    t_new = _best(lambda: huffman_decode(BitReader(data, nbits), lengths, args.n), args.repeats)
    t_old = _best(lambda: reference_decode(data, nbits, lengths, args.n), 1)
    print(f"{args.n:,} symbols, {nbits:,} bits ({nbits / args.n:.2f} bits/symbol), "
          f"longest code {int(lengths.max())} bits")
    print(f"per-bit Python loop (before): {t_old[0]:.3f} s wall, {t_old[1]:.3f} s CPU")
    print(f"table-driven, vectorized:     {t_new[0]:.3f} s wall, {t_new[1]:.3f} s CPU")
    print(f"speed-up: {t_old[0] / t_new[0]:.1f}x wall, {t_old[1] / t_new[1]:.1f}x CPU")


if __name__ == "__main__":
    main()
