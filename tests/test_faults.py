"""Fault injection without training: bad input of every kind ends in exit 2 and one message.

Each test names the case of issue 11 it covers. Nothing here trains a network:
``coblax check`` validates a config (and builds its models abstractly), the other
commands are given broken paths and files.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from coblax.app.cli import main
from coblax.compress.cbx import (
    HEADER_BYTES,
    MAX_ELEMENTS,
    CbxError,
    LeafCoding,
    decode_cbx,
    encode_cbx,
)
from coblax.util.errors import CoblaxError
from helpers import tiny_run_config


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # Some tests check that nothing was trained: they need a cache of their own.
    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path / "cache"))


def _config(tmp_path: Path, name: str = "cfg.toml", **values: str) -> Path:
    return tiny_run_config(tmp_path, name, **values)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def user_error(capsys, *argv) -> str:
    """Run the CLI, expect exit 2 with one message and no traceback; return the message."""
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("coblax: error: "), err
    return err


# ------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train__learning_rate", "nan", "train.learning_rate = nan must be a finite number"),
        ("train__learning_rate", "inf", "train.learning_rate = inf must be a finite number"),
        ("finetune__learning_rate", "nan", "finetune.learning_rate = nan must be a finite number"),
        ("cobla__tol", "nan", "cobla.tol = nan must be a finite number"),
        ("cobla__rtol", "-inf", "cobla.rtol = -inf must be a finite number"),
        ("budgets__min_rank", "0", "budgets.min_rank = 0 must be >= 1"),
        ("cobla__warm_start", "'cobla'", "valid values: constant, alds, balf, cptv"),
        ("cobla__max_iter", "99999999999", "cobla.max_iter = 99999999999 is out of range"),
        ("seed", "99999999999999999999", "seed = 99999999999999999999 is out of range"),
        ("seed", "-1", "seed = -1 must be >= 0"),
    ],
)
def test_non_finite_and_out_of_range_values_rejected(tmp_path, capsys, key, value, message):
    """Issue: nan/inf learning rates and tolerances passed validation; a seed beyond int64."""
    err = user_error(capsys, "check", _config(tmp_path, **{key: value}), "--out", tmp_path / "out")
    assert message in err
    assert not (tmp_path / "out").exists()


def test_empty_budget_list_rejected(tmp_path, capsys):
    """Issue: budgets.mac = [] exited 0 with zero records."""
    cfg = _config(tmp_path, budgets__mac="[]")
    err = user_error(capsys, "run", cfg, "--out", tmp_path / "out", "--quiet")
    assert "budgets.mac is empty" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model,message",
    [
        ('{ name = "mlp", hidden = "wide" }', "models[0].hidden[0]: expected an integer, got 'wide'"),
        ('{ name = "mlp", hidden = [0] }', "models[0].hidden = [0]: layer sizes must be >= 1"),
        ('{ name = "mlp", hidden = [1.5] }', "models[0].hidden[0]: expected an integer, got 1.5"),
        ('{ name = "squeezenet", width = -1 }', "models[0].width = -1: layer sizes must be >= 1"),
        ('{ name = "lenet5", padding = "BOGUS" }', "models[0] (lenet5(padding=BOGUS)) cannot be built"),
        ('{ name = "lenet5", padding = 3 }', "models[0].padding: expected a string"),
        ('{ name = "mlp", colour = 1 }', "models[0].colour: unknown option of model 'mlp'; its options: hidden"),
        ('{ hidden = [3] }', "models[0] needs a name"),
    ],
)
def test_model_options_checked_against_the_model(tmp_path, capsys, model, message):
    """Issue: model options of the wrong type or value gave a traceback (exit 1)."""
    err = user_error(capsys, "check", _config(tmp_path, models=f"[{model}]"), "--out", tmp_path / "out")
    assert message in err


def test_method_options_checked_against_the_allocator(tmp_path, capsys):
    """Issue: unknown method_options keys were found only after training."""
    cfg = _config(tmp_path, method_options__cptv__beta="0.5", method_options__pos_exact__bound="'yes'",
                  method_options__cobla__warm_start="'cobla'")
    err = user_error(capsys, "check", cfg, "--out", tmp_path / "o")
    assert "method_options.cptv.beta: unknown option of method 'cptv'; its options: iters" in err
    assert "method_options.pos_exact.bound: expected true or false, got 'yes'" in err
    assert "method_options.cobla.warm_start = 'cobla' is not allowed" in err
    assert "3 problems" in err


def test_every_problem_reported_together_with_its_key(tmp_path, capsys):
    cfg = _config(tmp_path, cobla__tol="nan", train__epochs="-2", methods='["uniform", "svd_magic"]')
    err = user_error(capsys, "check", cfg, "--out", tmp_path / "o")
    assert f"{tmp_path / 'cfg.toml'}: 3 problems" in err
    for part in ("methods = 'svd_magic' is not allowed; valid methods: ", "train.epochs = -2 must be >= 0",
                 "cobla.tol = nan must be a finite number"):
        assert part in err


def test_check_validates_without_running(tmp_path, capsys):
    cfg = _config(tmp_path)
    code, out, err = _run(capsys, "check", cfg, "--out", tmp_path / "out")
    assert code == 0, err
    assert "ok; 2 records" in out and "new" in out
    assert not (tmp_path / "out").exists()
    assert not list((Path(os.environ["COBLAX_CACHE"]) / "models").glob("*.npz"))


def test_budget_infeasible_for_one_model_names_model_and_minimum(tmp_path, capsys):
    cfg = _config(tmp_path, budgets__mac="[0.01]", budgets__basis='"network"')
    err = user_error(capsys, "check", cfg, "--out", tmp_path / "o")
    assert "budgets (mlp(hidden=[16]), tai)" in err and "smallest feasible budget" in err


# ---------------------------------------------------------------- config files


def test_config_that_is_a_folder(tmp_path, capsys):
    """Issue: a folder passed as config was reported as 'does not exist'."""
    err = user_error(capsys, "run", tmp_path, "--out", tmp_path / "out")
    assert f"{tmp_path} is a folder; expected a TOML config file" in err


def test_config_not_utf8_names_the_file(tmp_path, capsys):
    """Issue: a non-UTF-8 config was reported without its path."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    err = user_error(capsys, "check", path)
    assert f"{path}: not UTF-8 text" in err


def test_config_unreadable(tmp_path, capsys):
    """Issue: an unreadable config file gave a traceback."""
    fifo_dir = tmp_path / "cfg.toml"
    fifo_dir.mkdir()
    err = user_error(capsys, "compress", fifo_dir)
    assert "is a folder" in err
    err = user_error(capsys, "check", tmp_path / "missing.toml")
    assert "does not exist" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("x = = 1\n")
    assert f"{bad}: not valid TOML" in user_error(capsys, "check", bad)


def test_config_permission_denied(tmp_path, capsys, monkeypatch):
    """Issue: an unreadable config file gave a traceback (root reads anything: simulated)."""
    cfg = _config(tmp_path)
    real = Path.read_bytes

    def deny(self):
        if self == cfg:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert f"cannot read config file {cfg}: Permission denied" in user_error(capsys, "check", cfg)


# ---------------------------------------------------------------------- folders


def test_out_that_is_a_file_fails_before_training(tmp_path, capsys):
    """Issue: --out an existing file failed with a traceback after training."""
    out = tmp_path / "out"
    out.write_text("not a folder")
    err = user_error(capsys, "run", _config(tmp_path), "--out", out, "--quiet")
    assert f"output folder {out} is a file" in err
    assert not list((Path(os.environ["COBLAX_CACHE"]) / "models").glob("*.npz"))  # nothing trained
    under = out / "sub"  # a folder below a file cannot be created either
    err = user_error(capsys, "check", tmp_path / "cfg.toml", "--out", under)
    assert f"{out} is a file, not a folder" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_out_and_cache_that_cannot_be_written(tmp_path, capsys):
    """Issue: a read-only --out and an unwritable cache_dir failed after training."""
    ro = Path("/proc/coblax-cannot-write-here")  # refused even to root
    cfg = _config(tmp_path, cache_dir=f'"{ro}"')
    err = user_error(capsys, "run", cfg, "--out", ro / "out", "--quiet")
    assert "output folder /proc/coblax-cannot-write-here/out: cannot write in /proc" in err
    assert "cache_dir /proc/coblax-cannot-write-here: cannot write in /proc" in err
    assert "2 problems" in err


def test_missing_data_folder_fails_before_work(tmp_path, capsys):
    cfg = _config(tmp_path, data__name='"mnist"', data__dir=f'"{tmp_path / "nodata"}"')
    err = user_error(capsys, "check", cfg, "--out", tmp_path / "o")
    assert "data: data directory" in err and "does not exist" in err


def test_compress_out_that_is_a_file(tmp_path, capsys):
    """Issue: compress --out an existing file gave a traceback."""
    out = tmp_path / "out.txt"
    out.write_text("x")
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "mlp"\n')
    err = user_error(capsys, "compress", cfg, "--out", out)
    assert f"--out {out} is a file, not a folder" in err


# ----------------------------------------------------------------------- table


def test_table_of_missing_empty_or_partial_folder(tmp_path, capsys):
    """Issue: table of an empty or missing folder or one with only a partial file: traceback."""
    err = user_error(capsys, "table", tmp_path / "missing")
    assert f"{tmp_path / 'missing'}: no such file or folder" in err
    (tmp_path / "empty").mkdir()
    assert "no results.json in this folder" in user_error(capsys, "table", tmp_path / "empty")
    part = tmp_path / "part"
    part.mkdir()
    rec = {"model": "m", "method": "uniform", "scheme": "tai", "budget_mac": 0.5, "budget_param": 0.5,
           "mac_ratio": 0.4, "param_ratio": 0.4, "acc_before_finetune": 0.5, "acc_after_finetune": 0.6,
           "base_acc": 0.9}
    (part / "results.partial.json").write_text(json.dumps({"records": [rec]}))
    err = user_error(capsys, "table", part)
    assert "only results.partial.json (an unfinished run)" in err
    code, out, _ = _run(capsys, "table", part / "results.partial.json")  # the file itself is fine
    assert code == 0 and "| uniform |" in out


@pytest.mark.parametrize(
    "content,message",
    [
        (b"{\"records\": [", "not a valid results file"),
        (b"\xff\xfe\x00", "not a valid results file"),
        (b"[]", "expected a JSON object with a 'records' list"),
        (b'{"records": [3]}', "record 0 is not a JSON object"),
        (b'{"records": [{"model": "m"}]}', "record 0 lacks the keys method"),
    ],
)
def test_corrupt_results_file_names_its_path(tmp_path, capsys, content, message):
    """Issue: a corrupt results file was reported without its path."""
    (tmp_path / "results.json").write_bytes(content)
    err = user_error(capsys, "table", tmp_path)
    assert f"{tmp_path / 'results.json'}: {message}" in err


def test_table_marks_failed_records():
    from coblax.app.report import format_table

    ok = {"model": "m", "method": "uniform", "scheme": "tai", "budget_mac": 0.5, "budget_param": 0.5,
          "mac_ratio": 0.4, "param_ratio": 0.4, "acc_before_finetune": 0.5, "acc_after_finetune": 0.6,
          "base_acc": 0.9}
    bad = dict(ok, method="cobla", status="failed", error="finetune cobla: loss is not finite (nan) at step 3",
               mac_ratio=None, param_ratio=None, acc_before_finetune=None, acc_after_finetune=None)
    md = format_table([ok, bad], "md")
    assert "| cobla | failed | failed | failed | failed |" in md
    assert "failed: cobla at 0.5/0.5: finetune cobla: loss is not finite (nan) at step 3" in md
    assert "**60.00**" in md  # the failed row takes no part in 'best'
    assert "cobla,failed,failed,failed,failed" in format_table([ok, bad], "csv")
    assert "% failed: cobla" in format_table([ok, bad], "tex")


# ---------------------------------------------------------------------- errors


def test_internal_errors_keep_their_traceback(monkeypatch, capsys):
    """Issue: the CLI turned every ValueError (a bug as much as a typo) into exit 2."""
    import coblax.lowrank.registry as registry

    def broken():
        raise ValueError("an internal bug")

    monkeypatch.setattr(registry, "allocator_names", broken)
    code, _, err = _run(capsys, "methods")
    assert code == 1
    assert "Traceback" in err and "ValueError: an internal bug" in err and "bug in coblax" in err


def test_debug_shows_traceback_of_user_errors(tmp_path, capsys):
    code, _, err = _run(capsys, "check", tmp_path / "missing.toml", "--debug")
    assert code == 2 and "Traceback" in err and "does not exist" in err
    code, _, err = _run(capsys, "--debug", "table", tmp_path / "missing")
    assert code == 2 and "Traceback" in err


def test_error_types_are_coblax_errors_and_still_value_errors():
    from coblax.app.config import ConfigError
    from coblax.app.report import ResultsError, ResultsNotFoundError
    from coblax.lowrank.allocation import BudgetError
    from coblax.lowrank.registry import UnknownMethodError
    from coblax.nn.data import DataError
    from coblax.nn.train import CheckpointError
    from coblax.util.errors import NumericalError

    for cls in (ConfigError, ResultsError, BudgetError, UnknownMethodError, DataError, CbxError):
        assert issubclass(cls, CoblaxError) and issubclass(cls, ValueError)
    assert issubclass(ResultsNotFoundError, FileNotFoundError)
    assert issubclass(CheckpointError, CoblaxError) and issubclass(NumericalError, CoblaxError)


# ------------------------------------------------------------------ .cbx reader


def _cbx(meta=None):
    rng = np.random.default_rng(0)
    cb = np.linspace(-1, 1, 8).astype(np.float32)
    w = cb[rng.integers(0, 8, (60, 20))]
    w[rng.random(w.shape) > 0.3] = 0
    params = {"params": {"fc1": {"kernel": w, "bias": np.zeros(20, np.float32)}}}
    coding = {"params/fc1/kernel": LeafCoding(cb, index_bits=4)}
    data, _ = encode_cbx(params, coding, meta)
    return data


def recrc(body: bytes | bytearray) -> bytes:
    body = bytes(body[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def table_entries(data: bytes):
    """(offset of the dims, ndim, coded fields offset or None) of each table entry."""
    n_leaves, meta_len, _table_len = struct.unpack_from("<I", data, 12)[0], *struct.unpack_from("<II", data, 20)
    pos, out = HEADER_BYTES + meta_len, []
    for _ in range(n_leaves):
        (name_len,) = struct.unpack_from("<H", data, pos)
        pos += 2 + name_len
        kind, _, ndim = data[pos:pos + 3]
        dims = pos + 3
        pos = dims + 4 * ndim
        fields = None
        if kind == 1:
            fields = pos
            pos += struct.calcsize("<BBBIQQQQ") + ndim
        out.append((dims, ndim, fields))
    return out


def test_crafted_shape_is_refused_before_allocating():
    """Issue: one changed table byte made the reader allocate 18.7 GiB from an 8.7 KB file."""
    data = _cbx()
    coded = [e for e in table_entries(data) if e[2] is not None][0]
    forged = bytearray(data)
    forged[coded[0] + 3] = 0x40  # the top byte of the first dimension: 60 -> 2^30 + 60
    tracemalloc.start()
    try:
        with pytest.raises(CbxError, match="beyond .* elements"):
            decode_cbx(recrc(forged))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20



def test_crafted_shape_within_limits_is_refused_by_evaluate(tmp_path, capsys):
    """A coded leaf stores no trailing zeros, so a larger declared shape still decodes; evaluate
    compares every declared shape with the model the metadata names before decoding."""
    meta = {"model": {"name": "mlp", "options": {"hidden": [20]}}, "num_classes": 10,
            "input_shape": [6, 10, 1], "dataset": {"name": "digits"}}
    rng = np.random.default_rng(0)
    cb = np.linspace(-1, 1, 8).astype(np.float32)
    w = cb[rng.integers(0, 8, (60, 20))]
    w[rng.random(w.shape) > 0.3] = 0
    params = {"params": {"fc1": {"kernel": w, "bias": np.zeros(20, np.float32)},
                         "fc2": {"kernel": np.ones((20, 10), np.float32), "bias": np.zeros(10, np.float32)}}}
    data, _ = encode_cbx(params, {"params/fc1/kernel": LeafCoding(cb, index_bits=4)}, meta)
    coded = [e for e in table_entries(data) if e[2] is not None][0]
    forged = bytearray(data)
    forged[coded[0] + 1] = 0x10  # 60 -> 4156 rows
    path = tmp_path / "forged.cbx"
    path.write_bytes(recrc(forged))
    err = user_error(capsys, "evaluate", path)
    assert "params/fc1/kernel is (4156, 20) in the file, (60, 20) in the model" in err


@pytest.mark.parametrize("field,value", [(4, 2**40), (5, 2**40), (4, 10**6), (6, 2**50)])
def test_crafted_entry_counts_are_checked_against_the_streams(field, value):
    """Declared entry / nonzero counts / stream lengths cannot make the reader allocate."""
    data = _cbx()
    coded = [e for e in table_entries(data) if e[2] is not None][0]
    fmt = "<BBBIQQQQ"
    fields = list(struct.unpack_from(fmt, data, coded[2]))
    fields[field] = value
    forged = bytearray(data)
    struct.pack_into(fmt, forged, coded[2], *fields)
    tracemalloc.start()
    try:
        with pytest.raises(CbxError):
            decode_cbx(recrc(forged))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_huge_declared_raw_leaf_refused():
    data = _cbx()
    raw = [e for e in table_entries(data) if e[2] is None][0]
    forged = bytearray(data)
    struct.pack_into("<I", forged, raw[0], 0xFFFFFFFF)
    with pytest.raises(CbxError):
        decode_cbx(recrc(forged))
    assert MAX_ELEMENTS < 0xFFFFFFFF


@pytest.mark.parametrize(
    "meta,message",
    [
        ({"dataset": "digits"}, "metadata 'dataset' must be an object"),
        ({"num_classes": "10"}, "metadata 'num_classes' must be a positive integer"),
        ({"input_shape": [8, -8, 1]}, "metadata 'input_shape' must be a list"),
        ({"model": ["mlp"]}, "metadata 'model' must be an object"),
        ({"dataset": {"name": "digits", "limit_test": "all"}}, "metadata 'dataset' must be"),
    ],
)
def test_metadata_types_checked(tmp_path, capsys, meta, message):
    """Issue: metadata `dataset` given as a string gave a TypeError."""
    good = {"model": {"name": "mlp", "options": {}}, "num_classes": 10, "input_shape": [8, 8, 1],
            "dataset": {"name": "digits", "seed": 0, "limit_test": None}}
    data = _cbx(good | meta)
    with pytest.raises(CbxError, match=message):
        decode_cbx(data)
    path = tmp_path / "m.cbx"
    path.write_bytes(data)
    assert message in user_error(capsys, "evaluate", path)


def test_metadata_as_crafted_text_with_recomputed_crc():
    data = bytearray(_cbx({"dataset": {"name": "digits"}}))
    meta_len = struct.unpack_from("<I", data, 20)[0]
    text = bytes(data[HEADER_BYTES:HEADER_BYTES + meta_len])
    new = text.replace(b'{"name":"digits"}', b'"digits"' + b" " * 9)
    assert len(new) == len(text)
    data[HEADER_BYTES:HEADER_BYTES + meta_len] = new
    with pytest.raises(CbxError, match="'dataset' must be an object"):
        decode_cbx(recrc(data))


def test_evaluate_missing_path_folder_or_foreign_file(tmp_path, capsys):
    """Issue: `coblax evaluate` of a missing path or a folder gave a traceback."""
    assert f"{tmp_path / 'no.cbx'}: no such file" in user_error(capsys, "evaluate", tmp_path / "no.cbx")
    assert "is a folder; expected a .cbx file" in user_error(capsys, "evaluate", tmp_path)
    (tmp_path / "x.cbx").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    assert "not a .cbx file" in user_error(capsys, "evaluate", tmp_path / "x.cbx")
    (tmp_path / "nometa.cbx").write_bytes(_cbx())
    assert "metadata lacks 'model'" in user_error(capsys, "evaluate", tmp_path / "nometa.cbx")
    bad_model = {"model": {"name": "mlp", "options": {"hidden": [0]}}, "num_classes": 10,
                 "input_shape": [8, 8, 1], "dataset": {"name": "digits"}}
    (tmp_path / "badmodel.cbx").write_bytes(_cbx(bad_model))
    assert "layer sizes must be >= 1" in user_error(capsys, "evaluate", tmp_path / "badmodel.cbx")


# ------------------------------------------------------------------- hypothesis

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["", "tai", "zhang", "mlp", "lenet5", "digits", "adam", "uniform", "cobla", "BOGUS",
                     "network", "constant", "x" * 40]),
)
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3))
_SECTIONS = {
    "train": ["epochs", "batch_size", "learning_rate", "optimizer", "momentum"],
    "finetune": ["epochs", "batch_size", "learning_rate", "optimizer"],
    "budgets": ["mac", "param", "basis", "min_rank"],
    "cobla": ["objective_size", "validation_size", "batch_size", "max_iter", "tol", "rtol", "atol", "roundings",
              "warm_start", "saturation_rounds"],
    "decompose": ["schemes", "scheme", "layers", "exclude"],
    "data": ["name", "limit_train", "limit_test", "dir"],
    "method_options.cptv": ["iters", "beta"],
    "method_options.pos_exact": ["bound", "solver"],
}
_TOP = ["seed", "methods", "name", "colour", "cache_dir", "models"]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


@st.composite
def _configs(draw) -> str:
    lines = []
    for key in draw(st.lists(st.sampled_from(_TOP), unique=True, max_size=3)):
        if key == "models":
            model = draw(st.sampled_from(["mlp", "lenet5", "small_cnn", "squeezenet", "vgg_small", "resnet"]))
            option = draw(st.sampled_from(["hidden", "padding", "width", "channels", "dense", "depth"]))
            lines.append(f'models = [{{ name = "{model}", {option} = {_toml_value(draw(_VALUES))} }}]')
        elif key == "cache_dir":
            lines.append(f'cache_dir = {json.dumps(draw(st.sampled_from(["/proc/x", ""])))}')
        else:
            lines.append(f"{key} = {_toml_value(draw(_VALUES))}")
    for section in draw(st.lists(st.sampled_from(sorted(_SECTIONS)), unique=True, max_size=3)):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(_SECTIONS[section]), unique=True, min_size=1, max_size=3)):
            lines.append(f"{key} = {_toml_value(draw(_VALUES))}")
    return "\n".join(lines) + "\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_configs())
def test_generated_configs_never_produce_a_traceback(tmp_path, capsys, text):
    """Any config: `coblax check` answers ok (0) or one user error (2), never a traceback."""
    cfg = tmp_path / "gen.toml"
    cfg.write_text(text)
    code = main(["check", str(cfg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code in (0, 2), text + err
    assert "Traceback" not in err, text + err
