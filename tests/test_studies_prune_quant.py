"""prune_quant's DNS, OBD/OBS, binary-weight and k-means-histogram records at tiny size.

Numbers are checked against hand counts: the 64-16-8-10 MLP on digits has kernels of
64·16 = 1024, 16·8 = 128 and 8·10 = 80 weights; pruning a fraction s of a layer of n
weights removes floor(s·n) of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from coblax.app.config import ConfigError
from coblax.app.studies import format_study, load_study_config, run_study
from helpers import is_count_of

QUICK = Path(__file__).resolve().parents[1] / "experiments" / "studies" / "prune_quant_quick.toml"
SIZES = {"fc1": 64 * 16, "fc2": 16 * 8, "fc3": 8 * 10}
BIASES = 16 + 8 + 10


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pq")
    cfg = load_study_config(QUICK)
    pq = dataclasses.replace(
        cfg.prune_quant, model={"name": "mlp", "hidden": [16, 8]}, layer_sparsities=(), sparsities=(0.8,),
        steps=1, retrain_epochs=0, word_lengths=(), roundings=(), kmeans_bits=(), pq_k=(), rq_stages=(),
        dns_sparsities=(0.8,), dns_rates=(), dns_epochs=0, saliency_sparsities=(0.0, 0.8), saliency_examples=64,
        obs_max_inputs=16, binary_epochs=1, bnn_hidden=(), hist_layer="", hist_bits=2, hist_bins=8,
        hist_finetune_epochs=1)
    cfg = dataclasses.replace(cfg, cache_dir=str(tmp / "cache"), train=dataclasses.replace(cfg.train, epochs=3),
                              data=dataclasses.replace(cfg.data, limit_train=300, limit_test=100), prune_quant=pq)
    run_study(cfg, tmp / "out", progress=False)
    return json.loads((tmp / "out" / "results.json").read_text())


def _kind(payload, kind):
    return [r for r in payload["records"] if r["kind"] == kind]


def test_saliency_records_prune_the_hand_counted_fractions(payload):
    recs = _kind(payload, "saliency")
    assert {r["method"] for r in recs} == {"magnitude", "obd", "obs"} and not any(r["retrain"] for r in recs)
    assert all(r["obd_hessian"] == "gauss_newton" and r["obd_steps"] == 8 for r in recs if r["method"] == "obd")
    for r in recs:
        if r["sparsity"] == 0.0:  # nothing pruned: every method is the base network
            assert r["acc"] == r["base_acc"] and r["kept_fraction"] == 1.0
        else:
            for layer, n in SIZES.items():
                assert r["layer_kept_fraction"][layer] == pytest.approx((n - math.floor(0.8 * n)) / n)
    # obs_max_inputs = 16: fc1 (64 inputs) is pruned by magnitude, fc2 (16) and fc3 (8) by OBS.
    assert all(r["obs_magnitude_layers"] == ["fc1"] for r in recs if r["method"] == "obs")


def test_dns_without_training_is_magnitude_pruning(payload):
    # With 0 epochs DNS keeps its first masks, |w| >= the 80 % quantile of |w|: magnitude pruning.
    (r,) = _kind(payload, "dns")
    assert r["epochs"] == 0 and r["spliced"] == 0 and r["magnitude_retrained_acc"] is None
    assert r["acc"] == r["magnitude_acc"]
    for layer, n in SIZES.items():
        assert abs(r["layer_kept_fraction"][layer] - 0.2) <= 1.0 / n


def test_binary_kernels_have_two_values_and_one_bit_per_weight(payload):
    recs = _kind(payload, "binaryconnect") + _kind(payload, "bnn")
    assert sorted((r["kind"], r["mode"]) for r in recs) == [("binaryconnect", "det"), ("binaryconnect", "stoch"),
                                                             ("bnn", "det")]
    for r in recs:
        assert r["kernel_values"] == {layer: 2 for layer in SIZES}
        assert r["kernel_bits"] == sum(SIZES.values()) and r["compression_ratio"] == 32.0
        assert is_count_of(r["acc"], 100)  # right answers out of the 100 test images
    # Float parameters left: BinaryConnect's BatchNorm scales and offsets (no dense biases; the running
    # statistics fold into them), the BNN's biases and LayerNorm scales and offsets.
    assert [r["float_params"] for r in recs] == [2 * BIASES, 2 * BIASES, BIASES + 2 * BIASES]
    for r in recs[:2]:
        assert r["binary_norm"] == "batch_norm" and r["hidden"] == [16, 8] and r["glorot_lr"]
        assert is_count_of(r["acc_sign"], 100) and is_count_of(r["acc_real_weights"], 100)
    assert recs[0]["acc_sign"] == recs[0]["acc"]  # det deploys sign(w)


def test_kmeans_histogram_counts_every_weight_of_the_largest_layer(payload):
    (r,) = _kind(payload, "kmeans_hist")
    assert r["layer"] == "fc1" and r["k"] == 4 and len(r["hist_edges"]) == 9
    assert sum(r["hist_counts"]) == sum(r["cluster_sizes"]) == SIZES["fc1"]
    for key in ("centroids_kmeans", "centroids_finetuned"):
        assert len(r[key]) == 4 and r[key] == sorted(r[key])
    assert r["hist_edges"][0] <= r["centroids_kmeans"][0] and r["centroids_kmeans"][-1] <= r["hist_edges"][-1]


def test_format_study_prints_the_new_tables(payload):
    text = format_study(payload)
    for title in ("Dynamic network surgery", "OBD / OBS vs. magnitude", "Binary weights", "k-means weight sharing"):
        assert title in text


def _write(tmp_path, table):
    path = tmp_path / "pq.toml"
    path.write_text(f'study = "prune_quant"\n[prune_quant]\n{table}\n')
    return path


@pytest.mark.parametrize("table, message", [
    ('saliency_methods = ["snip"]', "saliency_methods: 'snip'; valid: magnitude, obd, obs"),
    ('binary_modes = ["ternary"]', "binary_modes: 'ternary'; valid: det, stoch"),
    ('dns_optimizer = "lbfgs"', "dns_optimizer = 'lbfgs'; valid: adam"),
    ("dns_sparsities = [1.0]", r"dns_sparsities = 1.0 is outside \[0, 1\)"),
    ("obs_max_inputs = 0", "obs_max_inputs and hist_bins must be >= 1"),
    ("hist_bits = 17", r"hist_bits must be in \[0, 16\]"),
    ("binary_learning_rate = 0.0", "binary_learning_rate > 0"),
    ('obd_hessian = "fisher"', "obd_hessian = 'fisher'; valid: gauss_newton, exact, hutchinson"),
    ('binary_norm = "layer"', "binary_norm = 'layer'; valid: batch_norm, none"),
    ("binary_hidden = [0]", "binary_hidden widths"),
])
def test_bad_new_keys_fail_fast(tmp_path, table, message):
    with pytest.raises(ConfigError, match=message):
        load_study_config(_write(tmp_path, table))
