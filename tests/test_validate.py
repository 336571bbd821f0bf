"""Issue 22, finding 9: ``allocate`` and ``finetune`` check their arguments and name the bad one."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax import allocate, finetune


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12, name="fc1")(x))
        return nn.Dense(5, name="head")(x)  # 5 classes


def _setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    y = rng.integers(0, 5, 40)
    model = Mlp()
    return model, model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1])), x, y


def _call(**overrides):
    model, variables, x, y = _setup()
    kw = dict(rules=[("fc1", "dense")], mac=0.5, param=0.5, method="uniform") | overrides
    data = kw.pop("data", (x, y))
    return allocate(model, variables, data, **kw)


def test_valid_call_still_allocates():
    result = _call()
    assert 1 <= result.ranks["fc1"] <= 8


@pytest.mark.parametrize("overrides,message", [
    ({"mac": "0.5"}, "budget mac='0.5' must be a number in (0, 1], got str"),
    ({"mac": True}, "budget mac=True must be a number in (0, 1], got bool"),
    ({"param": None}, "budget param=None must be a number in (0, 1], got NoneType"),
    ({"mac": float("nan")}, "budget mac=nan must be in (0, 1]"),
    ({"min_rank": 0}, "min_rank=0 must be >= 1"),
    ({"min_rank": 1.0}, "min_rank=1.0 must be an integer >= 1, got float"),
    ({"seed": -1}, "seed=-1 must be >= 0"),
    ({"batch_size": 0}, "batch_size=0 must be >= 1"),
    ({"basis": "total"}, "basis='total' must be one of decomposed, network"),
    ({"rules": "fc1"}, "rules must be a list of (regex, scheme) string pairs"),
])
def test_bad_scalar_arguments_are_named(overrides, message):
    with pytest.raises(ValueError) as info:
        _call(**overrides)
    assert message in str(info.value)


def test_bad_data_is_named():
    _, _, x, y = _setup()
    cases = [
        ((x, np.where(np.arange(40) == 3, -3, y)), "data: label -3 is outside [0, 5)"),
        ((x, np.where(np.arange(40) == 3, 57, y)), "data: label 57 is outside [0, 5)"),
        ((x, y[:30]), "data: x has 40 examples but y has 30 labels"),
        ((x[:0], y[:0]), "data: x holds no examples"),
        ((x, y.astype(np.float32)), "data: labels y must have an integer dtype, got float32"),
        ((x, None), "data: x and y must be arrays, not None"),
        ((x[:, :5], y), "data: the model cannot be applied to x of shape (5,)"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError) as info:
            _call(data=data)
        assert message in str(info.value), (message, str(info.value))
    with pytest.raises(ValueError, match=r"validation_data: label 9 is outside \[0, 5\)"):
        _call(validation_data=(x, np.full(40, 9)))


def test_finetune_arguments_are_named():
    result = _call()
    _, _, x, y = _setup()
    with pytest.raises(ValueError, match=r"\(x, y\): x has 40 examples but y has 39 labels"):
        finetune(result, x, y[:39])
    with pytest.raises(ValueError, match="learning_rate=-0.1 must be a finite number > 0"):
        finetune(result, x, y, learning_rate=-0.1)
    with pytest.raises(ValueError, match="epochs=True must be an integer"):
        finetune(result, x, y, epochs=True)
