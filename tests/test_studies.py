"""Study configs: every quick config parses and runs end to end at tiny size; bad input fails fast."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.app.cli import main
from coblax.app.config import ConfigError
from coblax.app.studies import STUDIES, format_study, load_study_config, run_study
from coblax.nn.data import DataError, load_dataset
from coblax.nn.models import build_model
from coblax.nn.train import evaluate, load_params
from helpers import is_count_of

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "studies"

TINY = {
    "kd": {"temperatures": (1.0, 4.0)},
    "small_arch": {"stem": 4, "expand": 4, "squeeze_ratios": (0.25,), "pct3x3": (0.5,), "block_stem": 4,
                   "channels": (4, 8)},
    "svd_fc": {"model": {"name": "mlp", "hidden": [16, 8]}, "rank_fractions": (0.2, 0.5)},
    "prune_quant": {"model": {"name": "mlp", "hidden": [16, 8]}, "layer_sparsities": (0.5,),
                    "sparsities": (0.8,), "steps": 1, "retrain_epochs": 1, "word_lengths": (4, 8),
                    "kmeans_bits": (2,), "pq_k": (4,), "rq_stages": (1, 2), "rq_k": 4, "dns_sparsities": (0.8,),
                    "dns_epochs": 1, "saliency_sparsities": (0.5,), "saliency_examples": 64, "obd_probes": 16,
                    "binary_modes": ("det",), "binary_epochs": 1, "bnn_hidden": (), "hist_bits": 2, "hist_bins": 8,
                    "hist_finetune_epochs": 1},
}


def _tiny(cfg, tmp_path):
    settings = dataclasses.replace(cfg.settings(), **TINY[cfg.study])
    if cfg.study == "kd":
        settings = dataclasses.replace(settings, teacher={"name": "mlp", "hidden": [16]},
                                       student={"name": "mlp", "hidden": [4]})
    return dataclasses.replace(
        cfg, seeds=cfg.seeds[:2], cache_dir=str(tmp_path / "cache"),
        data=dataclasses.replace(cfg.data, limit_train=200, limit_test=100),
        train=dataclasses.replace(cfg.train, epochs=2), **{cfg.study: settings})


def test_every_study_has_quick_and_full_configs():
    for study in STUDIES:
        quick = load_study_config(CONFIGS / f"{study}_quick.toml")
        full = load_study_config(CONFIGS / f"{study}_full.toml")
        assert quick.study == full.study == study
        assert quick.data.name == "digits" and full.data.name in ("mnist", "fashion_mnist")
        text = (CONFIGS / f"{study}_quick.toml").read_text()
        assert "Wall time measured here" in text and "WALL" not in text


# Under a minute each on an idle 2-core machine, several on a loaded one: only svd_fc is in the
# default suite, the others run with -m slow.
@pytest.mark.parametrize("study", [s if s == "svd_fc" else pytest.param(s, marks=pytest.mark.slow) for s in STUDIES])
def test_quick_config_runs_at_tiny_size(study, tmp_path):
    cfg = _tiny(load_study_config(CONFIGS / f"{study}_quick.toml"), tmp_path)
    payload = run_study(cfg, tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["study"] == study and saved["records"] and saved["versions"]["jax"]
    assert saved["seeds"] == list(cfg.seeds)
    assert all(r["study"] == study and r["seed"] in cfg.seeds for r in saved["records"])
    n_test = cfg.data.limit_test
    assert all(is_count_of(r["acc"], n_test) for r in saved["records"])  # right / 100 test images
    if study == "svd_fc":
        _check_svd_fc_against_numpy(cfg, saved["records"])
    table = format_study(payload)
    assert table.count("|---") >= 1
    if study == "small_arch":  # formula MACs / params equal the tracer's and the tree's
        assert all(r["macs"] == r["traced_macs"] and r["params"] == r["counted_params"] for r in saved["records"])
    if study == "kd":
        roles = [r["role"] for r in saved["records"]]
        assert roles.count("student_kd") == 2 * len(cfg.seeds) and "student_alone" in roles
    if study == "prune_quant":
        kinds = {r["kind"] for r in saved["records"]}
        assert kinds == {"base", "layer_prune", "prune", "fixed_point", "kmeans", "pq", "rq", "dns", "saliency",
                         "binaryconnect", "bnn", "kmeans_hist"}


def _check_svd_fc_against_numpy(cfg, records) -> None:
    """Every svd_fc record against an outside rebuild: the cached base network with that
    layer's kernel replaced by its rank-r Eckart–Young approximation (NumPy's SVD, no
    factored layers), evaluated by the unfactored model; at most one test image apart."""
    bases = {}
    for meta_path in (Path(cfg.cache_dir) / "models").glob("*.json"):
        meta = json.loads(meta_path.read_text())
        bases[meta["seed"]] = (load_params(meta_path.with_suffix(".npz")), meta["test_accuracy"])
    model = build_model("mlp", num_classes=10, hidden=[16, 8])
    for r in records:
        variables, base_acc = bases[r["seed"]]
        data = load_dataset("digits", seed=r["seed"], limit_train=cfg.data.limit_train,
                            limit_test=cfg.data.limit_test)
        w = np.asarray(variables["params"][r["layer"]]["kernel"], np.float64)
        u, sigma, vt = np.linalg.svd(w, full_matrices=False)
        k = r["rank"]
        cut = jax.tree.map(lambda a: a, variables)
        cut["params"][r["layer"]]["kernel"] = jnp.asarray((u[:, :k] * sigma[:k]) @ vt[:k], jnp.float32)
        acc = evaluate(model.apply, cut, data.x_test, data.y_test)
        assert abs(r["acc"] - acc) <= 1 / len(data.y_test) + 1e-9, (r["layer"], k, r["acc"], acc)
        assert r["base_acc"] == base_acc == evaluate(model.apply, variables, data.x_test, data.y_test)


def _write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_bad_study_configs(tmp_path):
    with pytest.raises(ConfigError, match="valid studies: kd, small_arch"):
        load_study_config(_write(tmp_path, 'study = "nope"'))
    with pytest.raises(ConfigError, match="missing key study"):
        load_study_config(_write(tmp_path, "seeds = [0]"))
    with pytest.raises(ConfigError, match="unknown config key kd.temperature"):
        load_study_config(_write(tmp_path, 'study = "kd"\n[kd]\ntemperature = 2'))
    with pytest.raises(ConfigError, match="small_arch.blocks"):
        load_study_config(_write(tmp_path, 'study = "small_arch"\n[small_arch]\nblocks = ["big"]'))
    with pytest.raises(ConfigError, match="valid models"):
        load_study_config(_write(tmp_path, 'study = "svd_fc"\n[svd_fc]\nmodel = { name = "alexnet" }'))


def test_absent_data_names_folder_and_files(tmp_path):
    cfg = load_study_config(_write(tmp_path, f'study = "svd_fc"\n[data]\nname = "mnist"\ndir = "{tmp_path}"'))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\]"):
        run_study(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_study_bad_input_exits_2(tmp_path, capsys):
    assert main(["study", str(_write(tmp_path, 'study = "nope"'))]) == 2
    assert "valid studies" in capsys.readouterr().err


def test_kd_transfer_set_and_diagnostics(tmp_path):
    # The students see transfer_size images, the teacher all of them; at a very high
    # temperature the teacher's soft targets tend to uniform, so the mass they put off the
    # label tends to (K - 1) / K = 0.9 (an outside limit, not the code's own formula).
    cfg = load_study_config(_write(tmp_path, "\n".join([
        'study = "kd"', "seeds = [0]", f'cache_dir = "{tmp_path / "cache"}"',
        '[data]\nname = "digits"\nlimit_train = 300\nlimit_test = 100',
        "[train]\nepochs = 3",
        '[kd]\nteacher = { name = "mlp", hidden = [32] }\nstudent = { name = "mlp", hidden = [4] }',
        "temperatures = [1.0, 1000.0]\ntransfer_size = 60"])))
    recs = run_study(cfg, tmp_path / "out", progress=False)["records"]
    assert {r["transfer_size"] for r in recs} == {60}
    by_t = {r["temperature"]: r for r in recs if r["role"] == "student_kd"}
    assert by_t[1000.0]["soft_off_label"] == pytest.approx(0.9, abs=2e-3)
    assert 0.0 <= by_t[1.0]["soft_off_label"] < by_t[1000.0]["soft_off_label"]
    # train_acc counts right answers: of the 60 transfer images (students), of the 300 (teacher)
    assert all(is_count_of(r["train_acc"], 300 if r["role"] == "teacher" else 60) for r in recs)
    assert "soft targets off the label (%)" in format_study(json.loads((tmp_path / "out" / "results.json").read_text()))
    too_many = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, transfer_size=10_000))
    with pytest.raises(ConfigError, match="exceeds the 300 training images"):
        run_study(too_many, tmp_path / "out2", progress=False)
    with pytest.raises(ConfigError, match="transfer_size"):
        load_study_config(_write(tmp_path, 'study = "kd"\n[kd]\ntransfer_size = 0'))
