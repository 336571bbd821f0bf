"""Data-parallel E(m): the objective subset sharded over two (host) devices equals one device.

The check runs in a subprocess because XLA_FLAGS must be set before jax is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
    from coblax.lowrank.objective import NetworkLoss
    from coblax.nn.models import build_model

    assert jax.device_count() == 2, jax.devices()
    model = build_model("small_cnn", num_classes=10, channels=(4, 6, 8), dense=12)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(53, 8, 8, 1)).astype(np.float32)  # odd size: padding on one shard
    y = rng.integers(0, 10, size=53).astype(np.int32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    layers = [l for l in trace_layers(model, params, jnp.asarray(x[:1])) if l.decomposable]
    out = {}
    for scheme in ("tai", "zhang"):
        fs = {l.name: factorize(get_kernel(params, l.name), l, scheme) for l in layers}
        one = NetworkLoss(model, params, fs, (x, y), (x[:9], y[:9]), batch_size=16)
        two = NetworkLoss(model, params, fs, (x, y), (x[:9], y[:9]), batch_size=16, data_parallel=True)
        shards = {len(a.sharding.device_set) for a in two._obj}
        m = np.random.default_rng(1).uniform(0.2, 1.0, size=one.size)
        v1, g1 = one.value_and_grad(m)
        v2, g2 = two.value_and_grad(m)
        for _ in range(3):
            two.value_and_grad(np.random.default_rng(2).uniform(size=one.size))
        out[scheme] = {"v1": v1, "v2": v2, "g1": g1.tolist(), "g2": g2.tolist(), "shards": sorted(shards),
                       "val1": one.validation_loss(m), "val2": two.validation_loss(m),
                       "compiled": two.compiled_count()}
    print("RESULT" + json.dumps(out))
    """
)


def test_two_device_objective_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    for scheme, r in json.loads(line[len("RESULT"):]).items():
        assert r["shards"] == [2], scheme  # the data really is split over both devices
        assert abs(r["v2"] - r["v1"]) <= 1e-6 * abs(r["v1"]), scheme
        assert abs(r["val2"] - r["val1"]) <= 1e-6 * abs(r["val1"]), scheme
        g1, g2 = np.array(r["g1"]), np.array(r["g2"])
        assert np.linalg.norm(g2 - g1) <= 1e-6 * np.linalg.norm(g1), scheme
        assert r["compiled"] == 1
