"""Data-parallel E(m) across two CPU processes (``jax.distributed``) equals the one-device E(m)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from coblax.lowrank.multihost import initialize_from_env
    assert initialize_from_env()
    import jax, jax.numpy as jnp, numpy as np
    from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
    from coblax.lowrank.objective import NetworkLoss
    from coblax.nn.models import build_model

    assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
    model = build_model("small_cnn", num_classes=10, channels=(4, 6, 8), dense=12)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(53, 8, 8, 1)).astype(np.float32)  # odd size: padding on one shard
    y = rng.integers(0, 10, size=53).astype(np.int32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    layers = [l for l in trace_layers(model, params, jnp.asarray(x[:1])) if l.decomposable]
    out = {}
    for scheme in ("tai", "zhang"):
        fs = {l.name: factorize(get_kernel(params, l.name), l, scheme) for l in layers}
        one = NetworkLoss(model, params, fs, (x, y), (x[:9], y[:9]), batch_size=16)  # this process's device
        two = NetworkLoss(model, params, fs, (x, y), (x[:9], y[:9]), batch_size=16, data_parallel=True)
        m = np.random.default_rng(1).uniform(0.2, 1.0, size=one.size)
        v1, g1 = one.value_and_grad(m)
        v2, g2 = two.value_and_grad(m)
        out[scheme] = {"v1": v1, "v2": v2, "g1": g1.tolist(), "g2": g2.tolist(),
                       "shards": len(two._obj[0].sharding.device_set),
                       "local": len(two._obj[0].addressable_shards),
                       "val1": one.validation_loss(m), "val2": two.validation_loss(m)}
    print("RESULT" + json.dumps(out), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two JAX processes: ~40 s on the shared 2-core machine; tests/test_data_parallel.py
def test_two_process_objective_equals_one_device():  # covers the same sharded program in one process
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", COBLAX_COORDINATOR=f"127.0.0.1:{port}",
                   COBLAX_NUM_PROCESSES="2", COBLAX_PROCESS_ID=str(pid))
        env.pop("XLA_FLAGS", None)  # one device per process
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-3000:]
            line = next(l for l in stdout.splitlines() if l.startswith("RESULT"))
            results.append(json.loads(line[len("RESULT"):]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert results[0] == results[1]  # every process gets the same E(m) and gradient
    for scheme, r in results[0].items():
        assert (r["shards"], r["local"]) == (2, 1), scheme  # the data is split over both processes
        assert abs(r["v2"] - r["v1"]) <= 1e-6 * abs(r["v1"]), scheme
        assert abs(r["val2"] - r["val1"]) <= 1e-6 * abs(r["val1"]), scheme
        g1, g2 = np.array(r["g1"]), np.array(r["g2"])
        assert np.linalg.norm(g2 - g1) <= 1e-6 * np.linalg.norm(g1), scheme


@pytest.mark.parametrize("args, match", [
    (("localhost", 2, 0), "host:port"),
    (("localhost:1", 0, 0), "num_processes"),
    (("localhost:1", 2, 2), "process_id"),
])
def test_initialize_rejects_bad_arguments(args, match):
    from coblax.lowrank.multihost import initialize

    with pytest.raises(ValueError, match=match):
        initialize(*args)


def test_initialize_from_env_names_the_variable(monkeypatch):
    from coblax.lowrank.multihost import initialize_from_env

    monkeypatch.delenv("COBLAX_COORDINATOR", raising=False)
    assert initialize_from_env() is False
    monkeypatch.setenv("COBLAX_COORDINATOR", "localhost:1")
    monkeypatch.setenv("COBLAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="COBLAX_NUM_PROCESSES"):
        initialize_from_env()
