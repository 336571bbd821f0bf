"""Peer options and BatchNorm recalibration in configs: bad input exits 2 naming the key;
the shipped allocator benchmarks validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from coblax.app.cli import main
from tests.test_cli import TINY, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "extra,message",
    [
        ("[method_options.lc]\ncolour = 1", "method_options.lc.colour: unknown option of method 'lc'"),
        ("[method_options.balf]\nspectrum = 'fourier'", "spectrum must be 'whitened'"),
        ("[method_options.alds]\nslices = 2", "slices = 2"),
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
    cfg.write_text("""
methods = ["alds", "lc", "balf"]
models = [{ name = "resnet20", blocks = 1, widths = [4, 8, 8] }]
[data]
name = "digits"
limit_train = 300
[train]
epochs = 1
[budgets]
mac = [0.6]
param = [0.6]
[cobla]
objective_size = 64
[finetune]
epochs = 1
recalibrate_bn = 2
[method_options.lc]
steps = 1
l_steps = 3
lr = 0.01
""")
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
