"""keep_pruned / share_by_cluster against hand computations, in a plain optax loop and in fit;
the Deep Compression stages composed with chain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coblax.compress import pipeline as dc
from coblax.compress import prune, quantize
from coblax.compress.transforms import keep_pruned, share_by_cluster
from coblax.nn.train import fit
from helpers import blobs, mlp_apply, mlp_params

W = jnp.array([[0.5, -1.0, 0.0], [2.0, 0.0, 1.5]])
G = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = np.array([[True, True, False], [True, False, True]])
ASSIGN = np.array([[0, 1, -1], [0, -1, 1]])  # two clusters; -1 = pruned


def _tree(k, b=None):
    return {"params": {"l": {"kernel": k, "bias": jnp.ones(3) if b is None else b}}}


def test_keep_pruned_hand_computation():
    tx = keep_pruned({"params": {"l": {"kernel": MASK, "bias": None}}})
    updates, state = tx.update(_tree(G), tx.init(_tree(W)))
    np.testing.assert_array_equal(updates["params"]["l"]["kernel"], [[1, 2, 0], [4, 0, 6]])
    np.testing.assert_array_equal(updates["params"]["l"]["bias"], [1, 1, 1])  # None: untouched


def test_share_by_cluster_hand_computation():
    tx = share_by_cluster({"params": {"l": {"kernel": ASSIGN, "bias": None}}})
    updates, _ = tx.update(_tree(G), tx.init(_tree(W)))
    # cluster 0: 1 + 4 = 5; cluster 1: 2 + 6 = 8; pruned entries get 0
    np.testing.assert_array_equal(updates["params"]["l"]["kernel"], [[5, 8, 0], [5, 0, 8]])
    np.testing.assert_array_equal(updates["params"]["l"]["bias"], [1, 1, 1])


def test_plain_optax_loop_sgd_steps_by_hand():
    """Three SGD steps of chain(share_by_cluster, sgd, keep_pruned) on a linear model."""
    x = jnp.array([[1.0, 2.0], [0.5, -1.0]])
    y = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    masks = {"params": {"l": {"kernel": MASK, "bias": None}}}
    assign = {"params": {"l": {"kernel": ASSIGN, "bias": None}}}
    W0 = jnp.array([[0.5, -1.0, 0.0], [0.5, 0.0, -1.0]])  # tied: c_0 = 0.5, c_1 = -1.0
    params = _tree(W0, jnp.zeros(3))
    lr = 0.1
    tx = optax.chain(share_by_cluster(assign), optax.sgd(lr), keep_pruned(masks))
    state = tx.init(params)

    def loss(p):
        return 0.5 * jnp.sum((x @ p["params"]["l"]["kernel"] + p["params"]["l"]["bias"] - y) ** 2)

    step = jax.jit(lambda p, s: _step(tx, loss, p, s))
    c = np.array([0.5, -1.0])
    b = np.zeros(3)
    for _ in range(3):
        # by hand: dL/dW = x^T r, centroid gradient = sum over the cluster's kept entries
        Wh = np.array([[c[0], c[1], 0.0], [c[0], 0.0, c[1]]])
        r = np.asarray(x) @ Wh + b - np.asarray(y)
        g = np.asarray(x).T @ r
        c = c - lr * np.array([g[0, 0] + g[1, 0], g[0, 1] + g[1, 2]])
        b = b - lr * r.sum(0)
        params, state = step(params, state)
    k = np.asarray(params["params"]["l"]["kernel"])
    np.testing.assert_allclose(k, [[c[0], c[1], 0.0], [c[0], 0.0, c[1]]], rtol=1e-5)
    np.testing.assert_allclose(params["params"]["l"]["bias"], b, rtol=1e-5)
    assert k[0, 2] == 0.0 and k[1, 1] == 0.0  # pruned: exactly zero
    assert step._cache_size() == 1  # one compilation for every step


def _step(tx, loss, p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s


def test_in_fit_with_adam_keeps_ties_and_zeros():
    x, y = blobs(n=128)
    params = mlp_params(1)
    masks = prune.magnitude_masks(params, 0.5)
    qp, cb, idx, _ = quantize.kmeans_share(params, 2, masks=masks)
    lm = prune.layer_masks(masks)
    assign = prune.map_kernels(
        lambda n, _: np.where(lm[n], idx[n], -1) if n == "fc1" else None, qp,
        other=lambda _: None)
    tx = optax.chain(share_by_cluster(assign), optax.adam(1e-2), keep_pruned(masks))
    out = fit(mlp_apply, qp, x, y, epochs=3, batch_size=32, optimizer=tx, progress=False)
    k1 = np.asarray(out["params"]["fc1"]["kernel"])
    assert np.all(k1[~lm["fc1"]] == 0) and len(np.unique(k1[lm["fc1"]])) <= 4
    k2 = np.asarray(out["params"]["fc2"]["kernel"])  # masked but not shared
    assert np.all(k2[~lm["fc2"]] == 0) and len(np.unique(k2[lm["fc2"]])) > 4
    assert np.all(np.isfinite(k1)) and not np.allclose(k1, qp["params"]["fc1"]["kernel"])


def test_stages_compose_like_optax_chain():
    x, y = blobs(n=240)
    params = mlp_params(2)
    ev = lambda p: float(np.mean(np.argmax(mlp_apply(p, x), -1) == y))  # noqa: E731
    retrain = dc.Training(mlp_apply, x, y, learning_rate=1e-2, batch_size=32, evaluate=ev)
    finetune = dc.Training(mlp_apply, x, y, learning_rate=1e-3, batch_size=32, evaluate=ev)
    stages = [
        dc.PruneStage(retrain, {"fc1": 0.5, "fc2": 0.5}, steps=2, retrain_epochs=1),
        dc.QuantizeStage(finetune, bits={"fc1": 2, "fc2": 2}, bias_bits=0,
                         index_bits={"fc1": 2, "fc2": 2}, finetune_epochs=1),
        dc.EncodeStage({"fc1": 2, "fc2": 2}, evaluate=ev),
        dc.EnergyStage({"fc1": 48, "fc2": 24}),
    ]
    out, state, reports = dc.chain(*stages)(params, dc.CompressState(accuracy={"base": ev(params)}))
    assert list(reports) == ["prune", "quantize", "encode", "energy"]
    assert set(state.accuracy) == {"base", "pruned", "quantized", "finetuned", "file"}
    assert state.accuracy["file"] == state.accuracy["finetuned"]
    k = np.asarray(out["params"]["fc1"]["kernel"])
    assert np.count_nonzero(k) == 24 and len(np.unique(k[k != 0])) <= 4
    assert reports["encode"]["file"]["bytes"] == len(state.blob)
    assert reports["energy"]["compressed"]["fp32_macs"] == pytest.approx(24 + 12)
    with pytest.raises(ValueError, match="unique"):
        dc.chain(stages[0], stages[0])
    with pytest.raises(ValueError, match="after EncodeStage"):
        stages[3](params, dc.CompressState())
