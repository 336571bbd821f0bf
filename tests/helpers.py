"""Small shared test fixtures: a two-layer tanh MLP and Gaussian blobs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def mlp_params(seed: int = 0, sizes=(6, 8, 3)) -> dict:
    """{"params": {fc1, fc2, ...}} with scaled normal kernels and zero biases."""
    rng = np.random.default_rng(seed)
    p = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        p[f"fc{i + 1}"] = {
            "kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
            "bias": jnp.zeros((b,), jnp.float32),
        }
    return {"params": p}


def mlp_apply(params, x):
    p = params["params"]
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def blobs(n=240, d=6, classes=3, seed=0):
    """Separable Gaussian clusters: (x float32 (n, d), y int32 (n,))."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 2.0
    y = rng.integers(0, classes, size=n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x, y
