"""Issue 22, findings 8 and 10: results files and .cbx files within caps and schema, exit 2.

Results JSON given to ``coblax table`` / ``check``: depth and number limits, finite
numbers only, each record checked against the record schema. ``.cbx``: the decoded
bytes are capped (sparse leaves no longer amplify a small file into gigabytes), and a
file whose dataset does not fit its input shape is a named error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_faults import recrc, table_entries, user_error

from coblax.compress.cbx import MAX_DECODED_BYTES, MAX_ELEMENTS, LeafCoding, encode_cbx
from helpers import tiny_run_config

REPO = Path(__file__).resolve().parents[1]
_REC = {"model": "m", "method": "uniform", "scheme": "tai", "budget_mac": 0.5, "budget_param": 0.5,
        "mac_ratio": 0.4, "param_ratio": 0.4, "acc_before_finetune": 0.5, "acc_after_finetune": 0.6,
        "base_acc": 0.9, "ranks": {"fc1": 3}, "full_ranks": {"fc1": 8}}


@pytest.mark.parametrize("text,message", [
    ('{"records": ' + "[" * 3000 + "]" * 3000 + "}", "nested 3001 levels deep"),
    (json.dumps({"records": [_REC | {"budget_mac": "@"}]}).replace('"@"', "1" + "0" * 400), "more than 19 digits"),
    (json.dumps({"records": [_REC | {"budget_mac": "@"}]}).replace('"@"', "1e400"), "1e400 is out of range"),
    (json.dumps({"records": [_REC | {"acc_after_finetune": float("nan")}]}), "NaN is not a finite number"),
    (json.dumps({"records": [_REC | {"acc_after_finetune": float("inf")}]}), "Infinity is not a finite number"),
    (json.dumps({"records": [_REC | {"full_ranks": [8]}]}), "record 0 has values of the wrong type for full_ranks"),
    (json.dumps({"records": [_REC | {"ranks": "33"}]}), "record 0 has values of the wrong type for ranks"),
    (json.dumps({"records": [_REC | {"acc_after_finetune": 7.5}]}), "acc_after_finetune (outside [0, 1])"),
])
def test_results_file_beyond_limits_or_schema_exits_2(tmp_path, capsys, text, message):
    """Finding 8: RecursionError, OverflowError, inf/nan printed, one table row per character."""
    (tmp_path / "results.json").write_text(text)
    err = user_error(capsys, "table", tmp_path)
    assert f"{tmp_path / 'results.json'}" in err and message in err


def test_check_does_not_call_an_overflowing_folder_complete(tmp_path, capsys, monkeypatch):
    """Finding 8: `check` reported a folder holding 10**400 as complete."""
    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path / "cache"))
    cfg = tiny_run_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    import dataclasses

    from coblax.app.experiment import config_fingerprint, plan_run

    plan = plan_run(cfg, tmp_path / "clean")  # the same config's fingerprint: only the number is wrong
    payload = {"config": dataclasses.asdict(plan.cfg), "fingerprint": config_fingerprint(dataclasses.asdict(plan.cfg),
                                                                                     plan.digest),
               "records": [_REC | {"budget_mac": "@"}]}
    text = json.dumps(payload).replace('"@"', "1" + "0" * 400)
    (out / "results.json").write_text(text)
    err = user_error(capsys, "check", cfg, "--out", out)
    assert "not a valid results file" in err and "complete" not in err


def _mlp_cbx(meta: dict) -> bytes:
    rng = np.random.default_rng(0)
    cb = np.linspace(-1, 1, 8).astype(np.float32)
    w = cb[rng.integers(0, 8, (60, 20))]
    w[rng.random(w.shape) > 0.3] = 0
    params = {"params": {"fc1": {"kernel": w, "bias": np.zeros(20, np.float32)},
                         "fc2": {"kernel": np.ones((20, 10), np.float32), "bias": np.zeros(10, np.float32)}}}
    data, _ = encode_cbx(params, {"params/fc1/kernel": LeafCoding(cb, index_bits=4)}, meta)
    return data


def test_cbx_whose_dataset_does_not_fit_its_input_shape_exits_2(tmp_path, capsys):
    """Finding 8: a plain ValueError (exit 1) when the dataset's images do not fit the model."""
    meta = {"model": {"name": "mlp", "options": {"hidden": [20]}}, "num_classes": 10,
            "input_shape": [6, 10, 1], "dataset": {"name": "digits"}}
    path = tmp_path / "net.cbx"
    path.write_bytes(_mlp_cbx(meta))
    err = user_error(capsys, "evaluate", path)
    assert f"{path}: the model expects inputs [6, 10, 1]" in err and "dataset 'digits' has [8, 8, 1]" in err


def test_sparse_leaf_amplification_capped_in_real_memory(tmp_path):
    """Finding 10: a small sparse .cbx within MAX_ELEMENTS decoded to gigabytes.

    One table byte turns the coded (60, 20) kernel into (4194364, 20): 84 M elements,
    within MAX_ELEMENTS, 336 MB as float32. It must be refused before decoding, with
    RSS growth under 200 MB (measured in a subprocess).
    """
    data = _mlp_cbx({})
    coded = [e for e in table_entries(data) if e[2] is not None][0]
    forged = bytearray(data)
    forged[coded[0] + 2] = 0x40  # first dimension 60 -> 60 + 64 * 65536
    rows = 60 + 64 * 65536
    assert rows * 20 < MAX_ELEMENTS and rows * 20 * 4 > MAX_DECODED_BYTES
    path = tmp_path / "sparse.cbx"
    path.write_bytes(recrc(forged))
    script = textwrap.dedent(f"""
        from coblax.compress.cbx import CbxError, read_cbx
        def hwm():  # not getrusage: Linux carries pytest's peak into the child
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # the peak restarts from the current RSS
        before = hwm()
        try:
            read_cbx({str(path)!r})
            outcome = "decoded"
        except CbxError as err:
            outcome = "refused: " + str(err)
        print(f"{{(hwm() - before) / 1024:.1f}}", outcome)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    grew, outcome = out.stdout.split(" ", 1)
    assert outcome.startswith("refused") and "bytes (the reader's limit" in outcome, outcome
    assert float(grew) < 200.0, out.stdout
