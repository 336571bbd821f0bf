"""Small shared test fixtures: a two-layer tanh MLP and Gaussian blobs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def mlp_params(seed: int = 0, sizes=(6, 8, 3)) -> dict:
    """{"params": {fc1, fc2, ...}} with scaled normal kernels and zero biases."""
    rng = np.random.default_rng(seed)
    p = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        p[f"fc{i + 1}"] = {
            "kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
            "bias": jnp.zeros((b,), jnp.float32),
        }
    return {"params": p}


def mlp_apply(params, x):
    p = params["params"]
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def blobs(n=240, d=6, classes=3, seed=0):
    """Separable Gaussian clusters: (x float32 (n, d), y int32 (n,))."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 2.0
    y = rng.integers(0, classes, size=n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x, y


TINY_RUN = """\
seed = 0
methods = ["uniform", "cptv"]
models = [{ name = "mlp", hidden = [16] }]
[data]
name = "digits"
limit_train = 300
limit_test = 100
[train]
epochs = 2
learning_rate = 0.01
[budgets]
mac = [0.5]
param = [0.5]
[cobla]
objective_size = 64
validation_size = 32
max_iter = 5
roundings = 2
[finetune]
epochs = 1
learning_rate = 0.001
"""


def tiny_run_config(folder, name: str = "cfg.toml", **values: str):
    """Write :data:`TINY_RUN` (seconds to run) with some values replaced; return its path.

    ``values`` maps a key to its TOML text; ``section__key`` sets ``key`` in
    ``[section]`` (``method_options__cptv__beta`` in ``[method_options.cptv]``),
    replacing the line if there is one, else adding it (and the section).
    """
    from pathlib import Path

    lines = TINY_RUN.splitlines()
    for dotted, text in values.items():
        *parts, key = dotted.split("__")
        section = ".".join(parts)
        start = 0 if not section else next((i + 1 for i, l in enumerate(lines) if l == f"[{section}]"), None)
        if start is None:
            lines += [f"[{section}]", f"{key} = {text}"]
            continue
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
        hit = next((i for i in range(start, end) if lines[i].split("=")[0].strip() == key), None)
        if hit is None:
            lines.insert(start, f"{key} = {text}")
        else:
            lines[hit] = f"{key} = {text}"
    path = Path(folder) / name
    path.write_text("\n".join(lines) + "\n")
    return path


def is_count_of(acc: float, n: int) -> bool:
    """``acc`` is k / n for a whole k in [0, n]: an accuracy over exactly n images (a hand count)."""
    k = acc * n
    return 0 <= round(k) <= n and abs(k - round(k)) < 1e-9
