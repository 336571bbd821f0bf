"""The .cbx file: exact round trip, the documented size equation, and corruption errors."""

from __future__ import annotations

import heapq
import math
import struct
import zlib

import numpy as np
import pytest

from coblax.compress.cbx import (
    CRC_BYTES,
    HEADER_BYTES,
    MAGIC,
    CbxError,
    LeafCoding,
    decode_cbx,
    encode_cbx,
    read_cbx,
    write_cbx,
)


def optimal_bits(symbols) -> int:
    """Minimal prefix-code length of a message (sum of Huffman merge weights)."""
    heap = [int(c) for c in np.bincount(symbols) if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        m = heapq.heappop(heap) + heapq.heappop(heap)
        total += m
        heapq.heappush(heap, m)
    return total


def make_model(seed=0, kept=0.1, k=16):
    """A pruned + codebook-quantized two-layer params tree (what the pipeline produces)."""
    rng = np.random.default_rng(seed)
    cb1 = np.sort(rng.normal(size=k)).astype(np.float32)
    cb2 = np.linspace(-1, 1, 8).astype(np.float32)
    cb2[3] = 0.0  # this codebook already holds zero: fillers reuse that code
    w1 = cb1[rng.integers(0, k, (200, 40))]
    w1[rng.random(w1.shape) > kept] = 0
    w1[:60] = 0  # a long run of zeros: fillers
    w2 = cb2[rng.choice([0, 1, 2, 4, 5, 6, 7], size=(40, 10))]
    w2[rng.random(w2.shape) > 0.5] = 0
    params = {
        "params": {
            "fc1": {"kernel": w1, "bias": rng.normal(size=40).astype(np.float32)},
            "fc2": {"kernel": w2, "bias": rng.normal(size=10).astype(np.float32)},
            "conv": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32)},
        }
    }
    coding = {
        "params/fc1/kernel": LeafCoding(cb1, index_bits=5, axes=(1, 0)),
        "params/fc2/kernel": LeafCoding(
            cb2, index_bits=3, huffman_weights=False, huffman_index=False
        ),
    }
    meta = {
        "model": {"name": "mlp", "options": {"hidden": [40]}},
        "num_classes": 10,
        "input_shape": [5, 5, 8],
    }
    return params, coding, meta


def assert_trees_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_trees_equal(a[k], b[k])
        else:
            assert a[k].dtype == np.asarray(b[k]).dtype
            np.testing.assert_array_equal(a[k], b[k])


def test_round_trip_bit_exact(tmp_path):
    params, coding, meta = make_model()
    info = write_cbx(tmp_path / "m.cbx", params, coding, meta)
    back, meta_back = read_cbx(tmp_path / "m.cbx")
    assert_trees_equal(back, params)
    assert meta_back == meta
    assert info.total_bytes == (tmp_path / "m.cbx").stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name != "m.cbx"]  # no temp file left


def test_size_equation_exact():
    params, coding, meta = make_model()
    data, info = encode_cbx(params, coding, meta)
    # Table entries: u16 name length, name, kind, dtype, ndim, u32 dims; coded +39 + ndim bytes.
    names = {
        "params/conv/kernel": (4, False),
        "params/fc1/bias": (1, False),
        "params/fc1/kernel": (2, True),
        "params/fc2/bias": (1, False),
        "params/fc2/kernel": (2, True),
    }
    table = sum(
        2 + len(n) + 3 + 4 * nd + (39 + nd if coded else 0) for n, (nd, coded) in names.items()
    )
    assert info.table_bytes == table
    # fc1: 16 centroids, no zero among them -> a 0.0 is appended for the fillers (K = 17).
    w1 = params["params"]["fc1"]["kernel"].T.ravel()  # axes (1, 0): one output neuron at a time
    pos = np.flatnonzero(w1)
    gaps = np.diff(pos, prepend=-1) - 1
    fillers1 = int(np.sum(gaps // 32))
    assert fillers1 > 0
    l1 = info.leaf("params/fc1/kernel")
    assert (l1.codebook_size, l1.weight_width) == (17, 5)
    assert (l1.n_fillers, l1.n_entries) == (fillers1, pos.size + fillers1)
    cb1 = np.append(coding["params/fc1/kernel"].codebook, 0.0)
    entry_vals = np.concatenate([[0.0] * int(f) + [v] for f, v in zip(gaps // 32, w1[pos])])
    syms = np.array([int(np.flatnonzero(cb1 == v)[0]) for v in entry_vals])
    entry_gaps = np.concatenate([[31] * int(f) + [g % 32] for f, g in zip(gaps // 32, gaps)])
    entry_gaps = entry_gaps.astype(int)
    assert l1.weight_stream_bits == optimal_bits(syms)
    assert l1.index_stream_bits == optimal_bits(entry_gaps)
    streams = math.ceil(l1.weight_stream_bits / 8) + math.ceil(l1.index_stream_bits / 8)
    fc1_bytes = 4 * 17 + 17 + 32 + streams  # centroids, 17 + 32 code lengths, streams
    # fc2: 8 centroids incl. 0, fixed widths: 3-bit codes, 3-bit gaps.
    w2 = params["params"]["fc2"]["kernel"].ravel()
    pos2 = np.flatnonzero(w2)
    g2 = np.diff(pos2, prepend=-1) - 1
    n2 = pos2.size + int(np.sum(g2 // 8))
    l2 = info.leaf("params/fc2/kernel")
    assert (l2.codebook_size, l2.weight_stream_bits, l2.index_stream_bits) == (8, 3 * n2, 3 * n2)
    fc2_bytes = 4 * 8 + 2 * math.ceil(3 * n2 / 8)
    raw_bytes = 4 * (36 + 40 + 10)
    assert info.payload_bytes == fc1_bytes + fc2_bytes + raw_bytes
    expected = HEADER_BYTES + info.meta_bytes + table + info.payload_bytes + CRC_BYTES
    assert len(data) == info.total_bytes == expected
    assert HEADER_BYTES == 36 and CRC_BYTES == 4
    meta_json = b'{"input_shape":[5,5,8],"model":{"name":"mlp","options":{"hidden":[40]}},'
    assert info.meta_bytes == len(meta_json + b'"num_classes":10}')


def test_header_fields_and_crc():
    params, coding, meta = make_model()
    data, info = encode_cbx(params, coding, meta)
    magic, version, flags, n_leaves, n_coded, meta_len, table_len, payload_len = struct.unpack_from(
        "<8sHHIIIIQ", data
    )
    assert (magic, version, flags, n_leaves, n_coded) == (MAGIC, 1, 3, 5, 2)
    assert meta_len == info.meta_bytes and table_len == info.table_bytes
    assert payload_len == info.payload_bytes
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])


def test_deterministic_bytes():
    params, coding, meta = make_model()
    assert encode_cbx(params, coding, meta)[0] == encode_cbx(params, coding, meta)[0]


def test_dense_and_raw_layouts_round_trip():
    rng = np.random.default_rng(3)
    cb = np.array([-0.5, 0.25, 1.0], np.float32)
    dense = cb[rng.integers(0, 3, (7, 9))]
    dense[0, :4] = 0  # zeros in a dense layout need the appended 0.0
    sparse_raw = rng.normal(size=(50, 6)).astype(np.float32)
    sparse_raw[rng.random(sparse_raw.shape) < 0.8] = 0
    conv = cb[rng.integers(0, 3, (3, 2, 4, 5))]
    conv[rng.random(conv.shape) < 0.7] = 0
    params = {
        "a": {"kernel": dense},
        "b": {"kernel": sparse_raw},
        "c": {"kernel": np.zeros((4, 4), np.float32)},
        "d": {"kernel": conv},
    }
    coding = {
        "a/kernel": LeafCoding(cb, index_bits=0, huffman_index=False),
        "b/kernel": LeafCoding(None, index_bits=4, huffman_weights=False),
        "c/kernel": LeafCoding(cb, index_bits=2),
        "d/kernel": LeafCoding(cb, index_bits=3, axes=(3, 2, 0, 1)),  # Caffe's (out, in, kh, kw)
    }
    data, info = encode_cbx(params, coding)
    back, meta = decode_cbx(data)
    assert_trees_equal(back, params)
    assert meta == {}
    a = info.leaf("a/kernel")
    assert (a.codebook_size, a.n_entries, a.index_stream_bits) == (4, 63, 0)
    b = info.leaf("b/kernel")
    assert b.weight_stream_bits == 32 * b.n_entries
    assert info.leaf("c/kernel").n_entries == 0
    # The index follows the permuted order: same entries as coding the transposed array.
    _, info_t = encode_cbx({"d": {"kernel": np.transpose(conv, (3, 2, 0, 1)).copy()}},
                           {"d/kernel": LeafCoding(cb, index_bits=3)})
    d, dt = info.leaf("d/kernel"), info_t.leaf("d/kernel")
    assert (d.n_entries, d.n_fillers) == (dt.n_entries, dt.n_fillers)
    assert d.index_stream_bits == dt.index_stream_bits


def test_other_dtypes_round_trip():
    import ml_dtypes

    params = {
        "h": np.arange(6, dtype=np.float16).reshape(2, 3),
        "b": np.linspace(-1, 1, 5).astype(ml_dtypes.bfloat16),
        "s": np.float32(2.5),
    }
    back, _ = decode_cbx(encode_cbx(params, {})[0])
    assert_trees_equal(back, params)


def test_float64_leaves_round_trip_bit_exact():
    """Issue 7: float64 leaves were stored as float32 and came back rounded."""
    rng = np.random.default_rng(0)
    params = {
        "d": rng.normal(size=(3, 4)),  # float64 values no float32 can hold
        "e": np.array([np.pi, -1e-300, 1e300, -0.0]),
        "h": rng.normal(size=5).astype(np.float16),
    }
    data, info = encode_cbx(params, {})
    back, _ = decode_cbx(data)
    for k, v in params.items():
        assert back[k].dtype == v.dtype
        assert back[k].tobytes() == v.tobytes()  # bit for bit, -0.0 included
    # each raw leaf takes its own itemsize
    assert info.leaf("d").raw_bytes == 8 * 12 and info.leaf("h").raw_bytes == 2 * 5


def test_coded_float64_leaf_needs_float32_values():
    w = np.array([[0.0, 0.5], [0.25, 0.0]], dtype=np.float64)  # float32 numbers: exact
    coding = {"w": LeafCoding(codebook=np.array([0.25, 0.5]), index_bits=2)}
    back, _ = decode_cbx(encode_cbx({"w": w}, coding)[0])
    assert back["w"].dtype == np.float64 and np.array_equal(back["w"], w)
    with pytest.raises(ValueError, match="not all float32 numbers"):
        encode_cbx({"w": w + 1e-12}, {"w": LeafCoding(index_bits=2, huffman_weights=False)})


def test_value_not_in_codebook_rejected():
    params = {"w": {"kernel": np.array([[0.0, 0.3]], np.float32)}}
    with pytest.raises(ValueError, match="not in its codebook"):
        encode_cbx(params, {"w/kernel": LeafCoding(np.array([0.25], np.float32))})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"index_bits": 17}, "index_bits"),
        ({"codebook": None}, "needs a codebook"),
        ({"index_bits": 0}, "needs index_bits > 0"),
        ({"codebook": np.array([np.nan])}, "finite"),
        ({"axes": (0, 0)}, "permutation"),
    ],
)
def test_bad_coding_rejected(kwargs, match):
    args = {"codebook": np.array([1.0], np.float32)} | kwargs
    with pytest.raises(ValueError, match=match):
        LeafCoding(**args)


def test_unknown_leaf_and_int_leaf_rejected():
    with pytest.raises(ValueError, match="not in params"):
        encode_cbx({"w": np.ones(3, np.float32)}, {"v": LeafCoding(np.ones(1, np.float32))})
    with pytest.raises(ValueError, match="dtype int32"):
        encode_cbx({"w": np.ones(3, np.int32)}, {})


def test_every_single_byte_flip_is_detected():
    params, coding, meta = make_model(kept=0.05)
    data, _ = encode_cbx(params, coding, meta)
    rng = np.random.default_rng(0)
    positions = list(range(0, 40)) + list(rng.choice(len(data), size=60, replace=False))
    for pos in positions + [len(data) - 1]:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(CbxError):
            decode_cbx(bytes(bad))


@pytest.mark.parametrize("cut", [0, 10, 39, 100, -1])
def test_truncation_detected(cut):
    params, coding, meta = make_model()
    data, _ = encode_cbx(params, coding, meta)
    with pytest.raises(CbxError, match="truncated"):
        decode_cbx(data[:cut])


def test_specific_error_messages(tmp_path):
    params, coding, meta = make_model()
    data, _ = encode_cbx(params, coding, meta)
    with pytest.raises(CbxError, match="magic"):
        decode_cbx(b"PK\x03\x04" + data[4:])
    v2 = bytearray(data)
    v2[8:10] = struct.pack("<H", 2)
    with pytest.raises(CbxError, match="unsupported .cbx version 2"):
        decode_cbx(bytes(v2))
    flipped = bytearray(data)
    flipped[HEADER_BYTES + 5] ^= 1  # inside the metadata
    with pytest.raises(CbxError, match="CRC32"):
        decode_cbx(bytes(flipped))
    with pytest.raises(CbxError, match="unexpected bytes"):
        decode_cbx(data + b"\0")
    assert issubclass(CbxError, ValueError)
    with pytest.raises(FileNotFoundError):
        read_cbx(tmp_path / "missing.cbx")


def test_consistent_but_wrong_crc_recomputed_still_caught():
    """A file whose fields lie but whose CRC was recomputed fails the structural checks."""
    params, coding, meta = make_model()
    data, info = encode_cbx(params, coding, meta)
    body = bytearray(data[:-4])
    # Claim one more coded leaf than the table holds.
    struct.pack_into("<I", body, 16, 3)
    forged = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(CbxError, match="coded-leaf count"):
        decode_cbx(forged)
