"""Tests for coblax.compress.prune: hand counts, closed forms and brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.compress import prune
from helpers import blobs as _blobs
from helpers import mlp_apply as _mlp_apply
from helpers import mlp_params


def _mlp_params(seed: int = 0, sizes=(6, 8, 3)) -> dict:
    return mlp_params(seed, sizes)


# ----------------------------------------------------------------------- tree helpers


def test_layer_names_follow_module_paths():
    params = {
        "params": {
            "conv1": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)},
            "Fire_0": {"squeeze": {"kernel": jnp.ones((1, 1, 2, 4))}},
        }
    }
    assert sorted(prune.kernels(params)) == ["Fire_0/squeeze", "conv1"]
    masks = prune.full_masks(params)
    assert masks["params"]["conv1"]["bias"] is None
    assert masks["params"]["Fire_0"]["squeeze"]["kernel"].shape == (1, 1, 2, 4)


def test_apply_masks_zeroes_only_pruned_kernel_entries():
    params = _mlp_params()
    m = np.ones((6, 8), bool)
    m[0, :3] = False
    masks = prune.masks_from_layers(params, {"fc1": m})
    out = prune.apply_masks(params, masks)
    k = np.asarray(out["params"]["fc1"]["kernel"])
    assert np.all(k[0, :3] == 0)
    np.testing.assert_array_equal(k[m], np.asarray(params["params"]["fc1"]["kernel"])[m])
    np.testing.assert_array_equal(out["params"]["fc2"]["kernel"], params["params"]["fc2"]["kernel"])
    # also inside jit (as transform_grads / project use it)
    out_j = jax.jit(lambda p: prune.apply_masks(p, masks))(params)
    np.testing.assert_array_equal(out_j["params"]["fc1"]["kernel"], k)


# -------------------------------------------------------------------- magnitude masks


def test_magnitude_masks_layer_scope_hand_example():
    params = {"params": {
        "a": {"kernel": jnp.array([[0.5, -0.1], [0.3, -2.0]])},
        "b": {"kernel": jnp.array([1.0, -0.05, 0.2, 0.04, -3.0])},
    }}
    masks = prune.layer_masks(prune.magnitude_masks(params, 0.5))
    # a: floor(0.5*4)=2 smallest |w| are 0.1 and 0.3; b: floor(2.5)=2 -> 0.04, 0.05
    np.testing.assert_array_equal(masks["a"], [[True, False], [False, True]])
    np.testing.assert_array_equal(masks["b"], [True, False, True, False, True])


def test_magnitude_masks_global_scope_and_dict():
    params = {"params": {
        "a": {"kernel": jnp.array([0.5, -0.1, 0.3, -2.0])},
        "b": {"kernel": jnp.array([1.0, -0.05, 0.2, 0.04, -3.0, 0.01])},
    }}
    g = prune.layer_masks(prune.magnitude_masks(params, 0.5, scope="global"))
    # 10 weights, prune 5 smallest globally: 0.01, 0.04, 0.05, 0.1, 0.2
    np.testing.assert_array_equal(g["a"], [True, False, True, True])
    np.testing.assert_array_equal(g["b"], [True, False, False, False, True, False])
    d = prune.layer_masks(prune.magnitude_masks(params, {"b": 0.5}))
    assert d["a"].all() and d["b"].sum() == 3


def test_magnitude_masks_prior_keeps_pruned_and_counts_exact():
    params = _mlp_params(1, sizes=(20, 30, 10))
    m1 = prune.magnitude_masks(params, 0.3)
    # perturb so the pruned weights would not be the smallest any more
    bumped = prune.map_kernels(lambda n, w: w + 5.0 * (w == w), prune.apply_masks(params, m1))
    m2 = prune.magnitude_masks(bumped, 0.6, prior_masks=m1)
    for name, a in prune.layer_masks(m1).items():
        b = prune.layer_masks(m2)[name]
        assert not np.any(b & ~a)  # monotone
        assert a.size - b.sum() == int(np.floor(0.6 * a.size + 1e-9))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.5, "scope": "neuron"}, "scope"),
        ({"sparsity": {"fc1": 0.5}, "scope": "global"}, "sparsity"),
        ({"sparsity": {"nope": 0.5}}, "unknown layers"),
    ],
)
def test_magnitude_masks_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune.magnitude_masks(_mlp_params(), **kwargs)


def test_magnitude_prune_stage_report():
    params = _mlp_params(2)
    out, rep = prune.magnitude_prune(params, prune.MagnitudeSpec(sparsity=0.75))
    assert rep.layers["fc1"] == prune.LayerSparsity(weights=48, kept=12)
    assert rep.layers["fc2"] == prune.LayerSparsity(weights=24, kept=6)
    assert rep.total_kept == 18 and rep.compression == pytest.approx(72 / 18)
    assert int(np.sum(np.asarray(out["params"]["fc1"]["kernel"]) != 0)) == 12
    assert rep.to_dict()["layers"]["fc1"]["kept_fraction"] == pytest.approx(0.25)


def test_sparsity_schedule():
    np.testing.assert_allclose(prune.sparsity_schedule(0.75, 2), [0.5, 0.75])
    np.testing.assert_allclose(prune.sparsity_schedule(0.9, 3, "linear"), [0.3, 0.6, 0.9])
    with pytest.raises(ValueError, match="steps"):
        prune.sparsity_schedule(0.5, 0)


def test_iterative_magnitude_prune_keeps_masks_through_retraining():
    x, y = _blobs()
    params = _mlp_params(3)
    out, masks, rep = prune.iterative_magnitude_prune(
        _mlp_apply, params, x, y, sparsity=0.75, steps=2, retrain_epochs=3,
        train_kwargs={"learning_rate": 1e-2, "batch_size": 32, "progress": False},
    )
    lm = prune.layer_masks(masks)
    for name, w0 in prune.kernels(params).items():
        w = np.asarray(prune.kernels(out)[name])
        assert lm[name].sum() == w.size - int(np.floor(0.75 * w.size))
        assert np.all(w[~lm[name]] == 0.0)  # pruned stay exactly zero under Adam
        # retraining moved the kept weights
        assert not np.allclose(w[lm[name]], np.asarray(w0)[lm[name]])
    assert [s["stage"] for s in rep.stages] == [1, 2]
    assert rep.stages[0]["kept_fraction"] > rep.stages[1]["kept_fraction"]
    assert rep.layers["fc1"].kept_fraction == pytest.approx(12 / 48)
    # the retrained sparse net still separates the blobs
    acc = np.mean(np.argmax(np.asarray(_mlp_apply(out, x)), -1) == y)
    assert acc > 0.9


def test_score_masks_keeps_the_prior_zeros_at_a_lower_target():
    """Issue 7: a prior sparser than the target had some of its zeros un-pruned."""
    scores = {"l": np.arange(1.0, 11.0)}
    prior = {"l": np.array([False] * 5 + [True] * 5)}  # 50 % pruned before
    keep = prune.score_masks(scores, 0.3, prior=prior)["l"]
    assert not np.any(keep & ~prior["l"])  # nothing the prior pruned comes back
    np.testing.assert_array_equal(keep, prior["l"])
    keep_g = prune.score_masks(scores, 0.3, scope="global", prior=prior)["l"]
    np.testing.assert_array_equal(keep_g, prior["l"])
    # a higher target still prunes more (smallest surviving scores first)
    keep_hi = prune.score_masks(scores, 0.7, prior=prior)["l"]
    assert keep_hi.tolist() == [False] * 7 + [True] * 3


def test_iterative_magnitude_prune_rejects_reserved_train_kwargs():
    x, y = _blobs(n=16)
    with pytest.raises(ValueError, match="project"):
        prune.iterative_magnitude_prune(
            _mlp_apply, _mlp_params(), x, y, sparsity=0.5, steps=1, retrain_epochs=1,
            train_kwargs={"project": None})


# --------------------------------------------------------------------------------- DNS


def test_dns_mask_update_three_regimes():
    w = jnp.array([0.05, -0.05, 0.3, -0.3, 0.3, 0.9, -0.9])
    t = jnp.array([True, False, True, True, False, False, True])
    h = prune.dns_mask_update(w, t, 0.2, 0.5)
    # |w| < a -> 0; a <= |w| < b -> previous T; |w| >= b -> 1
    np.testing.assert_array_equal(h, [False, False, True, True, False, True, True])


def test_dns_thresholds_hand():
    params = {"params": {"l": {"kernel": jnp.array([1.0, -3.0])}}}
    thr = prune.dns_thresholds(params, rate=1.0, margin=0.5)
    # mean |w| = 2, std |w| = 1 -> a = 3, b = 3.5
    assert thr["l"] == pytest.approx((3.0, 3.5))
    assert prune.dns_thresholds(params, rate=-5.0)["l"] == (0.0, 0.0)
    assert prune.dns_update_probability(0) == 1.0
    assert prune.dns_update_probability(10_000, gamma=1e-4) == pytest.approx(0.5)


def test_dns_splices_back_a_wrongly_pruned_weight():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 2)).astype(np.float32)
    y = (x @ np.array([[3.0], [2.0]])).astype(np.float32)
    params = {"params": {"lin": {"kernel": jnp.array([[0.05], [1.0]], jnp.float32)}}}

    def apply(p, xb):
        return xb @ p["params"]["lin"]["kernel"]

    out, masks, rep = prune.dns(
        apply, params, x, y, rate=0.0, margin=0.05, epochs=20, learning_rate=0.05,
        batch_size=32, optimizer="sgd", loss_fn=lambda o, t: jnp.mean((o - t) ** 2))
    # a = mean|W| = 0.525 -> w0 = 0.05 starts pruned; its straight-through
    # gradient grows it past b = 0.575 and surgery restores it.
    assert rep.extra["initial_kept"]["lin"] == 1
    assert rep.extra["spliced"]["lin"] == 1
    np.testing.assert_array_equal(prune.layer_masks(masks)["lin"], [[True], [True]])
    np.testing.assert_allclose(out["params"]["lin"]["kernel"], [[3.0], [2.0]], atol=1e-2)


def test_dns_prunes_small_weights_for_good():
    x, y = _blobs(n=128)
    params = _mlp_params(4)
    out, masks, rep = prune.dns(_mlp_apply, params, x, y, rate=0.5, epochs=2,
                                learning_rate=1e-3, batch_size=32)
    for name, m in prune.layer_masks(masks).items():
        w = np.asarray(prune.kernels(out)[name])
        assert np.all(w[~m] == 0) and 0 < m.sum() < m.size
        assert rep.layers[name].kept == m.sum()


# --------------------------------------------------------------------------------- OBD


def _lsq_problem(seed=0, n=40, d=5):
    rng = np.random.default_rng(seed)
    X = jnp.asarray(rng.normal(size=(n, d)) + rng.normal(size=(n, 1)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
    return X, t


def test_hessian_diag_exact_matches_closed_form():
    X, t = _lsq_problem()

    def loss(W):  # (1/2N) ||X W - t||^2  ->  H = kron(X^T X / N, I_3) for vec(W) row-major
        return 0.5 * jnp.mean(jnp.sum((X @ W - t) ** 2, axis=1))

    W = jnp.ones((5, 3), jnp.float32)
    d = prune.hessian_diag_exact(loss, W)
    xtx = np.asarray(X.T @ X) / X.shape[0]
    np.testing.assert_allclose(d, np.repeat(np.diag(xtx)[:, None], 3, axis=1), rtol=1e-5)


def test_hutchinson_close_to_exact_diagonal():
    X, t = _lsq_problem(1)
    W0 = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)), jnp.float32)

    def loss(W):  # non-quadratic, non-diagonal Hessian
        logits = jnp.tanh(X @ W)
        return jnp.mean(jnp.sum((logits - t) ** 2, axis=1))

    exact = np.asarray(prune.hessian_diag_exact(loss, W0))
    dense = np.asarray(jax.jit(jax.hessian(lambda v: loss(v.reshape(5, 3))))(W0.ravel()))
    np.testing.assert_allclose(exact.ravel(), np.diag(dense), rtol=1e-4, atol=1e-6)
    est = np.asarray(prune.hessian_diag_hutchinson(loss, W0, jax.random.key(0), n_samples=4000,
                                                   batch_size=1000))
    # variance per probe is sum_{j != k} H_kj^2; 4000 probes -> a few percent
    assert np.linalg.norm(est - exact) / np.linalg.norm(exact) < 0.08
    one = np.asarray(prune.hessian_diag_hutchinson(loss, W0, jax.random.key(0), n_samples=1))
    assert np.linalg.norm(one - exact) > np.linalg.norm(est - exact)


def test_obd_saliency_and_prune():
    x, y = _blobs(n=64)
    params = _mlp_params(5)

    def loss(p, xb, yb):
        logits = _mlp_apply(p, xb)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(len(yb)), yb])

    data = (jnp.asarray(x), jnp.asarray(y))
    # fc1 (48 weights): Hutchinson
    sal = prune.obd_saliency(loss, params, data=data, hessian="exact", exact_max_size=30)
    w2 = np.asarray(params["params"]["fc2"]["kernel"], np.float64)
    h2 = np.asarray(prune.hessian_diag_exact(
        lambda v: loss(prune.replace_kernels(params, {"fc2": v}), *data), w2.astype(np.float32)))
    np.testing.assert_allclose(sal["fc2"], 0.5 * h2 * w2**2, rtol=1e-4, atol=1e-9)
    out, masks, rep = prune.obd_prune(_mlp_apply, params, x, y, sparsity=0.5, hessian="exact",
                                      exact_max_size=30)
    m2 = prune.layer_masks(masks)["fc2"]
    assert m2.sum() == 12
    assert sal["fc2"][~m2].max() <= sal["fc2"][m2].min()
    assert rep.extra["saliency_sum"]["fc2"] == pytest.approx(sal["fc2"][~m2].sum())
    assert rep.extra["hessian"] == "exact"


def _softmax_np(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_gauss_newton_diag_of_softmax_regression_closed_form_and_hessian():
    # z = x W + b: G_ij = (1/N) sum_n x_ni^2 (p_nj - p_nj^2), and G = H (the model is linear).
    x, y = _blobs(n=37)
    rng = np.random.default_rng(3)
    params = {"params": {"fc1": {"kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(size=3), jnp.float32)}}}

    def apply(p, xb):
        return xb @ p["params"]["fc1"]["kernel"] + p["params"]["fc1"]["bias"]

    x64 = np.asarray(x, np.float64)
    p = _softmax_np(x64 @ np.asarray(params["params"]["fc1"]["kernel"], np.float64)
                    + np.asarray(params["params"]["fc1"]["bias"], np.float64))
    ref = (x64**2).T @ (p - p**2) / len(x)
    for bs in (5, 16, 64):  # 37 examples: padded chunks must not count
        g = prune.gauss_newton_diag(apply, params, x, batch_size=bs)
        np.testing.assert_allclose(g["fc1"], ref, rtol=1e-5, atol=1e-7)

    def loss(pp, xb, yb):
        z = apply(pp, xb)
        return jnp.mean(jax.nn.logsumexp(z, -1) - z[jnp.arange(len(yb)), yb])

    data = (jnp.asarray(x), jnp.asarray(y))
    w = np.asarray(params["params"]["fc1"]["kernel"], np.float64)
    h = np.asarray(prune.hessian_diag_exact(
        lambda v, *d: loss(prune.replace_kernels(params, {"fc1": v}), *d), w.astype(np.float32), *data))
    np.testing.assert_allclose(g["fc1"], h, rtol=1e-4, atol=1e-7)
    sal = prune.obd_saliency(None, params, data=data, apply_fn=apply)
    np.testing.assert_allclose(sal["fc1"], 0.5 * ref * w**2, rtol=1e-5, atol=1e-9)
    exact = prune.obd_saliency(loss, params, data=data, hessian="exact")
    np.testing.assert_allclose(sal["fc1"], exact["fc1"], rtol=1e-4, atol=1e-9)


def test_gauss_newton_diag_of_mlp_matches_jacobian_reference():
    # Two-layer tanh net: G = (1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n built from full Jacobians.
    x, _ = _blobs(n=20)
    params = _mlp_params(4)
    g = prune.gauss_newton_diag(_mlp_apply, params, x, batch_size=8)
    names = ["fc1", "fc2"]
    kern = prune.kernels(params)

    def flat_logits(v, xi):
        ws, i = {}, 0
        for nme in names:
            size = int(np.size(kern[nme]))
            ws[nme] = v[i:i + size].reshape(kern[nme].shape)
            i += size
        return _mlp_apply(prune.replace_kernels(params, ws), xi[None])[0]

    v0 = jnp.concatenate([jnp.ravel(kern[nme]) for nme in names])
    G = np.zeros((v0.size, v0.size))
    for xi in jnp.asarray(x):
        J = np.asarray(jax.jacrev(flat_logits)(v0, xi), np.float64)  # (K, P)
        p = _softmax_np(np.asarray(flat_logits(v0, xi), np.float64))
        G += J.T @ (np.diag(p) - np.outer(p, p)) @ J
    ref = np.diag(G) / len(x)
    got = np.concatenate([np.ravel(g[nme]) for nme in names])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-8)
    assert (got >= 0).all()


def test_obd_hessian_choice_is_checked():
    x, y = _blobs(n=16)
    params = _mlp_params(0)
    data = (jnp.asarray(x), jnp.asarray(y))
    with pytest.raises(ValueError, match="hessian must be one of"):
        prune.obd_saliency(None, params, data=data, hessian="lm", apply_fn=_mlp_apply)
    with pytest.raises(ValueError, match="needs apply_fn"):
        prune.obd_saliency(None, params, data=data)
    with pytest.raises(ValueError, match="needs loss_fn"):
        prune.obd_saliency(None, params, data=data, hessian="hutchinson")
    with pytest.raises(ValueError, match="softmax cross-entropy"):
        prune.obd_prune(_mlp_apply, params, x, y, sparsity=0.5, loss_fn=lambda z, t: jnp.mean(z**2))
    _, masks, rep = prune.obd_prune(_mlp_apply, params, x, y, sparsity=0.5)
    assert rep.extra["hessian"] == "gauss_newton" and prune.layer_masks(masks)["fc2"].sum() == 12


def test_obd_prune_in_stages_recomputes_saliencies():
    x, y = _blobs(n=32)
    params = _mlp_params(2)
    _, m1, _ = prune.obd_prune(_mlp_apply, params, x, y, sparsity=0.3)
    sal = prune.obd_saliency(None, params, data=(jnp.asarray(x),), apply_fn=_mlp_apply)
    assert {n: v.tolist() for n, v in prune.layer_masks(m1).items()} == {
        n: v.tolist() for n, v in prune.score_masks(sal, 0.3).items()}
    out, m3, rep = prune.obd_prune(_mlp_apply, params, x, y, sparsity=0.7, steps=3)
    keep = prune.layer_masks(m3)
    assert keep["fc1"].sum() == 48 - int(0.7 * 48) and keep["fc2"].sum() == 24 - int(0.7 * 24)
    # Stage 1 is one-shot OBD at 1 - 0.3^(1/3); later stages only shrink its masks.
    _, first, _ = prune.obd_prune(_mlp_apply, params, x, y, sparsity=1 - 0.3 ** (1 / 3))
    assert all((keep[n] <= prune.layer_masks(first)[n]).all() for n in keep)
    # Stage 3's saliencies are those of the stage-2 net: the last deletions are its lowest kept ones.
    _, two, _ = prune.obd_prune(_mlp_apply, params, x, y, sparsity=1 - 0.3 ** (2 / 3), steps=2)
    mid = prune.apply_masks(params, two)
    s2 = prune.obd_saliency(None, mid, data=(jnp.asarray(x),), apply_fn=_mlp_apply)
    k2 = prune.layer_masks(two)["fc2"]
    assert (keep["fc2"] == prune.score_masks({"fc2": s2["fc2"]}, 0.7, prior={"fc2": k2})["fc2"]).all()
    assert rep.extra["steps"] == 3 and rep.kept_fraction == pytest.approx(keep["fc1"].sum() / 72
                                                                          + keep["fc2"].sum() / 72)


# --------------------------------------------------------------------------------- OBS


def _obs_problem(seed=0, n=50, d_in=6, d_out=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d_in)) @ rng.normal(size=(d_in, d_in))  # correlated inputs
    W = rng.normal(size=(d_in, d_out))
    return W, X


def _err(X, W, W2):
    return float(np.sum((X @ W - X @ W2) ** 2)) / X.shape[0]


def test_obs_single_deletion_matches_brute_force():
    W, X = _obs_problem()
    d_in, d_out = W.shape
    brute = np.empty_like(W)
    for q in range(d_in):
        keep = np.arange(d_in) != q
        for c in range(d_out):
            w_new, *_ = np.linalg.lstsq(X[:, keep], X @ W[:, c], rcond=None)
            brute[q, c] = np.sum((X @ W[:, c] - X[:, keep] @ w_new) ** 2) / X.shape[0]
    W1, mask = prune.obs_prune_layer(W, X, 1, damp=0.0)
    (q,), (c,) = np.nonzero(~mask)
    assert (q, c) == np.unravel_index(np.argmin(brute), brute.shape)
    sal = prune.obs_saliency(W, X, damp=0.0)
    np.testing.assert_allclose(sal, brute, rtol=1e-8, atol=1e-12)  # L_q = exact increase
    assert _err(X, W, W1) == pytest.approx(sal[q, c], rel=1e-8)
    assert W1[q, c] == 0.0
    # default damping picks the same weight
    _, mask_d = prune.obs_prune_layer(W, X, 1)
    np.testing.assert_array_equal(mask_d, mask)


def test_obs_many_deletions_equal_least_squares_refit():
    W, X = _obs_problem(1)
    W2, mask = prune.obs_prune_layer(W, X, 8, damp=0.0)
    assert (~mask).sum() == 8 and np.all(W2[~mask] == 0)
    for c in range(W.shape[1]):
        keep = mask[:, c]
        ref = np.zeros(W.shape[0])
        if keep.any():
            ref[keep], *_ = np.linalg.lstsq(X[:, keep], X @ W[:, c], rcond=None)
        np.testing.assert_allclose(W2[:, c], ref, atol=1e-8)
    # better than magnitude pruning of the same count without compensation
    mag = np.abs(W).ravel().argsort()[:8]
    Wm = W.copy().ravel()
    Wm[mag] = 0
    assert _err(X, W, W2) < _err(X, W, Wm.reshape(W.shape))


def test_obs_prune_params_and_errors():
    W, X = _obs_problem(2)
    params = {"params": {"fc": {"kernel": jnp.asarray(W, jnp.float32), "bias": jnp.zeros(3)}}}
    out, masks, rep = prune.obs_prune(params, {"fc": X}, 0.5, damp=0.0)
    assert rep.layers["fc"].kept == 9
    assert np.all(np.asarray(out["params"]["fc"]["kernel"])[~prune.layer_masks(masks)["fc"]] == 0)
    with pytest.raises(ValueError, match="n_prune"):
        prune.obs_prune_layer(W, X, W.size + 1)
    with pytest.raises(ValueError, match="X must have shape"):
        prune.obs_prune_layer(W, X[:, :3], 1)
    with pytest.raises(ValueError, match="unknown layers"):
        prune.obs_prune(params, {"nope": X}, 0.5)
