"""Peers and BatchNorm recalibration through ``coblax.allocate`` / ``finetune``."""

import functools

import numpy as np
import pytest

from coblax import allocate, finetune
from coblax.lowrank.decompose import factorize_whitened, get_kernel, input_grams, trace_layers
from coblax.nn.train import evaluate
from tests.test_api import EVAL, RULES, trained_lenet


def test_allocate_recalibrates_batchnorm_statistics():
    model, _, variables, data = trained_lenet()
    obj = (data.x_train[:256], data.y_train[:256])
    plain = allocate(model, variables, obj, rules=RULES, mac=0.3, param=0.3, method="pos_greedy", apply_kwargs=EVAL,
                     recalibrate_bn=0)
    recal = allocate(model, variables, obj, rules=RULES, mac=0.3, param=0.3, method="pos_greedy", apply_kwargs=EVAL,
                     recalibrate_bn=2, batch_size=128)
    assert plain.ranks == recal.ranks
    np.testing.assert_array_equal(plain.variables["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])
    assert not np.allclose(recal.variables["batch_stats"]["bn2"]["mean"], plain.variables["batch_stats"]["bn2"]["mean"])
    for key in ("params", "factors"):  # no weight changed
        for a, b in zip(np.concatenate([np.ravel(v) for v in _leaves(plain.variables[key])]),
                        np.concatenate([np.ravel(v) for v in _leaves(recal.variables[key])])):
            assert a == b
    acc_plain = evaluate(plain.apply, plain.variables, data.x_test, data.y_test)
    acc_recal = evaluate(recal.apply, recal.variables, data.x_test, data.y_test)
    assert 0.0 <= acc_plain <= 1.0 and 0.0 <= acc_recal <= 1.0
    tuned = finetune(recal, *obj, train_kwargs={"train": True}, epochs=1, recalibrate_bn=1)
    assert not np.allclose(tuned.variables["batch_stats"]["bn2"]["var"], recal.variables["batch_stats"]["bn2"]["var"])
    # without train_kwargs a BatchNorm network would be fine-tuned in eval mode: said, not silent
    with pytest.warns(UserWarning, match="train_kwargs"):
        eval_mode = finetune(recal, *obj, epochs=1, recalibrate_bn=0)
    # ... and in eval mode the running statistics are not updated by the training steps
    np.testing.assert_array_equal(eval_mode.variables["batch_stats"]["bn2"]["var"],
                                  recal.variables["batch_stats"]["bn2"]["var"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finetune(recal, *obj, train_kwargs={}, epochs=1, recalibrate_bn=0)  # eval mode chosen: no warning


def _leaves(tree):
    import jax

    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def test_default_recalibrates_where_the_network_has_batchnorm():
    """recalibrate_bn = "auto" (the default): the statistics of the 256 objective images at
    batch size 256 (one batch: their exact statistics, as with recalibrate_bn = 1)."""
    model, _, variables, data = trained_lenet()
    run = functools.partial(allocate, model, variables, (data.x_train[:256], data.y_train[:256]), rules=RULES,
                            mac=0.3, param=0.3, method="pos_greedy", apply_kwargs=EVAL, batch_size=256)
    auto, one = run(), run(recalibrate_bn=1)
    for layer in ("bn1", "bn2"):
        for stat in ("mean", "var"):
            np.testing.assert_allclose(auto.variables["batch_stats"][layer][stat],
                                       one.variables["batch_stats"][layer][stat], rtol=1e-6, atol=1e-7)
    assert not np.allclose(auto.variables["batch_stats"]["bn2"]["mean"], variables["batch_stats"]["bn2"]["mean"])


@pytest.mark.parametrize("bad", [-1, 2.5, "always"])
def test_recalibrate_bn_must_be_a_batch_count(bad):
    model, _, variables, data = trained_lenet()
    with pytest.raises(ValueError, match="recalibrate_bn"):
        allocate(model, variables, (data.x_train[:64], data.y_train[:64]), rules=RULES, mac=0.5, param=0.5,
                 method="uniform", apply_kwargs=EVAL, recalibrate_bn=bad)


def test_balf_allocates_on_the_whitened_spectrum():
    """BALF's ranks through allocate are BALF on the whitened singular values."""
    from coblax.baselines.balf import BALF
    from coblax.lowrank.costs import make_problem, network_cost

    model, _, variables, data = trained_lenet()
    x, y = data.x_train[:200], data.y_train[:200]
    rules = [("dw", "skip"), ("conv.*", "tai"), ("fc1", "dense")]
    result = allocate(model, variables, (x, y), rules=rules, mac=0.4, param=0.4, method="balf", apply_kwargs=EVAL)
    traced = [t for t in trace_layers(model, variables, x[:1], EVAL) if t.name in ("conv1", "conv2", "fc1")]
    grams = input_grams(model, variables, traced, x, "tai")
    full = {t.name: factorize_whitened(get_kernel(variables, t.name), t, "tai", grams[t.name]) for t in traced}
    net = network_cost(trace_layers(model, variables, x[:1], EVAL), variables,
                       {n: np.asarray(f.sigma) for n, f in full.items()}, {n: "tai" for n in full})
    expect = BALF()(make_problem(net, 0.4, 0.4, "decomposed")).ranks
    assert result.ranks == expect
    plain = allocate(model, variables, (x, y), rules=rules, mac=0.4, param=0.4, method="balf", apply_kwargs=EVAL,
                     method_options={"spectrum": "weight"})
    assert plain.ranks != result.ranks  # the whitening changes the allocation here
