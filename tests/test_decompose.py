"""Decomposition: exactness at m = 1 for every layer type and scheme; Eckart-Young."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.lowrank.decompose import (
    SCHEMES,
    factored_apply,
    factorize,
    factorize_whitened,
    get_kernel,
    input_grams,
    masked_scales,
    trace_layers,
    truncate,
)
from coblax.nn.models import MODEL_NAMES, build_model


class Zoo(nn.Module):
    """Every conv configuration the decomposition must handle."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 5), strides=(2, 1), padding="SAME", name="same_s21")(x)
        x = nn.Conv(7, (5, 3), strides=(1, 2), padding="VALID", name="valid_s12")(x)
        x = nn.Conv(8, (3, 3), strides=2, padding=((2, 0), (1, 3)), name="explicit_s2")(x)
        x = nn.Conv(5, (3, 3), padding=1, use_bias=False, name="int_pad_nobias")(x)
        x = nn.Conv(4, (1, 1), name="pointwise")(x)
        x = nn.Conv(4, (3, 3), feature_group_count=4, name="depthwise")(x)
        h = nn.Dense(6, name="dense_seq")(x)  # dense over the channel axis of a 4-D input
        return nn.Dense(10, name="head")(h.reshape(h.shape[0], -1))


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_ones_reproduces_every_layer_type(scheme):
    model = Zoo()
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 17, 16, 3))
    params = model.init(jax.random.PRNGKey(1), x)
    traced = {l.name: l for l in trace_layers(model, params, x)}
    assert not traced["depthwise"].decomposable and "depthwise" in traced["depthwise"].reason
    ref = model.apply(params, x)
    for name, layer in traced.items():
        if not layer.decomposable:
            continue
        f = factorize(get_kernel(params, name), layer, scheme)
        # relaxed form, m = 1
        out = factored_apply(model, params, {name: f}, x, masked_scales({name: f}, {name: jnp.ones_like(f.sigma)}))
        assert _rel(out, ref) < 1e-5, name
        # truncated form at full rank
        out = factored_apply(model, params, {name: truncate(f, np.ones(f.sigma.shape[0]))}, x)
        assert _rel(out, ref) < 1e-5, name


# The BatchNorm zoo (32x32, eval mode, moved running statistics) is checked in test_zoo.py.
BN_ZOO = ("resnet20", "mobilenet_v1", "vgg16_bn")


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in BN_ZOO])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bundled_models_all_layers_at_once(name, scheme):
    shape = (28, 28, 1) if name in ("lenet5", "lenet_300_100") else (8, 8, 1)
    model = build_model(name, num_classes=10)
    x = jax.random.uniform(jax.random.PRNGKey(2), (4,) + shape)
    params = model.init(jax.random.PRNGKey(3), x)
    layers = [l for l in trace_layers(model, params, x) if l.decomposable]
    fs = {l.name: factorize(get_kernel(params, l.name), l, scheme) for l in layers}
    out = factored_apply(model, params, fs, x, masked_scales(fs, {n: jnp.ones_like(f.sigma) for n, f in fs.items()}))
    assert _rel(out, model.apply(params, x)) < 1e-5


def _kernel_from(f):
    """Rebuild the (truncated) kernel from factors by composing the two maps."""
    first, second = np.asarray(f.first, np.float64), np.asarray(f.second, np.float64)
    if f.kind == "dense":
        return first @ second
    if f.scheme == "zhang":
        return np.einsum("xycr,rn->xycn", first, second[0, 0])
    # tai: W[x, y, c, n] = sum_r first[x, 0, c, r] second[0, y, r, n]
    return np.einsum("xcr,yrn->xycn", first[:, 0], second[0])


@pytest.mark.parametrize("kind,scheme", [("dense", "tai"), ("conv", "tai"), ("conv", "zhang")])
def test_eckart_young_error_at_rank_r(kind, scheme):
    rng = np.random.default_rng(0)
    if kind == "dense":
        model, x = nn.Dense(12), jnp.ones((1, 20))
    else:
        model, x = nn.Conv(12, (3, 3), padding="SAME"), jnp.ones((1, 6, 6, 5))
    params = model.init(jax.random.PRNGKey(0), x)
    kernel = rng.normal(size=params["params"]["kernel"].shape).astype(np.float32)
    params = {"params": {"kernel": jnp.asarray(kernel), "bias": params["params"]["bias"]}}
    layer = trace_layers(model, params, x)[0]
    f = factorize(kernel, layer, scheme)
    s = np.asarray(f.sigma, np.float64)
    for r in (1, 3, len(s) // 2, len(s)):
        mask = np.zeros(len(s))
        mask[:r] = 1
        approx = _kernel_from(truncate(f, mask))
        err = np.linalg.norm(approx - kernel.astype(np.float64))
        assert err == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-4, abs=1e-4)


# -- whitened (data-aware) spectrum ----------------------------------------------------


class _One(nn.Module):
    """A single named layer (a top-level module has no path to name it by)."""

    layer: nn.Module

    def __call__(self, x):
        return self.layer(x)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_whitened_all_ones_reproduces_every_layer_type(scheme):
    model = Zoo()
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 17, 16, 3))
    params = model.init(jax.random.PRNGKey(1), x)
    layers = [l for l in trace_layers(model, params, x) if l.decomposable]
    grams = input_grams(model, params, layers, np.asarray(x), scheme, batch_size=2)
    ref = model.apply(params, x)
    for layer in layers:
        f = factorize_whitened(get_kernel(params, layer.name), layer, scheme, grams[layer.name])
        w = factorize(get_kernel(params, layer.name), layer, scheme)
        assert f.first.shape == w.first.shape and f.second.shape == w.second.shape  # same costs
        out = factored_apply(model, params, {layer.name: f}, x,
                             masked_scales({layer.name: f}, {layer.name: jnp.ones_like(f.sigma)}))
        assert _rel(out, ref) < 1e-5, layer.name
        out = factored_apply(model, params, {layer.name: truncate(f, np.ones(f.sigma.shape[0]))}, x)
        assert _rel(out, ref) < 1e-5, layer.name


@pytest.mark.parametrize("kind", ["dense", "zhang"])
def test_whitened_truncation_is_optimal_for_the_response(kind):
    """Eckart–Young in the data metric: the response error at rank r is the tail of σ,
    and no larger than plain weight-SVD truncation's."""
    rng = np.random.default_rng(0)
    if kind == "dense":
        model = _One(nn.Dense(12, use_bias=False, name="k"))
        x = jnp.asarray(rng.normal(size=(64, 20)) * np.linspace(0.1, 3.0, 20), jnp.float32)
        scheme = "tai"
    else:
        model = _One(nn.Conv(6, (3, 3), padding="SAME", use_bias=False, name="k"))
        x = jnp.asarray(rng.normal(size=(8, 7, 7, 4)) * np.array([0.1, 1.0, 2.0, 5.0]), jnp.float32)
        scheme = "zhang"
    params = model.init(jax.random.PRNGKey(0), x)
    (layer,) = trace_layers(model, params, x)
    gram = input_grams(model, params, [layer], np.asarray(x), scheme)[layer.name]
    f = factorize_whitened(get_kernel(params, layer.name), layer, scheme, gram, eps=1e-10)
    w = factorize(get_kernel(params, layer.name), layer, scheme)
    ref = model.apply(params, x)
    r = 3
    mask = np.zeros(f.sigma.shape[0])
    mask[:r] = 1.0
    err_f = float(jnp.linalg.norm(factored_apply(model, params, {layer.name: truncate(f, mask)}, x) - ref))
    err_w = float(jnp.linalg.norm(factored_apply(model, params, {layer.name: truncate(w, mask)}, x) - ref))
    tail = float(np.sqrt(np.sum(np.asarray(f.sigma, np.float64)[r:] ** 2)))
    assert err_f == pytest.approx(tail, rel=1e-3)
    assert err_f <= err_w * (1 + 1e-4)


def test_whitened_gram_must_match_the_kernel():
    model = _One(nn.Dense(3, name="k"))
    x = jnp.ones((2, 4))
    params = model.init(jax.random.PRNGKey(0), x)
    (layer,) = trace_layers(model, params, x)
    with pytest.raises(ValueError, match="Gram"):
        factorize_whitened(get_kernel(params, layer.name), layer, "tai", np.eye(5))
