"""Peer options and BatchNorm recalibration in configs: bad input exits 2 naming the key;
the shipped allocator benchmarks validate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coblax.app.cli import main
from tests.test_api import RESNET_RUN
from tests.test_cli import TINY, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "extra,message",
    [
        ("[method_options.lc]\ncolour = 1", "method_options.lc.colour: unknown option of method 'lc'"),
        ("[method_options.balf]\nspectrum = 'fourier'", "spectrum must be 'whitened'"),
        ("[method_options.alds]\nslices = 3", "method_options.alds.slices = 3 does not divide the 1 input channels"),
        ("[method_options.alds]\nslices = 0", "slices must be a positive integer"),
        ("[method_options.lc]\nsteps = -1", "steps must be an integer >= 0"),
    ],
)
def test_bad_peer_options_exit_2(tmp_path, capsys, extra, message):
    text = TINY.format(extra="").replace('methods = ["cobla", "uniform"]', 'methods = ["alds", "lc", "balf"]')
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path, text + extra + "\n")), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


def test_negative_recalibrate_bn_exits_2(tmp_path, capsys):
    text = TINY.format(extra="").replace("[finetune]\nepochs = 1", "[finetune]\nepochs = 1\nrecalibrate_bn = -1")
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path, text)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "finetune.recalibrate_bn" in err and "Traceback" not in err, err


@pytest.mark.parametrize("name,model", [("allocators_resnet20_fashion", "resnet20"),
                                        ("allocators_resnet20_fashion_whitened", "resnet20"),
                                        ("allocators_mobilenet_fashion", "mobilenet_v1")])
def test_shipped_allocator_benchmarks_validate(name, model):
    from coblax.app.config import load_run_config
    from coblax.lowrank.registry import allocator_names

    cfg = load_run_config(REPO / "experiments" / f"{name}.toml")
    assert cfg.name == name and cfg.seed_list == (0, 1, 2)
    assert [m.name for m in cfg.models] == [model]
    assert cfg.budgets.pairs() == [(0.5, 0.5), (0.3, 0.3), (0.2, 0.2)]
    assert set(allocator_names()) - set(cfg.methods) == {"pos_greedy_unnormalized"}
    assert cfg.finetune.epochs >= 2 and cfg.finetune.recalibrate_bn > 0


def test_runner_records_recalibrated_accuracy_and_peer_diagnostics(tmp_path):
    """A tiny BatchNorm run with the three peers: both before-fine-tuning accuracies, LC's
    training steps, BALF's own (whitened) spectrum; every budget met."""
    import json

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(RESNET_RUN.format(methods='["alds", "lc", "balf"]', budget=0.6,
                                     extra="[cobla]\nobjective_size = 64",
                                     finetune="recalibrate_bn = 2\n[method_options.lc]\nsteps = 1\nl_steps = 3\nlr = 0.01"))

    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "results.json").read_text())
    records = {r["method"]: r for r in (data["records"] if isinstance(data, dict) else data)}
    assert set(records) == {"alds", "lc", "balf"}
    for r in records.values():
        assert r["status"] == "ok"
        assert 0.0 <= r["acc_before_finetune_recalibrated"] <= 1.0
        assert r["mac_ratio"] <= 0.6 + 1e-9 and r["param_ratio"] <= 0.6 + 1e-9
    assert records["lc"]["diagnostics"]["training_steps"] == 3
    assert records["balf"]["spectrum"] == "whitened" and records["alds"]["spectrum"] == "weight"


def test_runner_slices_alds_layers_and_counts_their_cost(tmp_path):
    """``method_options.alds.slices = "search"`` in ``coblax run``: each conv layer is cut
    into the slices ALDS picks, and the record's MAC and parameter ratios equal a hand
    count of that form (a grouped X×Y conv with k·r outputs, C/k inputs each, then a 1×1
    conv k·r -> N: r·(X·Y·C + k·N) weights, times Ho·Wo MACs; dense r·(in + out))."""
    import json

    import jax
    import jax.numpy as jnp

    from coblax.lowrank.decompose import trace_layers
    from coblax.nn.models import build_model

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(RESNET_RUN.format(methods='["alds"]', budget=0.5, extra="",
                                     finetune='[method_options.alds]\nslices = "search"'))

    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    (record,) = json.loads((out / "results.json").read_text())["records"]
    assert record["status"] == "ok", record.get("error")
    slices = record["diagnostics"]["slices"]
    assert max(slices.values()) > 1
    # the search is ALDS's own time: counted in solve_seconds (the eps bisection alone takes ~1 ms)
    assert 0.0 < record["diagnostics"]["slice_plan_seconds"] <= record["solve_seconds"]
    model = build_model("resnet20", num_classes=10, input_shape=(8, 8, 1), blocks=1, widths=(4, 8, 8))
    x = jnp.zeros((1, 8, 8, 1))
    layers = {l.name: l for l in trace_layers(model, jax.eval_shape(model.init, jax.random.PRNGKey(0), x), x)}
    macs = params = macs0 = params0 = 0.0
    for name, r in record["ranks"].items():
        shape = layers[name].kernel_shape
        if len(shape) == 2:  # dense
            (n_in, n_out), hw, per_rank = shape, 1, shape[0] + shape[1]
        else:
            X, Y, C, N = shape
            assert C % slices[name] == 0
            hw = int(np.prod(layers[name].call_shapes[0][1][:2]))
            n_in, n_out, per_rank = X * Y * C, N, X * Y * C + slices[name] * N
        original = name in record["original_layers"]
        macs0 += hw * n_in * n_out
        params0 += n_in * n_out
        macs += hw * (n_in * n_out if original else r * per_rank)
        params += n_in * n_out if original else r * per_rank
    assert record["mac_ratio"] == pytest.approx(macs / macs0, rel=1e-9)
    assert record["param_ratio"] == pytest.approx(params / params0, rel=1e-9)
    assert record["mac_ratio"] <= 0.5 + 1e-9 and record["param_ratio"] <= 0.5 + 1e-9
    assert 0.0 <= record["acc_after_finetune"] <= 1.0
