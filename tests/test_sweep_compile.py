"""Compile once (issue 19): fine-tuning / evaluating factored networks of equal shapes compiles once."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from coblax.lowrank.decompose import apply_fn_for, factorize, get_kernel, trace_layers, truncate
from coblax.lowrank.factored import factored_variables
from coblax.nn import train as T
from coblax.nn.compiles import CompileClock
from coblax.nn.models import build_model


def _setup():
    model = build_model("small_cnn", num_classes=10, channels=(4, 6, 8), dense=12)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=64).astype(np.int32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    layers = [l for l in trace_layers(model, params, jnp.asarray(x[:1])) if l.decomposable]
    full = {l.name: factorize(get_kernel(params, l.name), l, "tai") for l in layers}
    return model, params, full, x, y


def _record(model, params, full, x, y, pick):
    """One 'record': truncate every layer with the mask ``pick(R)``, evaluate, fine-tune, evaluate."""
    kept = {n: truncate(f, pick(f.sigma.shape[0])) for n, f in full.items()}
    variables = factored_variables(params, kept)
    apply = apply_fn_for(model, kept)
    with CompileClock() as clock:
        T.evaluate(apply, variables, x, y, batch_size=32)
        trained = T.fit(apply_fn_for(model, kept), variables, x, y, epochs=1, batch_size=16, progress=False)
        T.evaluate(apply, trained, x, y, batch_size=32)
    return clock.count, trained


def _first(k):
    return lambda R: (np.arange(R) < k).astype(float)


def test_finetuning_two_records_of_equal_shapes_compiles_once(monkeypatch):
    monkeypatch.setattr(T, "_STEPS", collections.OrderedDict())  # other tests' steps may fill the LRU
    model, params, full, x, y = _setup()
    steps_before = T.compiled_steps()
    first, _ = _record(model, params, full, x, y, _first(2))
    assert first >= 2 and T.compiled_steps() == steps_before + 1  # a step and an evaluation were compiled
    # other triplets, other weights, the same ranks: nothing new to compile
    second, trained = _record(model, params, full, x, y, lambda R: (np.arange(R) >= R - 2).astype(float))
    assert second == 0 and T.compiled_steps() == steps_before + 1
    assert T.tree_all_finite(trained)
    # another rank is another shape: compiled again (the count above can fail)
    third, _ = _record(model, params, full, x, y, _first(3))
    assert third >= 2 and T.compiled_steps() == steps_before + 2


def test_equal_layouts_compare_equal_and_reuse_is_exact():
    model, params, full, x, y = _setup()
    a = {n: truncate(f, _first(2)(f.sigma.shape[0])) for n, f in full.items()}
    b = {n: truncate(f, _first(3)(f.sigma.shape[0])) for n, f in full.items()}
    assert apply_fn_for(model, a) == apply_fn_for(model, b)  # weights and ranks are not part of it
    assert hash(apply_fn_for(model, a, train=True)) == hash(apply_fn_for(model, b, train=True))
    assert apply_fn_for(model, a) != apply_fn_for(model, a, train=True)
    # a reused compiled step trains exactly as a freshly compiled one
    variables = factored_variables(params, a)
    reused = T.fit(apply_fn_for(model, a), variables, x, y, epochs=1, batch_size=16, progress=False)
    fresh = T.fit(lambda v, xb: apply_fn_for(model, a)(v, xb), variables, x, y, epochs=1, batch_size=16,
                  progress=False)
    for u, v in zip(jax.tree_util.tree_leaves(reused), jax.tree_util.tree_leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_padding_to_full_rank_keeps_the_function_and_shares_the_step(monkeypatch):
    """Zero triplets up to full rank: same logits, zero gradients keep them zero, one compiled step."""
    from coblax.lowrank.padding import full_rank_of, pad_to_full_rank

    monkeypatch.setattr(T, "_STEPS", collections.OrderedDict())
    model, params, full, x, y = _setup()
    for n, f in full.items():
        assert full_rank_of(f) == f.sigma.shape[0], n  # from the shapes alone
    steps_before = T.compiled_steps()
    results = []
    for k in (2, 3):
        kept = {n: truncate(f, _first(k)(f.sigma.shape[0])) for n, f in full.items()}
        padded = pad_to_full_rank(kept, examples_seen=64)
        assert all(p.first.shape[-1] == full_rank_of(p) for p in padded.values())
        v0, v1 = factored_variables(params, kept), factored_variables(params, padded)
        np.testing.assert_allclose(T.predict(apply_fn_for(model, padded), v1, x),
                                   T.predict(apply_fn_for(model, kept), v0, x), rtol=1e-5, atol=1e-6)
        trained = T.fit(apply_fn_for(model, padded), v1, x, y, epochs=1, batch_size=16, progress=False)
        for n, f in trained["factors"].items():
            assert not np.any(np.asarray(f["first"])[..., k:]), n  # the padding never moved
            assert not np.any(np.take(np.asarray(f["second"]), range(k, f["second"].shape[-2]), axis=-2)), n
        results.append(trained)
    assert T.compiled_steps() == steps_before + 1  # ranks 2 and 3 share the padded step
    # padding whose extra work exceeds the limit is left out
    kept = {n: truncate(f, _first(1)(f.sigma.shape[0])) for n, f in full.items()}
    extra = sum((full_rank_of(f) - 1) * (np.prod(f.first.shape[:-1]) + np.prod(f.second.shape[:-2]) * f.second.shape[-1])
                for f in kept.values())
    for seen, padded in ((1e9 / extra * 0.99, True), (1e9 / extra * 1.01, False)):
        out = pad_to_full_rank(kept, examples_seen=seen)
        assert all((a.first.shape != b.first.shape) == padded for a, b in zip(out.values(), kept.values())
                   if full_rank_of(b) > 1)



def _product(f) -> np.ndarray:
    """The matricized kernel that factors ``f`` multiply to (dense and zhang: U V)."""
    u = np.asarray(f.first, np.float64).reshape(-1, f.first.shape[-1])
    v = np.asarray(f.second, np.float64).reshape(f.second.shape[-2], -1) if f.kind != "dense" else np.asarray(f.second)
    return u @ v


def test_shared_layout_is_exact_freezes_the_identity_and_compiles_once(monkeypatch):
    """Layers kept original become exact factors (W = I·W or W·I): the same logits as the
    record's own network, the identity never moves in fine-tuning, the original kernel trains
    as it does unfactored, and records keeping different layers original share one step."""
    from coblax.lowrank.decompose import matricize
    from coblax.lowrank.padding import exact_factors, finetune_layout

    monkeypatch.setattr(T, "_STEPS", collections.OrderedDict())
    model, params, full, x, y = _setup()
    zhang = {n: factorize(get_kernel(params, n), l, "zhang") for n, l in
             ((l.name, l) for l in trace_layers(model, params, jnp.asarray(x[:1])) if l.decomposable)}
    for n, like in zhang.items():  # U V is the kernel bit for bit (one product and zeros per entry)
        f, identity = exact_factors(get_kernel(params, n), like)
        assert f.first.shape[:-1] == like.first.shape[:-1] and f.first.shape[-1] == min(_product(like).shape)
        np.testing.assert_array_equal(_product(f), matricize(np.asarray(get_kernel(params, n), np.float64),
                                                             f.kind, "zhang"))
        assert identity == ("first" if f.first.shape[-1] == np.prod(f.first.shape[:-1]) else "second")
    names = list(full)
    steps_before = T.compiled_steps()
    layouts = []
    for original, k in ((names[0], 2), (names[-1], 3)):  # other layers original, other ranks
        kept = {n: truncate(f, _first(k)(f.sigma.shape[0])) for n, f in full.items() if n != original}
        layout = finetune_layout(kept, full, params, examples_seen=64)
        assert set(layout.factors) == set(full) and layout.frozen is not None
        variables = layout.variables(params)
        reference = factored_variables(params, kept)  # the record's own network
        np.testing.assert_allclose(T.predict(layout.apply_fn(model), variables, x),
                                   T.predict(apply_fn_for(model, kept), reference, x), rtol=1e-5, atol=1e-5)
        trained = T.fit(layout.apply_fn(model), variables, x, y, epochs=1, batch_size=16, progress=False)
        (frozen,) = [kk for kk, v in layout.frozen[original].items() if v]
        np.testing.assert_array_equal(np.asarray(trained["factors"][original][frozen]),
                                      np.asarray(variables["factors"][original][frozen]))  # the identity
        moving = "second" if frozen == "first" else "first"
        assert not np.array_equal(np.asarray(trained["factors"][original][moving]),
                                  np.asarray(variables["factors"][original][moving]))  # W trains
        layouts.append((original, kept, layout, variables, reference))
    assert T.compiled_steps() == steps_before + 1  # both records: one compiled step
    # one Adam step on W inside the shared layout = one Adam step on the original kernel
    original, kept, layout, variables, reference = layouts[1]
    direct = T.fit(apply_fn_for(model, kept), reference, x[:16], y[:16], epochs=1, batch_size=16, progress=False)
    shared = T.fit(layout.apply_fn(model), variables, x[:16], y[:16], epochs=1, batch_size=16, progress=False)
    f = dataclasses.replace(layout.factors[original], first=shared["factors"][original]["first"],
                            second=shared["factors"][original]["second"])
    assert f.kind == "dense"  # the small CNN's last layer: W is the trained factor itself
    np.testing.assert_allclose(_product(f), np.asarray(get_kernel(direct, original), np.float64),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(T.predict(layout.apply_fn(model), shared, x),
                               T.predict(apply_fn_for(model, kept), direct, x), rtol=1e-4, atol=1e-5)
    # a long fine-tuning falls back to the record's own layout
    assert finetune_layout(kept, full, params, examples_seen=1e12).frozen is None
