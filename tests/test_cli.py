"""CLI: bad input exits 2 with one message and writes nothing; quick start end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coblax.app.cli import main

REPO = Path(__file__).resolve().parents[1]

TINY = """
seed = 0
methods = ["cobla", "uniform"]
models = [{{ name = "mlp", hidden = [32, 16] }}, {{ name = "small_cnn", channels = [4, 8, 8], dense = 16 }}]
[data]
name = "digits"
limit_train = 400
[train]
epochs = 4
[decompose]
schemes = ["tai"]
[budgets]
mac = [0.5]
param = [0.5]
{extra}
[cobla]
objective_size = 128
validation_size = 64
max_iter = 15
roundings = 3
[finetune]
epochs = 1
"""


def _write(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "extra_top,section_extra,message",
    [
        ("colour = 1", "", "unknown config key colour"),
        ("", "budget_mac = 0.5", "unknown config key budgets.budget_mac"),
        ("", "basis = 3", "budgets.basis: expected a string"),
        ("", "basis = 'whole'", "valid values: decomposed, network"),
    ],
)
def test_bad_keys_exit_2_and_write_nothing(tmp_path, capsys, extra_top, section_extra, message):
    cfg = _write(tmp_path, extra_top + "\n" + TINY.format(extra=section_extra))
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "old,new,message",
    [
        ('mac = [0.5]', 'mac = [1.5]', "budgets.mac = 1.5 is outside (0, 1]"),
        ('methods = ["cobla", "uniform"]', 'methods = ["cobla", "svd_magic"]', "valid methods: "),
        ('name = "mlp"', 'name = "resnet"', "valid models: "),
        ('schemes = ["tai"]', 'schemes = ["cp"]', "valid values: tai, zhang"),
        ('name = "digits"', 'name = "imagenet"', "valid values: digits, mnist"),
        ("epochs = 4", 'epochs = "four"', "train.epochs: expected an integer"),
    ],
)
def test_bad_values_exit_2(tmp_path, capsys, old, new, message):
    text = TINY.format(extra="").replace(old, new, 1)
    out = tmp_path / "out"
    assert main(["run", str(_write(tmp_path, text)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_budget_below_fixed_cost_names_smallest_feasible(tmp_path, capsys):
    text = TINY.format(extra='basis = "network"').replace("mac = [0.5]", "mac = [0.05]")
    text = text.replace('schemes = ["tai"]', 'schemes = ["tai"]\nlayers = ["fc1"]')
    out = tmp_path / "out"
    assert main(["run", str(_write(tmp_path, text)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "smallest feasible budget is mac >= " in err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quickstart_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(_write(tmp_path, TINY.format(extra=""))), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| cobla |" in printed and "| uniform |" in printed
    payload = json.loads((out / "results.json").read_text())
    assert not (out / "results.partial.json").exists()
    assert payload["seed"] == 0 and "jax" in payload["versions"]
    records = payload["records"]
    assert {(r["model"].split("(")[0], r["method"]) for r in records} == {
        ("mlp", "cobla"), ("mlp", "uniform"), ("small_cnn", "cobla"), ("small_cnn", "uniform")
    }
    required = {"model", "method", "budget_mac", "budget_param", "ranks", "macs", "params", "mac_ratio",
                "param_ratio", "acc_before_finetune", "acc_after_finetune", "base_acc", "objective_trace",
                "solver_iterations", "solve_seconds"}
    for r in records:
        assert required <= set(r)
        assert r["mac_ratio"] <= r["budget_mac"] + 1e-9 and r["param_ratio"] <= r["budget_param"] + 1e-9
        assert 0 <= r["acc_after_finetune"] <= 1
        if r["method"] == "cobla":
            assert len(r["objective_trace"]) == r["solver_iterations"] + 1 or r["diagnostics"]["saturated_layers"]
    # table command reads it back
    assert main(["table", str(out), "--format", "csv"]) == 0
    assert "cobla" in capsys.readouterr().out
    # results.json of the same config exists: a second run redoes nothing and says so
    before = (out / "results.json").read_bytes()
    assert main(["run", str(tmp_path / "cfg.toml"), "--out", str(out), "--quiet"]) == 0
    assert "already in" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    # ... and results of another config are never overwritten without --force
    _write(tmp_path, TINY.format(extra="").replace("seed = 0", "seed = 1"))
    assert main(["run", str(tmp_path / "cfg.toml"), "--out", str(out), "--quiet"]) == 2
    assert "different config (differs in seed" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_shipped_quickstart_config_validates():
    from coblax.app.config import load_run_config

    cfg = load_run_config(REPO / "experiments" / "quickstart.toml")
    assert cfg.methods == ("cobla", "uniform") and cfg.budgets.pairs() == [(0.5, 0.5)]
    assert [m.name for m in cfg.models] == ["mlp", "small_cnn"]
