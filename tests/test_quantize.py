"""Tests for coblax.compress.quantize: hand values, closed forms, Monte Carlo means."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coblax.compress import prune, quantize
from helpers import blobs as _blobs
from helpers import mlp_apply as _mlp_apply
from helpers import mlp_params


def _mlp_params(seed: int = 0, sizes=(6, 16, 3)) -> dict:
    return mlp_params(seed, sizes)


def _xent(logits, y):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(len(y)), y])


# ------------------------------------------------------------------------ fixed point


@pytest.mark.parametrize(
    "il, fl, match",
    [(0, 4, "il"), (2, -1, "fl"), (20, 13, "il \\+ fl"), (2.0, 3, "il"), (2, True, "fl")],
)
def test_fixed_point_validates_bits(il, fl, match):
    with pytest.raises(ValueError, match=match):
        quantize.fixed_point(jnp.zeros(3), il, fl)


def test_fixed_point_nearest_hand_values_and_saturation():
    # <2, 2>: eps = 0.25, range [-2, 1.75]
    x = jnp.array([0.3, 0.4, 0.375, 0.12, -0.3, 5.0, -7.0, 1.8, -2.0])
    q = quantize.fixed_point(x, 2, 2)
    np.testing.assert_array_equal(q, [0.25, 0.5, 0.5, 0.0, -0.25, 1.75, -2.0, 1.75, -2.0])


@pytest.mark.parametrize("il, fl", [(1, 0), (1, 7), (4, 4), (8, 8), (3, 12)])
def test_fixed_point_exact_on_grid_and_bounds(il, fl):
    eps = 2.0**-fl
    lo, hi = -(2.0 ** (il - 1)), 2.0 ** (il - 1) - eps
    grid = np.arange(round(lo / eps), round(hi / eps) + 1)[::max(1, 2 ** (il + fl) // 4096)] * eps
    for rounding in ("nearest", "stochastic"):
        q = quantize.fixed_point(jnp.asarray(grid, jnp.float32), il, fl, rounding=rounding,
                                 key=jax.random.key(1))
        np.testing.assert_array_equal(q, grid.astype(np.float32))
    wide = jnp.asarray(np.random.default_rng(0).normal(size=1000) * 4 * 2.0**il, jnp.float32)
    for rounding in ("nearest", "stochastic"):
        q = np.asarray(quantize.fixed_point(wide, il, fl, rounding=rounding, key=jax.random.key(2)))
        assert q.min() >= lo and q.max() <= hi
        assert q.min() == lo and q.max() == hi  # saturated values hit the limits
        np.testing.assert_array_equal(q / eps, np.round(q / eps))  # on the grid


def test_fixed_point_stochastic_is_unbiased():
    x = jnp.array([0.3, -0.3, 0.1, 1.7, -1.99, 0.6])
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: quantize.fixed_point(x, 2, 2, rounding="stochastic",
                                                               key=k))(keys))
    # each draw is floor or floor + eps, with P(up) = (x - floor)/eps
    floor = np.floor(np.asarray(x) / 0.25) * 0.25
    assert np.all((draws == floor) | (draws == floor + 0.25))
    # std of the mean <= 0.125 / sqrt(20000) ~ 9e-4
    np.testing.assert_allclose(draws.mean(0), x, atol=5e-3)
    with pytest.raises(ValueError, match="key"):
        quantize.fixed_point(x, 2, 2, rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        quantize.fixed_point(x, 2, 2, rounding="up")


def test_fixed_point_mac_accumulate_then_round():
    a = jnp.array([0.5, 0.25, -0.75])
    b = jnp.array([0.75, 0.5, 0.25])
    # exact on <2,2> grid: 0.375 + 0.125 - 0.1875 = 0.3125 -> nearest 0.25 (0.3125 < .375)
    assert float(quantize.fixed_point_mac(a, b, 2, 2)) == 0.25
    # rounding each product first would give 0.5 + 0.25 - 0.25 = 0.5: different
    keys = jax.random.split(jax.random.key(3), 20000)
    draws = np.asarray(jax.vmap(
        lambda k: quantize.fixed_point_mac(a, b, 2, 2, rounding="stochastic", key=k))(keys))
    assert set(np.unique(draws)) == {0.25, 0.5}
    assert draws.mean() == pytest.approx(0.3125, abs=5e-3)
    A = jnp.array([[0.5, 0.25, -0.75], [1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(quantize.fixed_point_mac(A, b[:, None], 2, 2).ravel(),
                                  [0.25, 1.5])


def test_fixed_point_apply_fn_forward_and_straight_through_grad():
    x = jnp.array([[1.0, 2.0], [0.5, -1.0]])
    y = jnp.array([[1.0], [0.0]])
    params = {"params": {"lin": {"kernel": jnp.array([[0.3], [0.62]]), "bias": jnp.array([0.1])}}}

    def apply(p, xb):
        return xb @ p["params"]["lin"]["kernel"] + p["params"]["lin"]["bias"]

    q_apply = quantize.fixed_point_apply_fn(apply, 2, 2)
    wq = np.array([[0.25], [0.5]])
    np.testing.assert_allclose(q_apply(params, x), np.asarray(x) @ wq + 0.1, rtol=1e-6)
    g = jax.grad(lambda p: 0.5 * jnp.sum((q_apply(p, x) - y) ** 2))(params)
    # STE: dL/dW = x^T (x W_q + b - y) evaluated at the quantized weights
    resid = np.asarray(x) @ wq + 0.1 - np.asarray(y)
    np.testing.assert_allclose(g["params"]["lin"]["kernel"], np.asarray(x).T @ resid, rtol=1e-6)
    # stochastic: reproducible for equal inputs, fresh draws for a new batch
    kernel = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(64, 4)), jnp.float32)
    s_apply = jax.jit(quantize.fixed_point_apply_fn(
        lambda p, xb: p["params"]["lin"]["kernel"] + 0 * jnp.sum(xb), 2, 2, "stochastic", seed=0))
    pk = {"params": {"lin": {"kernel": kernel}}}
    q1, q2, q3 = s_apply(pk, x), s_apply(pk, x), s_apply(pk, x + 1.0)
    np.testing.assert_array_equal(q1, q2)
    assert np.any(np.asarray(q1) != np.asarray(q3))
    floor = np.floor(np.asarray(kernel) * 4) / 4
    for q in (q1, q3):
        assert np.all((np.asarray(q) == floor) | (np.asarray(q) == floor + 0.25))


def test_fixed_point_apply_fn_trains_float_copy():
    x, y = _blobs()
    from coblax.nn.train import fit

    q_apply = quantize.fixed_point_apply_fn(_mlp_apply, 2, 3)
    params = fit(q_apply, _mlp_params(1), x, y, epochs=5, batch_size=32, learning_rate=1e-2,
                 progress=False)
    k = np.asarray(params["params"]["fc1"]["kernel"])
    assert not np.array_equal(k, np.round(k * 8) / 8)  # float copy is off-grid
    qp, rep = quantize.fixed_point_quantize(params, quantize.FixedPointSpec(2, 3))
    acc = np.mean(np.argmax(np.asarray(_mlp_apply(qp, x)), -1) == y)
    assert acc > 0.9
    assert rep["compression_ratio"] == pytest.approx(32 / 5)
    assert rep["layers"]["fc1"]["max_abs_error"] <= 2**-4 + 1e-7 or rep["layers"]["fc1"][
        "saturated"] > 0


# ------------------------------------------------------------------------- k-means


def test_kmeans_codebook_hand_example_and_mask():
    w = np.array([0.0, 0.1, 1.0, 1.1, 50.0, -50.0])
    mask = np.array([True, True, True, True, False, False])
    c, idx, info = quantize.kmeans_codebook(w, 2, mask=mask)
    np.testing.assert_allclose(c, [0.05, 1.05], rtol=1e-6)
    np.testing.assert_array_equal(idx[:4], [0, 0, 1, 1])
    assert info.objective == pytest.approx(4 * 0.05**2)
    assert info.n_weights == 4 and info.converged
    np.testing.assert_allclose(quantize.dequantize(c, idx, mask), [0.05, 0.05, 1.05, 1.05, 0, 0],
                               rtol=1e-6)


def test_kmeans_inits():
    w = np.random.default_rng(0).normal(size=500)
    c, _, _ = quantize.kmeans_codebook(w, 5, init="linear", iters=0)
    np.testing.assert_allclose(c, np.linspace(w.min(), w.max(), 5), rtol=1e-6)
    c, _, _ = quantize.kmeans_codebook(w, 5, init="density", iters=0)
    np.testing.assert_allclose(c, np.quantile(w, [0, 0.25, 0.5, 0.75, 1.0]), rtol=1e-6)
    c, _, _ = quantize.kmeans_codebook(w, 5, init="random", iters=0, seed=3)
    assert all(np.isclose(v, w, atol=1e-6).any() for v in c)
    c2, _, _ = quantize.kmeans_codebook(w, 5, init="random", iters=0, seed=3)
    np.testing.assert_array_equal(c, c2)


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_kmeans_objective_decreases(init):
    rng = np.random.default_rng(1)
    w = np.concatenate([rng.normal(-0.5, 0.1, 400), rng.normal(0.4, 0.2, 600)])
    c, idx, info = quantize.kmeans_codebook(w, 8, init=init, seed=2)
    assert info.objective <= info.objective_init
    assert info.objective == pytest.approx(float(np.sum((w - c[idx].astype(np.float64)) ** 2)),
                                           rel=1e-5)
    assert np.all(np.diff(c) >= 0)


def test_kmeans_bad_k_and_init():
    w = np.arange(10.0)
    m = w < 3
    with pytest.raises(ValueError, match="k=4"):
        quantize.kmeans_codebook(w, 4, mask=m)
    with pytest.raises(ValueError, match="k must"):
        quantize.kmeans_codebook(w, 0)
    with pytest.raises(ValueError, match="init"):
        quantize.kmeans_codebook(w, 2, init="kmeans++")


def test_kmeans_share_respects_bits_and_masks():
    params = _mlp_params(2)
    masks = prune.magnitude_masks(params, 0.5)
    out, cb, idx, rep = quantize.kmeans_share(params, {"fc1": 2, "fc2": 3}, masks=masks)
    lm = prune.layer_masks(masks)
    for name, bits in (("fc1", 2), ("fc2", 3)):
        k = np.asarray(prune.kernels(out)[name])
        assert np.all(k[~lm[name]] == 0)
        assert len(np.unique(k[lm[name]])) <= 2**bits
        assert cb[name].shape == (2**bits,)
        np.testing.assert_array_equal(quantize.dequantize(cb[name], idx[name], lm[name]), k)
        assert rep.layers[name].n_kept == lm[name].sum()
    assert rep.layers["fc1"].compression_ratio == pytest.approx(16.0)
    # a dict leaves unnamed layers alone; k is capped at the kept count
    out2, cb2, _, rep2 = quantize.kmeans_share(params, {"fc2": 8}, masks=masks)
    assert list(cb2) == ["fc2"] and rep2.layers["fc2"].k == 24
    np.testing.assert_array_equal(out2["params"]["fc1"]["kernel"],
                                  params["params"]["fc1"]["kernel"])
    with pytest.raises(ValueError, match="bits"):
        quantize.kmeans_share(params, 0)
    with pytest.raises(ValueError, match="unknown layers"):
        quantize.kmeans_share(params, {"fc9": 2})


def test_weight_share_stage_treats_zeros_as_pruned():
    params, _ = prune.magnitude_prune(_mlp_params(3), prune.MagnitudeSpec(0.5))
    out, rep = quantize.weight_share(params, quantize.WeightSharingSpec(bits=2))
    k = np.asarray(out["params"]["fc1"]["kernel"])
    assert np.sum(k != 0) == 48 and len(np.unique(k[k != 0])) <= 4
    assert rep["codebooks"]["fc1"].shape == (4,)


def test_cluster_gradient_hand():
    g = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    idx = jnp.array([[0, 1, 0], [2, 1, 0]])
    mask = jnp.array([[True, True, True], [True, False, True]])
    # cluster 0: 1 + 3 + 6; cluster 1: 2 (5 is pruned); cluster 2: 4; cluster 3: empty
    np.testing.assert_array_equal(quantize.cluster_gradient(g, idx, 4, mask), [10.0, 2.0, 4.0, 0])
    tree = {"params": {"l": {"kernel": g, "bias": jnp.ones(3)}}}
    shared = jax.jit(lambda t: quantize.share_gradients(t, {"l": idx}, {"l": mask}))(tree)
    np.testing.assert_array_equal(shared["params"]["l"]["kernel"], [[10, 2, 10], [4, 0, 10]])
    np.testing.assert_array_equal(shared["params"]["l"]["bias"], [1, 1, 1])
    w = {"params": {"l": {"kernel": jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 5.0]])}}}
    snapped = jax.jit(lambda t: quantize.snap_to_clusters(t, {"l": idx}, {"l": mask}))(w)
    np.testing.assert_allclose(snapped["params"]["l"]["kernel"], [[3, 2, 3], [4, 0, 3]])
    with pytest.raises(ValueError, match="exceed"):
        quantize.share_gradients(tree, {"l": idx}, None, {"l": 2})


def test_finetune_centroids_keeps_sharing_and_pruning():
    x, y = _blobs()
    params = _mlp_params(4)
    masks = prune.magnitude_masks(params, 0.5)
    qp, cb, idx, _ = quantize.kmeans_share(params, 2, masks=masks)
    loss0 = float(_xent(_mlp_apply(qp, x), y))
    out, cb2 = quantize.finetune_centroids(_mlp_apply, qp, cb, idx, masks, x, y, epochs=4,
                                           learning_rate=1e-2, batch_size=32)
    lm = prune.layer_masks(masks)
    for name in ("fc1", "fc2"):
        k = np.asarray(prune.kernels(out)[name])
        assert np.all(k[~lm[name]] == 0)
        assert len(np.unique(k[k != 0])) <= 4
        np.testing.assert_allclose(quantize.dequantize(cb2[name], idx[name], lm[name]), k,
                                   rtol=1e-6)
        assert not np.allclose(cb2[name], cb[name])
    assert float(_xent(_mlp_apply(out, x), y)) < loss0


def test_finetune_centroids_sgd_step_is_the_summed_cluster_gradient():
    # one SGD step on a linear model by hand: c_j <- c_j - lr * sum_{i in j} g_i
    x = np.array([[1.0, 2.0]], np.float32)
    y = np.array([[0.0, 0.0]], np.float32)
    params = {"params": {"l": {"kernel": jnp.zeros((2, 2))}}}
    cb = {"l": np.array([0.5, -1.0], np.float32)}
    idx = {"l": np.array([[0, 1], [1, 0]], np.int32)}

    def fit_fn(apply_fn, params, x, y, *, epochs, optimizer, **_):
        # a plain optax loop: one step with the chained transform it is given
        loss = lambda p: 0.5 * jnp.sum((apply_fn(p, x) - y) ** 2)  # noqa: E731
        updates, _ = optimizer.update(jax.grad(loss)(params), optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    out, cb2 = quantize.finetune_centroids(
        lambda p, xb: xb @ p["params"]["l"]["kernel"], params, cb, idx, None, x, y,
        epochs=1, learning_rate=0.1, optimizer="sgd", fit_fn=fit_fn)
    W = np.array([[0.5, -1.0], [-1.0, 0.5]])
    g = x.T @ (x @ W - y)  # dL/dW
    expected = np.array([0.5 - 0.1 * (g[0, 0] + g[1, 1]), -1.0 - 0.1 * (g[0, 1] + g[1, 0])])
    np.testing.assert_allclose(cb2["l"], expected, rtol=1e-6)


# ------------------------------------------------------------------------- PQ / RQ


def test_compression_ratio_formulas_hand_numbers():
    assert quantize.kmeans_compression_ratio(16) == 8.0
    assert quantize.kmeans_compression_ratio(256) == 4.0
    # m=4096, n=4096, k=256, s=1024: 32*4096^2 / (32*256*4096 + 8*4096*1024)
    assert quantize.pq_compression_ratio(4096, 4096, 256, 1024) == pytest.approx(
        536870912 / (33554432 + 33554432))
    # m=100, n=10, k=4, t=2: 100 / (2*4 + 2*2*10) = 100 / 48
    assert quantize.rq_compression_ratio(100, 10, 4, 2) == pytest.approx(100 / 48)


def _low_rank_ish(seed=0, m=64, n=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, 4)) @ rng.normal(size=(4, n)) + 0.3 * rng.normal(size=(m, n))


def test_product_quantize_error_falls_with_blocks():
    W = _low_rank_ish()
    errs = []
    for s in (1, 2, 4, 8):
        pq = quantize.product_quantize(W, s, 8, seed=0)
        assert pq.codebooks.shape == (s, 8, 16 // s) and pq.codes.shape == (64, s)
        rebuilt = np.concatenate([pq.codebooks[i][pq.codes[:, i]] for i in range(s)], axis=1)
        np.testing.assert_allclose(rebuilt, pq.reconstruction, rtol=1e-6)
        assert pq.error == pytest.approx(float(np.sum((W - pq.reconstruction) ** 2)), rel=1e-4)
        assert pq.compression_ratio == quantize.pq_compression_ratio(64, 16, 8, s)
        errs.append(pq.error)
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))
    with pytest.raises(ValueError, match="n_blocks"):
        quantize.product_quantize(W, 3, 8)
    with pytest.raises(ValueError, match="k=65"):
        quantize.product_quantize(W, 2, 65)


def test_residual_quantize_error_falls_with_stages():
    W = _low_rank_ish(1)
    rq = quantize.residual_quantize(W, 4, 8, seed=0)
    assert rq.codebooks.shape == (4, 8, 16) and rq.codes.shape == (64, 4)
    assert all(a > b for a, b in zip(rq.errors, rq.errors[1:], strict=False))
    assert rq.errors[0] < float(np.sum(W**2))
    rebuilt = sum(rq.codebooks[j][rq.codes[:, j]] for j in range(4))
    np.testing.assert_allclose(rebuilt, rq.reconstruction, rtol=1e-5, atol=1e-6)
    assert rq.compression_ratio == pytest.approx(64 / (4 * 8 + 3 * 4 * 16))
    assert rq.storage_ratio == pytest.approx(32 * 64 * 16 / (32 * 4 * 8 * 16 + 4 * 64 * 3))
    one = quantize.residual_quantize(W, 1, 8, seed=0)
    assert one.error == pytest.approx(rq.errors[0])
    with pytest.raises(ValueError, match="n_stages"):
        quantize.residual_quantize(W, 0, 8)


# -------------------------------------------------------------------- binarization


def test_binarize_det_and_stoch():
    w = jnp.array([-2.0, -0.5, 0.0, 0.2, 3.0])
    np.testing.assert_array_equal(quantize.binarize(w), [-1, -1, 1, 1, 1])
    np.testing.assert_allclose(quantize.hard_sigmoid(w), [0, 0.25, 0.5, 0.6, 1])
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: quantize.binarize(w, "stoch", k))(keys))
    assert set(np.unique(draws)) == {-1.0, 1.0}
    np.testing.assert_allclose((draws == 1).mean(0), [0, 0.25, 0.5, 0.6, 1], atol=0.015)
    with pytest.raises(ValueError, match="mode"):
        quantize.binarize(w, "ternary")
    with pytest.raises(ValueError, match="key"):
        quantize.binarize(w, "stoch")


def test_binaryconnect_grad_goes_to_real_weights_and_clip():
    x = jnp.array([[1.0, 2.0, -1.0]])
    y = jnp.array([[0.5]])
    params = {"params": {"l": {"kernel": jnp.array([[0.3], [-0.2], [1.5]]), "bias": jnp.zeros(1)}}}

    def apply(p, xb):
        return xb @ p["params"]["l"]["kernel"] + p["params"]["l"]["bias"]

    bc = quantize.binaryconnect_apply_fn(apply, "det")
    wb = np.array([[1.0], [-1.0], [1.0]])
    out = float(bc(params, x)[0, 0])
    assert out == pytest.approx(1 - 2 - 1)
    g = jax.grad(lambda p: 0.5 * jnp.sum((bc(p, x) - y) ** 2))(params)
    # dC/dw_b = x^T (x w_b - y), applied to the real-valued w
    np.testing.assert_allclose(g["params"]["l"]["kernel"], np.asarray(x).T * (out - 0.5))
    clipped = quantize.clip_project(params)
    np.testing.assert_allclose(clipped["params"]["l"]["kernel"], [[0.3], [-0.2], [1.0]])
    np.testing.assert_array_equal(quantize.binarize_params(params)["params"]["l"]["kernel"], wb)
    sb = quantize.binaryconnect_apply_fn(apply, "stoch", seed=1)
    o = np.asarray(sb(params, x))
    np.testing.assert_array_equal(o, np.asarray(sb(params, x)))  # deterministic under seed


def test_binaryconnect_training_with_fit():
    from coblax.nn.train import fit

    x, y = _blobs()
    bc = quantize.binaryconnect_apply_fn(_mlp_apply, "det")
    p0 = _mlp_params(0)
    acc0 = np.mean(np.argmax(np.asarray(bc(p0, x)), -1) == y)
    params = fit(bc, p0, x, y, epochs=8, batch_size=32, learning_rate=3e-2,
                 project=quantize.clip_project, progress=False)
    for w in prune.kernels(params).values():
        assert float(jnp.max(jnp.abs(w))) <= 1.0
    acc = np.mean(np.argmax(np.asarray(bc(params, x)), -1) == y)
    assert acc0 < 0.5 and acc > 0.9


def test_sign_ste_forward_and_hand_derivative():
    x = jnp.array([-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.5])
    np.testing.assert_array_equal(quantize.sign_ste(x), [-1, -1, -1, 1, 1, 1, 1])
    up = jnp.arange(1.0, 8.0)
    g = jax.grad(lambda v: jnp.sum(up * quantize.sign_ste(v)))(x)
    # g_r = g_q * 1_{|r| <= 1}
    np.testing.assert_array_equal(g, [0, 2, 3, 4, 5, 6, 0])


def test_binarized_mlp_matches_numpy_forward():
    model = quantize.BinarizedMLP(hidden=(8, 8), num_classes=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert sorted(prune.kernels(variables)) == ["fc1", "fc2", "fc3"]
    p = variables["params"]

    def ln(h, q):
        mu = h.mean(-1, keepdims=True)
        var = h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-6) * np.asarray(q["scale"]) + np.asarray(q["bias"])

    def sgn(v):
        return np.where(v >= 0, 1.0, -1.0)

    h = np.asarray(x).reshape(5, -1)
    for i in (1, 2):
        h = h @ sgn(np.asarray(p[f"fc{i}"]["kernel"])) + np.asarray(p[f"fc{i}"]["bias"])
        h = sgn(ln(h, p[f"norm{i}"]))
    out = ln(h @ sgn(np.asarray(p["fc3"]["kernel"])) + np.asarray(p["fc3"]["bias"]),
             p["norm3"])
    (_, logits), g = jax.jit(jax.value_and_grad(
        lambda v: (jnp.sum(model.apply(v, x) ** 2), model.apply(v, x)), has_aux=True))(variables)
    np.testing.assert_allclose(logits, out, rtol=1e-4, atol=1e-4)
    k1 = np.asarray(p["fc1"]["kernel"])
    assert k1.min() >= -1 and k1.max() < 1 and (k1 < 0).any() and (k1 > 0).any()
    assert all(np.isfinite(np.asarray(t)).all() for t in jax.tree.leaves(g))
    assert float(jnp.abs(g["params"]["fc1"]["kernel"]).sum()) > 0


def test_glorot_lr_factor_and_scale_by_hand():
    assert quantize.glorot_lr_factor((64, 300)) == pytest.approx(np.sqrt(364 / 1.5))
    assert quantize.glorot_lr_factor((3, 3, 2, 4)) == pytest.approx(6.0)  # sqrt((2 + 4) * 9 / 1.5)
    with pytest.raises(ValueError, match="2 dimensions"):
        quantize.glorot_lr_factor((5,))
    params = {"params": {"fc1": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}}
    tx = quantize.glorot_lr_scale()
    upd, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(upd["params"]["fc1"]["kernel"], np.full((4, 2), 2.0))  # sqrt(6 / 1.5)
    np.testing.assert_array_equal(upd["params"]["fc1"]["bias"], np.ones(2))


def test_binaryconnect_mlp_matches_numpy_forward_in_eval_mode():
    model = quantize.BinaryConnectMLP(hidden=(8,), num_classes=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2, 3)), jnp.float32)
    v = model.init(jax.random.key(0), x)
    assert sorted(prune.kernels(v)) == ["fc1", "fc2"] and "bias" not in v["params"]["fc1"]
    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), v)
    p, st = v["params"], v["batch_stats"]

    def bn(h, i):
        q, s = p[f"bn{i}"], st[f"bn{i}"]
        return ((h - np.asarray(s["mean"])) / np.sqrt(np.asarray(s["var"]) + 1e-4) * np.asarray(q["scale"])
                + np.asarray(q["bias"]))

    h = np.maximum(bn(np.asarray(x).reshape(5, -1) @ np.asarray(p["fc1"]["kernel"]), 1), 0)
    out = bn(h @ np.asarray(p["fc2"]["kernel"]), 2)
    np.testing.assert_allclose(model.apply(v, x), out, rtol=1e-5, atol=1e-5)


def test_stochastic_binaryconnect_with_batch_norm_learns_blobs():
    # Courbariaux et al.'s recipe: batch norm, clip to [-1, 1], Glorot-scaled learning rates.
    from coblax.nn.train import evaluate, fit

    x, y = _blobs()
    model = quantize.BinaryConnectMLP(hidden=(64,), num_classes=3)
    v0 = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    ev = functools.partial(model.apply, train=False)
    accs = {}
    for mode in ("det", "stoch"):
        bc = quantize.binaryconnect_apply_fn(functools.partial(model.apply, train=True), mode, seed=0)
        v = fit(bc, v0, x, y, epochs=20, batch_size=32, optimizer=optax.chain(optax.adam(1e-3),
                                                                             quantize.glorot_lr_scale()),
                project=quantize.clip_project, mutable=("batch_stats",), seed=0, progress=False)
        for w in prune.kernels(v).values():
            assert float(jnp.max(jnp.abs(w))) <= 1.0
        assert not np.allclose(v["batch_stats"]["bn1"]["var"], 1.0)  # running statistics were updated
        accs[mode] = {"sign": evaluate(ev, quantize.binarize_params(v, "det"), x, y),
                      "real": evaluate(ev, v, x, y)}
    # 3 classes: chance is 1/3.
    assert accs["det"]["sign"] > 0.95
    assert accs["stoch"]["real"] > 0.9 and accs["stoch"]["sign"] > 0.75, accs
