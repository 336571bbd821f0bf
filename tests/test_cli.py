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


def write_config(tmp_path, text):
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
    cfg = write_config(tmp_path, extra_top + "\n" + TINY.format(extra=section_extra))
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
    assert main(["run", str(write_config(tmp_path, text)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_budget_below_fixed_cost_names_smallest_feasible(tmp_path, capsys):
    text = TINY.format(extra='basis = "network"').replace("mac = [0.5]", "mac = [0.05]")
    text = text.replace('schemes = ["tai"]', 'schemes = ["tai"]\nlayers = ["fc1"]')
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path, text)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "smallest feasible budget is mac >= " in err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quickstart_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(write_config(tmp_path, TINY.format(extra=""))), "--out", str(out), "--quiet"]) == 0
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
    write_config(tmp_path, TINY.format(extra="").replace("seed = 0", "seed = 1"))
    assert main(["run", str(tmp_path / "cfg.toml"), "--out", str(out), "--quiet"]) == 2
    assert "different config (differs in seed" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_shipped_quickstart_config_validates():
    from coblax.app.config import load_run_config

    cfg = load_run_config(REPO / "experiments" / "quickstart.toml")
    assert cfg.methods == ("cobla", "uniform") and cfg.budgets.pairs() == [(0.5, 0.5)]
    assert [m.name for m in cfg.models] == ["mlp", "small_cnn"]


COMPARE_CONFIGS = ("compare_lenet5_mnist", "compare_lenet5_fashion", "compare_lenet5_cifar10",
                   "compare_lenet5_digits", "compare_squeezenet_mnist", "compare_squeezenet_fashion",
                   "compare_squeezenet_cifar10", "compare_squeezenet_digits")
SEVEN_METHODS = ("cobla", "cptv", "pos_greedy", "pos_exact", "vbmf", "gavish_donoho", "uniform")


@pytest.mark.parametrize("name", COMPARE_CONFIGS)
def test_shipped_comparison_configs_cover_every_method(name):
    from coblax.app.config import load_run_config

    cfg = load_run_config(REPO / "experiments" / f"{name}.toml")
    assert cfg.name == name and cfg.seed_list == (0, 1, 2)
    assert cfg.methods == SEVEN_METHODS
    assert cfg.budgets.pairs() == [(0.7, 0.7), (0.6, 0.6), (0.5, 0.5)]
    assert cfg.decompose.schemes == ("tai", "zhang")
    assert cfg.finetune.epochs >= 1  # accuracy before and after fine-tuning


def test_run_without_cifar10_names_folder_and_files(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "run"
    files = "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch"
    config = str(REPO / "experiments" / "compare_squeezenet_cifar10.toml")
    monkeypatch.setenv("COBLAX_DATA", str(empty))
    assert main(["run", config, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"no CIFAR-10 files in {empty}" in err and str(empty / "cifar-10-batches-py") in err
    assert files in err and "Traceback" not in err
    monkeypatch.setenv("COBLAX_DATA", str(tmp_path / "absent"))
    assert main(["run", config, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"data directory {tmp_path / 'absent'} for CIFAR-10 does not exist" in err
    assert files in err and "Traceback" not in err
    monkeypatch.delenv("COBLAX_DATA")
    assert main(["run", config, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "set the COBLAX_DATA environment variable" in err and files in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["ranks_vgg_digits", "ranks_vgg_mnist"])
def test_shipped_rank_configs_cover_every_method_on_vgg(name):
    from coblax.app.config import load_run_config

    cfg = load_run_config(REPO / "experiments" / f"{name}.toml")
    assert [m.name for m in cfg.models] == ["vgg_small"] and cfg.methods == SEVEN_METHODS
    assert "--ranks" in (REPO / "experiments" / f"{name}.toml").read_text()


@pytest.mark.parametrize("name", ["compare_lenet5_cifar10", "compare_squeezenet_cifar10"])
def test_cifar10_config_header_names_the_files(name):
    header = (REPO / "experiments" / f"{name}.toml").read_text().split("\nname = ")[0]
    for word in ("data_batch_1", "data_batch_5", "test_batch", "$COBLAX_DATA/cifar-10-batches-py/"):
        assert word in header


def test_closed_pipe_exits_quietly(tmp_path):
    """``coblax table RUN | head``: the reader closing the pipe is not an internal error."""
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    record = {"model": "mlp", "scheme": "tai", "method": "cobla", "budget_mac": 0.5, "budget_param": 0.5,
              "basis": "decomposed", "status": "ok", "base_acc": 0.9, "acc_before_finetune": 0.8,
              "acc_after_finetune": 0.85, "mac_ratio": 0.5, "param_ratio": 0.5, "ranks": {"fc1": 3}}
    # enough methods that the table is far larger than a pipe's buffer
    records = [dict(record, method=f"m{i}", budget_mac=b, budget_param=b) for i in range(2000) for b in (0.5, 0.6)]
    (run / "results.json").write_text(json.dumps({"seed": 0, "records": records}))
    proc = subprocess.Popen([sys.executable, "-m", "coblax.app.cli", "table", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away, as `head` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "internal error" not in err
