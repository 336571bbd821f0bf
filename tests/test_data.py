"""Tests for coblax.nn.data: IDX and CIFAR parsing, dataset resolution, digits split, batches."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from coblax.nn.data import (
    DataError,
    Dataset,
    batches,
    load_cifar10_dir,
    load_dataset,
    load_mnist_dir,
    read_idx,
    write_idx,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"

# ------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
)
def test_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        a = rng.integers(info.min, info.max, size=(3, 4, 5), endpoint=True).astype(dtype)
    else:
        a = rng.standard_normal((3, 4, 5)).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, a)
    b = read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    if suffix == ".gz":
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzipped


def test_idx_big_endian_input_written_correctly(tmp_path):
    a = np.array([1, 256, -2], dtype=">i4")
    write_idx(tmp_path / "x", a)
    assert (tmp_path / "x").read_bytes() == bytes.fromhex("00000c01 00000003") + bytes.fromhex(
        "00000001 00000100 fffffffe"
    )
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), [1, 256, -2])


def test_idx_hand_crafted_header(tmp_path):
    # short (0x0B), 2-D, 2x3, big-endian values written by hand.
    raw = (
        bytes([0, 0, 0x0B, 2])
        + struct.pack(">II", 2, 3)
        + struct.pack(">6h", 1, -1, 2, 300, -300, 7)
    )
    p = tmp_path / "hand.idx"
    p.write_bytes(raw)
    a = read_idx(p)
    assert a.dtype == np.int16 and a.shape == (2, 3)
    np.testing.assert_array_equal(a, [[1, -1, 2], [300, -300, 7]])
    # And a 1-D double file, gzipped by hand.
    raw = bytes([0, 0, 0x0E, 1]) + struct.pack(">I", 2) + struct.pack(">2d", 0.5, -1e300)
    q = tmp_path / "hand.idx.gz"
    q.write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(q), [0.5, -1e300])


def test_idx_truncated_names_file(tmp_path):
    p = tmp_path / "t.idx"
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 10, 28, 28) + b"\0" * 1000)
    with pytest.raises(DataError, match=r"t\.idx: expected 7856 bytes .* file has 1016"):
        read_idx(p)
    # Trailing garbage is refused too.
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + b"\1\2\3")
    with pytest.raises(DataError, match=r"expected 10 bytes .* file has 11"):
        read_idx(p)
    # Header shorter than ndim needs.
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 2))
    with pytest.raises(DataError, match=r"t\.idx: expected a 16-byte header"):
        read_idx(p)


def test_idx_truncated_gzip(tmp_path):
    p = tmp_path / "t.idx.gz"
    write_idx(p, np.arange(1000, dtype=np.int32))
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"t\.idx\.gz: not a complete gzip file"):
        read_idx(p)


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "m.idx"
    p.write_bytes(bytes([1, 2, 8, 1]) + struct.pack(">I", 1) + b"\0")
    with pytest.raises(DataError, match=r"m\.idx: expected IDX magic .* found 0x01020801"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 0x0A, 1]) + struct.pack(">I", 1) + b"\0")  # 0x0A: no such type
    with pytest.raises(DataError, match=r"found 0x00000A01"):
        read_idx(p)
    write_idx(p, np.zeros((2, 2), np.uint8))
    with pytest.raises(
        DataError, match=r"m\.idx: expected IDX magic 0x00000803 \(ubyte, 3-D\), found 0x00000802"
    ):
        read_idx(p, expected_type=8, expected_ndim=3)
    with pytest.raises(DataError, match=r"nope\.idx: file not found"):
        read_idx(tmp_path / "nope.idx")


def test_write_idx_rejects_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))


# ------------------------------------------------------------- MNIST directory


def _fake_mnist(d: Path, n_train=6, n_test=4, gz=True, hw=(28, 28)) -> tuple[np.ndarray, ...]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    xs = [rng.integers(0, 256, (n, *hw), dtype=np.uint8) for n in (n_train, n_test)]
    ys = [np.arange(n, dtype=np.uint8) % 10 for n in (n_train, n_test)]
    ext = ".gz" if gz else ""
    write_idx(d / f"train-images-idx3-ubyte{ext}", xs[0])
    write_idx(d / f"train-labels-idx1-ubyte{ext}", ys[0])
    write_idx(d / f"t10k-images-idx3-ubyte{ext}", xs[1])
    write_idx(d / f"t10k-labels-idx1-ubyte{ext}", ys[1])
    return xs[0], ys[0], xs[1], ys[1]


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_dir(tmp_path, gz):
    xtr, ytr, xte, yte = _fake_mnist(tmp_path, gz=gz)
    ds = load_mnist_dir(tmp_path)
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.input_shape == (28, 28, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0] * 255, xtr)
    np.testing.assert_array_equal(ds.x_test[..., 0] * 255, xte)
    np.testing.assert_array_equal(ds.y_train, ytr)
    np.testing.assert_array_equal(ds.y_test, yte)


def test_load_mnist_dir_errors(tmp_path):
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        DataError, match=r"missing MNIST files in .*: expected t10k-labels-idx1-ubyte\[\.gz\]"
    ):
        load_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))  # 4 images
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: expected 4 labels.*found 3"):
        load_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 10], np.uint8))
    with pytest.raises(DataError, match=r"expected labels in \[0, 10\)"):
        load_mnist_dir(tmp_path)


def test_load_dataset_resolves_dirs(tmp_path, monkeypatch):
    _fake_mnist(tmp_path / "mnist", n_train=5)
    _fake_mnist(tmp_path / "fashion-mnist", n_train=7)
    monkeypatch.delenv("COBLAX_DATA", raising=False)
    with pytest.raises(DataError, match="COBLAX_DATA"):
        load_dataset("mnist")
    assert len(load_dataset("mnist", tmp_path).y_train) == 5
    assert len(load_dataset("mnist", tmp_path / "mnist").y_train) == 5
    ds = load_dataset("fashion_mnist", str(tmp_path))
    assert ds.name == "fashion_mnist" and len(ds.y_train) == 7
    monkeypatch.setenv("COBLAX_DATA", str(tmp_path))
    assert len(load_dataset("fashion-mnist").y_train) == 7
    with pytest.raises(DataError, match=r"no CIFAR-10 files in .*expected data_batch_1"):
        load_dataset("cifar10")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        DataError, match=r"no MNIST files in .*empty.*expected train-images-idx3-ubyte\[\.gz\]"
    ):
        load_dataset("mnist", empty)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "missing")


def test_missing_data_dir_names_the_expected_files(tmp_path, monkeypatch):
    cifar = "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch"
    mnist = "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz]"
    monkeypatch.delenv("COBLAX_DATA", raising=False)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10")
    assert "COBLAX_DATA" in str(err.value) and cifar in str(err.value)
    assert "cifar-10-batches-py/ or cifar10/" in str(err.value)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path / "missing")
    assert f"{tmp_path / 'missing'} for CIFAR-10 does not exist" in str(err.value) and cifar in str(err.value)
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", tmp_path / "missing")
    assert "Fashion-MNIST" in str(err.value) and mnist in str(err.value)
    assert "fashion-mnist/ or fashion_mnist/" in str(err.value)


def test_unknown_name_and_bad_limits():
    with pytest.raises(DataError, match="valid names are digits, mnist, fashion_mnist, cifar10"):
        load_dataset("imagenet")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="limit_train must be None or a positive int"):
            load_dataset("digits", limit_train=bad)


# --------------------------------------------------------------------- CIFAR


def _cifar_batch(path: Path, n: int, label_offset: int, protocol: int = 2) -> np.ndarray:
    data = (np.arange(n * 3072) * 7 + label_offset).astype(np.uint8).reshape(n, 3072)
    with open(path, "wb") as f:
        pickle.dump(
            {
                b"data": data,
                b"labels": [(i + label_offset) % 10 for i in range(n)],
                b"batch_label": b"x",
            },
            f,
            protocol=protocol,
        )
    return data


def _fake_cifar(d: Path) -> dict[str, np.ndarray]:
    d.mkdir(parents=True, exist_ok=True)
    out = {f"data_batch_{i}": _cifar_batch(d / f"data_batch_{i}", 2, i) for i in range(1, 6)}
    out["test_batch"] = _cifar_batch(d / "test_batch", 3, 0, protocol=4)
    return out


def test_load_cifar10_dir(tmp_path):
    raw = _fake_cifar(tmp_path)
    ds = load_cifar10_dir(tmp_path)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    # Known pixel: batch 2, image 1, channel G (plane 1), row 5, col 9.
    n_img, ch, r, c = 1, 1, 5, 9
    byte = raw["data_batch_2"][n_img, ch * 1024 + r * 32 + c]
    assert ds.x_train[2 + n_img, r, c, ch] == np.float32(byte) / np.float32(255)
    # Whole-array check against an independent loop formulation.
    d = raw["test_batch"]
    for n in range(3):
        for ch in range(3):
            np.testing.assert_array_equal(
                ds.x_test[n, :, :, ch] * 255, d[n, ch * 1024 : (ch + 1) * 1024].reshape(32, 32)
            )
    np.testing.assert_array_equal(ds.y_train, [1, 2, 2, 3, 3, 4, 4, 5, 5, 6])
    np.testing.assert_array_equal(ds.y_test, [0, 1, 2])
    assert load_dataset("cifar10", tmp_path).x_train.shape == (10, 32, 32, 3)


def test_cifar_legacy_numpy_core_name(tmp_path):
    """The official files (NumPy 1 era) name ``numpy.core.multiarray._reconstruct``."""
    raw = _fake_cifar(tmp_path)
    blob = (tmp_path / "data_batch_5").read_bytes()
    assert b"numpy._core.multiarray" in blob
    (tmp_path / "data_batch_5").write_bytes(
        blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    )
    ds = load_cifar10_dir(tmp_path)
    np.testing.assert_array_equal(
        ds.x_train[8:].transpose(0, 3, 1, 2).reshape(2, 3072) * 255, raw["data_batch_5"]
    )


def test_cifar_resolution_and_missing(tmp_path):
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    assert load_dataset("cifar10", tmp_path).y_test.shape == (3,)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match=r"missing CIFAR-10 files in .*: data_batch_3, test_batch"):
        load_dataset("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_other_globals(tmp_path):
    _fake_cifar(tmp_path)
    with open(tmp_path / "data_batch_4", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(
        DataError, match=r"data_batch_4: .*global '(posix|nt|os)\.system' is not allowed"
    ):
        load_cifar10_dir(tmp_path)
    # Non-latin1 use of _codecs.encode is refused as well.
    with open(tmp_path / "data_batch_4", "wb") as f:
        f.write(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(DataError, match=r"data_batch_4: .*latin1"):
        load_cifar10_dir(tmp_path)


def test_cifar_malformed(tmp_path):
    _fake_cifar(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_1: expected b'data' as a uint8 \(N, 3072\)"):
        load_cifar10_dir(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_1: expected 2 labels"):
        load_cifar10_dir(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"data_batch_1: expected a CIFAR-10 python pickle"):
        load_cifar10_dir(tmp_path)


# -------------------------------------------------------------------- digits


def test_digits_split():
    ds = load_dataset("digits")
    assert isinstance(ds, Dataset) and ds.num_classes == 10
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0 and ds.x_test.max() <= 1.0
    # Stratified: each class's test count is within one of 20% of its total.
    total = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    test = np.bincount(ds.y_test, minlength=10)
    assert np.all(np.abs(test - total * 360 / 1797) <= 1)
    # The split does not depend on the seed.
    other = load_dataset("digits", seed=123)
    np.testing.assert_array_equal(ds.x_train, other.x_train)
    np.testing.assert_array_equal(ds.y_test, other.y_test)
    # The images are sklearn's / 16, and train+test is a partition of all 1,797.
    from sklearn.datasets import load_digits

    ref = load_digits().images.reshape(1797, 64) / 16
    got = np.concatenate([ds.x_train, ds.x_test]).reshape(1797, 64).astype(np.float64)
    key = lambda a: sorted(map(bytes, (a * 16).round().astype(np.uint8)))  # noqa: E731
    assert key(ref) == key(got)


def test_limits_are_stratified_and_seeded():
    full = load_dataset("digits")
    ds = load_dataset("digits", seed=3, limit_train=100, limit_test=50)
    assert len(ds.y_train) == 100 and len(ds.y_test) == 50
    share = np.bincount(full.y_train, minlength=10) / len(full.y_train)
    assert np.all(np.abs(np.bincount(ds.y_train, minlength=10) - 100 * share) <= 1)
    # The subset is a sub-sequence of the full split, in its original order.
    rows = {bytes(x.tobytes()): i for i, x in enumerate(full.x_train)}
    idx = [rows[x.tobytes()] for x in ds.x_train]
    assert idx == sorted(idx)
    np.testing.assert_array_equal(full.y_train[idx], ds.y_train)
    again = load_dataset("digits", seed=3, limit_train=100)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    assert len(again.y_test) == 360
    other = load_dataset("digits", seed=4, limit_train=100)
    assert not np.array_equal(other.x_train, ds.x_train)
    assert len(load_dataset("digits", limit_train=10**6).y_train) == 1437  # clamped


# ------------------------------------------------------------------- batches


def test_batches():
    x = np.arange(10)[:, None] * np.ones((1, 3))
    y = np.arange(10)
    got = list(batches(x, y, 4))
    assert [len(b) for _, b in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), y)
    assert [len(b) for _, b in batches(x, y, 4, drop_last=True)] == [4, 4]
    s1 = np.concatenate([b for _, b in batches(x, y, 3, seed=7)])
    s2 = np.concatenate([b for _, b in batches(x, y, 3, seed=7)])
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(s1, np.random.default_rng(7).permutation(10))
    for xb, yb in batches(x, y, 3, seed=7):
        np.testing.assert_array_equal(xb[:, 0], yb)  # x and y stay paired
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        batches(x, y, 0)
    with pytest.raises(ValueError, match="same length"):
        batches(x, y[:5], 2)


# --------------------------------------------------------------- real files

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _need(sub: str) -> Path:
    if not (SHARED / sub).is_dir():
        pytest.skip(f"{SHARED / sub} not present")
    return SHARED


def test_real_mnist(monkeypatch):
    root = _need("mnist")
    raw = gzip.open(root / "mnist" / "train-images-idx3-ubyte.gz").read()
    assert hashlib.md5(raw).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"
    ds = load_dataset("mnist", root)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == MNIST_TRAIN_COUNTS
    # The parsed pixels are exactly the decompressed payload after the 16-byte header.
    assert (np.round(ds.x_train * 255).astype(np.uint8).tobytes()) == raw[16:]
    monkeypatch.setenv("COBLAX_DATA", str(root))
    via_env = load_dataset("mnist", limit_test=100)
    np.testing.assert_array_equal(via_env.y_train, ds.y_train)
    assert np.all(np.bincount(via_env.y_test, minlength=10) >= 8)


def test_real_fashion_mnist():
    root = _need("fashion-mnist")
    ds = load_dataset("fashion_mnist", root / "fashion-mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert 0.0 == ds.x_train.min() and ds.x_train.max() == 1.0
