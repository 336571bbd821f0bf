"""Sparse relative-index encoding (Deep Compression, Han et al. 2016, Sec. 2).

The positions of the nonzero weights are stored as gaps from the previous nonzero
in ``index_bits`` bits each; a gap too large for that width is bridged by filler
zeros, which cost one stored value each.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike

from coblax.compress.encode import BitstreamError

__all__ = ["RelativeIndex", "relative_index_encode", "relative_index_decode"]


@dataclasses.dataclass(frozen=True)
class RelativeIndex:
    """Stored entries of a sparse vector in Deep Compression's relative format.

    Attributes:
      gaps: zeros skipped before each entry, each in [0, 2^index_bits - 1].
      values: the entry's value (0 for fillers).
      n_fillers: entries inserted only to bridge a gap larger than 2^b - 1.
      index_bits: b.
    """

    gaps: np.ndarray
    values: np.ndarray
    n_fillers: int
    index_bits: int


def relative_index_encode(flat: ArrayLike, index_bits: int) -> RelativeIndex:
    """Encode the nonzeros of a 1-D array as (gap, value) entries with b-bit gaps.

    With positions p_0 < p_1 < ... of the nonzeros and p_{-1} = -1, the gap before
    p_i is G_i = p_i - p_{i-1} - 1. If G_i > 2^b - 1, floor(G_i / 2^b) filler
    entries (gap 2^b - 1, value 0) come first, each consuming 2^b positions, and
    the entry itself keeps gap G_i mod 2^b. Zeros after the last nonzero need no
    entry (the decoder knows the length).
    """
    if not isinstance(index_bits, (int, np.integer)) or not 1 <= index_bits <= 16:
        raise ValueError(f"index_bits must be an int in [1, 16], got {index_bits!r}")
    v = np.asarray(flat).ravel()
    pos = np.flatnonzero(v)
    span = 1 << int(index_bits)
    gaps = np.diff(pos, prepend=-1) - 1
    fillers = gaps // span
    n_entries = pos.size + int(fillers.sum())
    out_gaps = np.full(n_entries, span - 1, dtype=np.int64)
    out_vals = np.zeros(n_entries, dtype=v.dtype)
    # Entry i lands after its own fillers and everything before it.
    where = np.cumsum(fillers + 1) - 1
    out_gaps[where] = gaps % span
    out_vals[where] = v[pos]
    return RelativeIndex(out_gaps, out_vals, int(fillers.sum()), int(index_bits))


def relative_index_decode(gaps: ArrayLike, values: ArrayLike, size: int) -> np.ndarray:
    """Inverse of :func:`relative_index_encode`: scatter the entries into ``size`` zeros.

    Entry j sits at position sum_{i<=j} (gap_i + 1) - 1. Raises BitstreamError if an
    entry falls outside the array.
    """
    g = np.asarray(gaps, dtype=np.int64).ravel()
    vals = np.asarray(values).ravel()
    if g.size != vals.size:
        raise ValueError(f"gaps ({g.size}) and values ({vals.size}) must have the same length")
    if g.size and g.min() < 0:
        raise BitstreamError("negative gap in relative index")
    positions = np.cumsum(g + 1) - 1
    if positions.size and positions[-1] >= size:
        raise BitstreamError(f"relative index points at {positions[-1]}, past the end ({size})")
    out = np.zeros(size, dtype=vals.dtype)
    out[positions] = vals
    return out
