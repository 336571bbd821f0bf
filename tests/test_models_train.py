"""Models (parameter counts by hand), deterministic training, safe checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.nn import train as T
from coblax.nn.models import build_model


def _count(params):
    return sum(np.size(a) for a in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize(
    "name,shape,expected",
    [
        ("lenet5", (28, 28, 1), 520 + 25_050 + 400_500 + 5_010),
        ("lenet_300_100", (28, 28, 1), 235_500 + 30_100 + 1_010),
        # fire module: squeeze 1x1 (C*s+s) + expand1x1 (s*e1+e1) + expand3x3 (9*s*e3+e3)
        ("squeezenet", (8, 8, 1), (9 * 32 + 32) + 2 * 0 + sum(
            c * s + s + s * e + e + 9 * s * e + e
            for c, s, e in [(32, 8, 16), (32, 8, 16), (32, 16, 32), (64, 16, 32)]
        ) + (64 * 10 + 10)),
    ],
)
def test_parameter_counts(name, shape, expected):
    model = build_model(name, num_classes=10)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
    assert _count(params) == expected


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid models: .*lenet5"):
        build_model("alexnet", num_classes=10)


def test_fit_is_deterministic_and_learns(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4, 4, 1)).astype(np.float32)
    y = (x.reshape(256, -1).sum(1) > 0).astype(np.int32)
    model = build_model("mlp", num_classes=2, hidden=(16,))
    p0 = model.init(jax.random.PRNGKey(0), x[:1])
    runs = [T.fit(model.apply, p0, x, y, epochs=5, batch_size=32, learning_rate=1e-2, seed=3, progress=False)
            for _ in range(2)]
    for a, b in zip(jax.tree_util.tree_leaves(runs[0]), jax.tree_util.tree_leaves(runs[1])):
        np.testing.assert_array_equal(a, b)
    assert T.evaluate(model.apply, runs[0], x, y) > 0.9
    # checkpoint round trip, bit-exact, and no pickle involved
    path = tmp_path / "ckpt.npz"
    T.save_params(path, runs[0], meta={"seed": 3})
    loaded = T.load_params(path)
    for a, b in zip(jax.tree_util.tree_leaves(runs[0]), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(runs[0])
    with np.load(path, allow_pickle=False) as data:
        assert "params/fc1/kernel" in data.files


def test_base_model_is_cached_and_reused(tmp_path):
    from coblax.app.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from coblax.app.experiment import train_base_model
    from coblax.nn.data import load_dataset

    cfg = RunConfig(data=DataConfig(limit_train=200), train=TrainConfig(epochs=1))
    data = load_dataset("digits", limit_train=200)
    mc = ModelConfig("mlp", {"hidden": [8]})
    first = train_base_model(cfg, mc, data, tmp_path, progress=False)
    second = train_base_model(cfg, mc, data, tmp_path, progress=False)
    assert (first.cached, second.cached) == (False, True)
    assert second.accuracy == first.accuracy
    for a, b in zip(jax.tree_util.tree_leaves(first.params), jax.tree_util.tree_leaves(second.params)):
        np.testing.assert_array_equal(a, b)
    # other training settings -> another cache entry
    other = train_base_model(RunConfig(data=cfg.data, train=TrainConfig(epochs=2)), mc, data, tmp_path, progress=False)
    assert not other.cached
    assert len(list((tmp_path / "models").glob("*.npz"))) == 2


def test_cosine_schedule_steps_follow_the_cosine_formula():
    # loss = w * label-free constant slope: each SGD update is -lr_k * g, so after all steps
    # w has moved by -g * sum_k lr_k, with lr_k = lr / 2 * (1 + cos(pi k / K)) (Loshchilov & Hutter)
    g, lr, n, bs, epochs = 0.5, 0.1, 40, 10, 3
    x = np.ones((n, 1), np.float32)
    y = np.zeros(n, np.int32)

    def apply_fn(p, xb):
        return jnp.concatenate([p["w"] * g * xb, jnp.zeros_like(xb)], axis=1)

    def loss_fn(logits, labels):  # d loss / d w = g exactly
        return jnp.mean(logits[:, 0])

    out = T.fit(apply_fn, {"w": jnp.zeros(())}, x, y, epochs=epochs, batch_size=bs, learning_rate=lr,
                optimizer="sgd", schedule="cosine", loss_fn=loss_fn, progress=False)
    k_total = epochs * n // bs
    rates = lr / 2 * (1 + np.cos(np.pi * np.arange(k_total) / k_total))
    np.testing.assert_allclose(float(out["w"]), -g * rates.sum(), rtol=1e-5)
    flat = T.fit(apply_fn, {"w": jnp.zeros(())}, x, y, epochs=epochs, batch_size=bs, learning_rate=lr,
                 optimizer="sgd", loss_fn=loss_fn, progress=False)
    np.testing.assert_allclose(float(flat["w"]), -g * lr * k_total, rtol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        T.fit(apply_fn, {"w": jnp.zeros(())}, x, y, epochs=1, optimizer="sgd", schedule="step",
              loss_fn=loss_fn, progress=False)


def test_schedule_is_a_cache_and_fingerprint_key_only_when_not_constant():
    from coblax.app.base_model import cache_settings
    from coblax.app.config import ModelConfig, RunConfig, TrainConfig
    from coblax.app.plan import config_fingerprint
    from coblax.nn.data import load_dataset

    data = load_dataset("digits", limit_train=100)
    mc = ModelConfig("mlp", {})
    constant = cache_settings(RunConfig(), mc, data, "d")
    # models cached before the key existed had exactly these training settings
    assert constant["train"] == {"epochs": 20, "batch_size": 64, "learning_rate": 1e-3, "optimizer": "adam"}
    cosine = cache_settings(RunConfig(train=TrainConfig(schedule="cosine")), mc, data, "d")
    assert cosine["train"]["schedule"] == "cosine"
    old = config_fingerprint({"train": {"epochs": 20}}, "d")
    assert config_fingerprint({"train": {"epochs": 20, "schedule": "constant"}}, "d") == old
    assert config_fingerprint({"train": {"epochs": 20, "schedule": "cosine"}}, "d") != old
