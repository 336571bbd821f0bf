"""Issue 22, "Done when": no crafted file makes coblax use more than 200 MB of memory per
MB of input, nor more than the documented cap (README, "Resource caps").

The worst shapes found (``benchmarks/bench_caps.py``): a sparse ``.cbx`` at the 64x
decoded-to-file ratio cap, and a dense Huffman-coded one (whose per-bit decoding
temporaries used to reach 360 MB per MB of file). Each is evaluated in a fresh
subprocess and its peak RSS growth read from ``/proc/self/status`` (``VmHWM``, reset
just before the call) -- ``resource.getrusage`` cannot be used as such here, since Linux
carries pytest's own peak into the child; the child's ``getrusage`` is reported too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from crafted import write_mlp_cbx

from coblax.compress import encode as E
from coblax.compress.cbx import MAX_DECODED_RATIO, CbxError, decoded_cap, read_cbx

REPO = Path(__file__).resolve().parents[1]
MB_PER_MB = 200


def _peak_growth(call: str) -> dict:
    script = textwrap.dedent(f"""
        import json, resource
        from coblax.app.cli import main
        from coblax.compress.cbx import read_cbx
        def hwm():
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = hwm()
        result = {call}
        print(json.dumps({{"grew_mb": (hwm() - before) / 1024, "result": str(result),
                          "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", ["sparse", "huffman"])
def test_evaluate_worst_shape_within_200_mb_per_mb(tmp_path, shape):
    """``coblax evaluate`` of the worst-shaped file (~2 MiB, ~0.1 GB decoded) grows the
    process by at most 200 MB per MB of file, everything counted (the runtime's fixed
    ~75 MB included), and by at most the README's cap 2 x decoded + 100 MB."""
    path = tmp_path / f"{shape}.cbx"
    decoded = write_mlp_cbx(path, 420_000 if shape == "sparse" else 240_000,
                            dense_values=4 if shape == "huffman" else 0)
    file_mb = path.stat().st_size / 2**20
    assert decoded <= decoded_cap(path.stat().st_size)  # accepted: the shape is at the cap's edge
    if shape == "sparse":
        assert decoded > 0.85 * MAX_DECODED_RATIO * path.stat().st_size
    row = _peak_growth(f"main(['evaluate', {str(path)!r}])")
    assert row["result"] == "0", row
    assert row["grew_mb"] <= MB_PER_MB * file_mb, (row, file_mb)
    assert row["grew_mb"] <= 2 * decoded / 1e6 + 100, (row, decoded)


def test_cbx_beyond_the_ratio_cap_refused(tmp_path):
    """One more nonzero-free stretch than the 64x ratio allows: refused before decoding."""
    path = tmp_path / "over.cbx"
    decoded = write_mlp_cbx(path, 100_000, every=12)
    assert decoded > MAX_DECODED_RATIO * path.stat().st_size
    with pytest.raises(CbxError, match=r"64 x the file size"):
        read_cbx(path)


def test_cbx_leaves_decoded_aligned_in_place(tmp_path):
    """Decoded leaves are 64-byte aligned and C-contiguous (so JAX's CPU client wraps them
    without a copy), equal to what was written, transposed axes included."""
    from coblax.compress.cbx import LeafCoding, write_cbx

    rng = np.random.default_rng(0)
    kernel = np.where(rng.random((30, 7)) < 0.3, 0.5, 0.0).astype(np.float32)
    dense = np.where(rng.random((5, 6)) < 0.5, 0.5, -0.25).astype(np.float32)
    cb = np.array([-0.25, 0.0, 0.5], np.float32)
    coding = {"a/k": LeafCoding(cb, index_bits=3, axes=(1, 0)),
              "a/d": LeafCoding(cb, index_bits=0, huffman_index=False, axes=(1, 0))}
    write_cbx(tmp_path / "t.cbx", {"a": {"k": kernel, "d": dense, "b": np.arange(3.0)}}, coding)
    tree, _ = read_cbx(tmp_path / "t.cbx")
    for leaf, want in (("k", kernel), ("d", dense), ("b", np.arange(3.0))):
        got = tree["a"][leaf]
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype and got.flags["C_CONTIGUOUS"] and got.ctypes.data % 64 == 0


@pytest.mark.parametrize("span", [64, 97, 1 << 21])
def test_huffman_decode_in_spans_equals_whole(monkeypatch, span):
    """Decoding in spans of ``span`` bits gives the symbols of one pass, and the same errors."""
    rng = np.random.default_rng(1)
    syms = np.minimum(rng.geometric(0.4, 5000) - 1, 11)
    lengths = E.huffman_code_lengths(np.bincount(syms, minlength=12))
    w = E.huffman_encode(syms, lengths)
    monkeypatch.setattr(E, "_SPAN_BITS", span)
    r = E.BitReader(w.getvalue(), w.bit_length)
    np.testing.assert_array_equal(E.huffman_decode(r, lengths, syms.size), syms)
    assert r.remaining == 0
    with pytest.raises(E.BitstreamError, match=f"stream ended inside symbol {syms.size}"):
        E.huffman_decode(E.BitReader(w.getvalue(), w.bit_length), lengths, syms.size + 1)
    cut = w.bit_length - int(lengths[syms[-1]]) + 1  # the last code loses its last bit
    with pytest.raises(E.BitstreamError, match=f"stream ended inside symbol {syms.size - 1}"):
        E.huffman_decode(E.BitReader(w.getvalue(), cut), lengths, syms.size)
