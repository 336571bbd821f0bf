"""Bit-packed export of a factored network: ``save_factored_cbx`` / ``load_factored_cbx``."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax import allocate, load_factored, save_factored
from coblax.app.export_cbx import load_factored_cbx, prune_and_share, save_factored_cbx
from coblax.compress.cbx import CbxError
from coblax.lowrank.export import Exported
from coblax.nn.data import load_dataset
from coblax.nn.train import evaluate, fit
from coblax.util import flatten_tree

EVAL = {"train": False}


class Net(nn.Module):
    """BatchNorm, a kept depthwise conv, two tai convs, two dense layers, an int counter."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False, name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
        x = nn.Conv(16, (3, 3), padding="SAME", feature_group_count=16, name="dw")(x)
        x = nn.Conv(24, (3, 3), strides=2, padding="SAME", name="conv2")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn2")(x))
        steps = self.variable("counter", "steps", lambda: jnp.zeros((), jnp.int32))
        if train:
            steps.value += 1
        h = nn.relu(nn.Dense(64, name="fc1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="head")(h)


@functools.lru_cache(maxsize=1)
def _allocated():
    data = load_dataset("digits", seed=0)
    model = Net()
    v0 = model.init(jax.random.PRNGKey(0), jnp.asarray(data.x_train[:1]))
    variables = fit(functools.partial(model.apply, train=True), v0, data.x_train, data.y_train, epochs=2,
                    batch_size=64, learning_rate=3e-3, seed=0, progress=False,
                    mutable=("batch_stats", "counter"))
    result = allocate(model, variables, (data.x_train[:200], data.y_train[:200]),
                      rules=[("conv1|dw", "skip"), ("conv2", "tai"), ("fc1", "dense")], mac=0.6, param=0.6,
                      method="uniform", apply_kwargs=EVAL)
    return result, data


def _logits(net: Exported, x) -> np.ndarray:
    return np.asarray(net.apply(net.variables, jnp.asarray(x)))


def test_plain_cbx_is_bit_identical_to_npz(tmp_path):
    result, data = _allocated()
    meta = {"ranks": result.ranks}
    save_factored(tmp_path / "net.npz", result, meta=meta)
    info = save_factored_cbx(tmp_path / "net.cbx", result, meta=meta)
    assert info.total_bytes == (tmp_path / "net.cbx").stat().st_size
    assert all(leaf.kind == "raw" for leaf in info.leaves)
    npz, cbx = load_factored(tmp_path / "net.npz", Net()), load_factored_cbx(tmp_path / "net.cbx", Net())
    assert cbx.layers == npz.layers and cbx.apply_kwargs == npz.apply_kwargs and cbx.meta == npz.meta
    a, b = flatten_tree(npz.variables), flatten_tree(cbx.variables)
    assert set(a) == set(b) and "batch_stats/bn2/var" in b and "params/conv2/first/kernel" in b
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert b["counter/steps"].dtype == np.int32 and int(b["counter/steps"]) > 0
    x = data.x_test[:64]
    assert np.array_equal(_logits(cbx, x), _logits(npz, x))


def test_pruned_shared_cbx_reproduces_and_is_small(tmp_path):
    result, data = _allocated()
    sparsity, bits, index_bits = 0.5, 4, 5
    stored, coding = prune_and_share(result.variables, prune=sparsity, bits=bits, index_bits=index_bits)
    before = Exported(Net(), jax.tree.map(jnp.asarray, stored), {n: {"kind": f.kind, "scheme": f.scheme}
                      for n, f in result.factors.items()}, dict(result.apply_kwargs), {})
    acc = evaluate(before.apply, before.variables, data.x_test, data.y_test)
    assert acc > 0.3  # far from chance (10 classes), so reproducing it exactly means something
    npz_bytes = save_factored(tmp_path / "net.npz", result).total_bytes
    info = save_factored_cbx(tmp_path / "net.cbx", result, prune=sparsity, bits=bits, index_bits=index_bits,
                             meta={"accuracy": acc})
    loaded = load_factored_cbx(tmp_path / "net.cbx", Net())
    assert loaded.meta["accuracy"] == acc
    assert evaluate(loaded.apply, loaded.variables, data.x_test, data.y_test) == acc
    x = data.x_test[:64]
    assert np.array_equal(_logits(loaded, x), _logits(before, x))
    flat = flatten_tree(stored)
    for k, v in flatten_tree(loaded.variables).items():
        assert np.array_equal(np.asarray(v), flat[k]), k
    # every kernel was pruned and shared: <= 2^4 distinct values (0.0 included)
    assert set(coding) == {k for k in flat if k.endswith("/kernel")}
    for k in coding:
        assert len(np.unique(flat[k])) <= 2**bits
    # size against the counted bits: every coded entry (kept weight or filler) costs at most
    # `bits` for its code and `index_bits` for its gap; plus codebooks, code lengths, the
    # raw leaves (biases, BatchNorm, the counter as float64) and the header/table/metadata.
    coded = [leaf for leaf in info.leaves if leaf.kind == "coded"]
    n_kept = sum(int(np.count_nonzero(flat[leaf.name])) for leaf in coded)
    n_entries = sum(leaf.n_entries for leaf in coded)
    assert n_kept <= n_entries <= 1.05 * n_kept
    raw = sum(np.asarray(flat[leaf.name]).size * (8 if leaf.name == "counter/steps" else 4)
              for leaf in info.leaves if leaf.kind == "raw")
    overhead = sum(4 * leaf.codebook_size + leaf.codebook_size + 2**index_bits + 2 for leaf in coded)
    overhead += 36 + 4 + info.meta_bytes + info.table_bytes
    assert info.total_bytes == (tmp_path / "net.cbx").stat().st_size
    assert info.total_bytes <= n_entries * (bits + index_bits) / 8 + raw + overhead
    n_weights = sum(leaf.numel for leaf in coded)
    assert n_kept <= (1 - sparsity) * n_weights + len(coded)
    assert npz_bytes / info.total_bytes >= 5.0, (npz_bytes, info.total_bytes)


def test_corrupt_cbx_raises(tmp_path):
    result, _ = _allocated()
    path = tmp_path / "net.cbx"
    save_factored_cbx(path, result, prune=0.5, bits=4)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.cbx"
    bad.write_bytes(bytes(data))
    with pytest.raises(CbxError):
        load_factored_cbx(bad, Net())
    bad.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CbxError):
        load_factored_cbx(bad, Net())


def test_header_with_unknown_dtype_raises(tmp_path):
    from coblax.compress.cbx import read_cbx, write_cbx

    result, _ = _allocated()
    path = tmp_path / "net.cbx"
    save_factored_cbx(path, result)
    tree, header = read_cbx(path)
    assert header["dtypes"] == {"counter/steps": "int32"}
    write_cbx(path, tree, {}, header | {"dtypes": {"counter/steps": "object"}})
    with pytest.raises(CbxError, match="counter/steps"):
        load_factored_cbx(path, Net())
