"""The config keys ``budgets.rank_multiple`` and ``budgets.latency`` in ``coblax run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coblax.app.config import load_run_config
from coblax.util.schema import ConfigError
from helpers import tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def _run(cfg: Path, out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COBLAX_CACHE=str(cache), PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "coblax.app.cli", "run", str(cfg), "--out", str(out), "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("key, text", [("budgets__latency", "0.0"), ("budgets__latency", "1.5"),
                                       ("budgets__rank_multiple", "0"), ("budgets__latency_batch", "0"),
                                       ("budgets__latency_checks", "-1")])
def test_bad_budget_keys_are_named(tmp_path, key, text):
    with pytest.raises(ConfigError, match=key.split("__")[1]):
        load_run_config(tiny_run_config(tmp_path, **{key: text}))


@pytest.mark.slow
def test_rank_multiple_and_latency_keys_in_a_run(tmp_path):
    # latency 1.0: always feasible (the tiny MLP's factored layers are no faster than a
    # dispatch); the allocations under binding tables are tested with injected tables
    cfg = tiny_run_config(tmp_path, methods='["uniform", "pos_exact"]', budgets__rank_multiple="4",
                          budgets__latency="1.0", budgets__latency_batch="8", budgets__mac="[1.0]",
                          budgets__param="[1.0]")
    proc = _run(cfg, tmp_path / "out", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert len(records) == 2
    for rec in records:
        assert rec["rank_multiple"] == 4 and rec["budget_latency"] == 1.0
        for name, r in rec["ranks"].items():
            assert r % 4 == 0 or r == rec["full_ranks"][name]
        assert rec["diagnostics"]["latency"]["predicted_ratio"] <= 1.0 + 1e-9
        # measured end to end (budgets.latency_checks = 2 by default): every attempt is reported
        checks = rec["diagnostics"]["latency"]["end_to_end"]
        assert 1 <= len(checks) <= 3 and all(c["measured"] > 0 for c in checks)
        assert rec["mac_ratio"] <= 1.0 + 1e-9
    assert list((tmp_path / "cache" / "latency").glob("*.json"))  # tables cached in the cache folder
