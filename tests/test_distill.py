"""Knowledge distillation: the loss against a NumPy hand computation, its gradient scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.nn.distill import distill, distill_loss, distill_targets, softmax_t
from coblax.nn.train import evaluate, fit
from tests.helpers import blobs, mlp_apply, mlp_params


def _np_softmax(z, t):
    e = np.exp((z - z.max(-1, keepdims=True)) / t)
    return e / e.sum(-1, keepdims=True)


def _np_loss(s, v, y, t, alpha):
    p, q = _np_softmax(v, t), _np_softmax(s, t)
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1).mean()
    ce = -np.log(_np_softmax(s, 1.0)[np.arange(len(y)), y]).mean()
    return alpha * t * t * kl + (1 - alpha) * ce


def test_seed_temperature_example():
    # Lecture, section 7: logits (100, 10, 1) at T = 1 and T = 100.
    z = jnp.array([100.0, 10.0, 1.0])
    np.testing.assert_allclose(softmax_t(z, 1.0), [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(softmax_t(z, 100.0), [0.56, 0.23, 0.21], atol=6e-3)


@pytest.mark.parametrize("t", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_loss_equals_hand_computation(t, alpha):
    rng = np.random.default_rng(0)
    s, v = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 5)) * 3
    y = rng.integers(0, 5, size=7)
    got = distill_loss(jnp.asarray(s), jnp.asarray(v), jnp.asarray(y), t, alpha)
    np.testing.assert_allclose(float(got), _np_loss(s, v, y, t, alpha), rtol=1e-5)


def test_soft_gradient_is_t_times_prob_difference():
    # d/dz [T^2 KL(p || softmax(z/T))] = T (q - p) per example (mean over the batch: / N).
    rng = np.random.default_rng(1)
    s, v = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    y = np.zeros(4, np.int32)
    for t in (1.0, 3.0, 10.0):
        g = jax.grad(lambda z, t=t: distill_loss(z, jnp.asarray(v), y, t, 1.0))(jnp.asarray(s))
        want = t * (_np_softmax(s, t) - _np_softmax(v, t)) / len(s)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)


def test_t_squared_keeps_soft_gradient_scale():
    # Hinton et al. Sec. 2.1: zero-mean logits, large T -> grad of KL ~ (z - v) / (N T^2);
    # with the T^2 factor the gradient tends to (z - v) / N whatever T is.
    rng = np.random.default_rng(2)
    s, v = rng.normal(size=(1, 10)), rng.normal(size=(1, 10))
    s, v = s - s.mean(), v - v.mean()
    limit = (s - v) / s.shape[-1]
    norms = []
    for t in (20.0, 50.0, 200.0):
        g = np.asarray(jax.grad(lambda z, t=t: distill_loss(z, jnp.asarray(v), np.zeros(1, np.int32), t, 1.0))(
            jnp.asarray(s)))
        np.testing.assert_allclose(g, limit, atol=0.1 * np.abs(limit).max() * 20 / t)
        norms.append(np.linalg.norm(g))
    assert max(norms) / min(norms) < 1.05


def test_bad_arguments():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(z, z, jnp.zeros(2, jnp.int32), 0.0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(z, z, jnp.zeros(2, jnp.int32), 1.0, 1.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        distill_targets(np.zeros(3), np.zeros(3))


def test_distill_trains_a_student():
    x, y = blobs(n=240, d=6, classes=3)
    teacher = fit(mlp_apply, mlp_params(0, (6, 16, 3)), x, y, epochs=20, batch_size=32,
                  learning_rate=1e-2, progress=False)
    student0 = mlp_params(1, (6, 4, 3))
    student = distill(mlp_apply, student0, x, y, teacher_apply=mlp_apply, teacher_params=teacher,
                      temperature=4.0, alpha=0.7, epochs=20, batch_size=32, learning_rate=1e-2,
                      progress=False)
    assert evaluate(mlp_apply, student, x, y) > 0.9
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(student))
