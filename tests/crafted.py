"""Crafted files for the resource-cap tests, ``benchmarks/bench_caps.py`` and
``benchmarks/probe_entry_points.py``: ``.cbx`` files of an ``mlp`` on ``digits`` whose
decoded size is as large as the readers allow for their size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coblax.compress.cbx import LeafCoding, write_cbx

LEAVES = ("params/fc1/kernel", "params/fc1/bias", "params/fc2/kernel", "params/fc2/bias")


def mlp_params(hidden: int, every: int, *, seed: int = 0, dense_values: int = 0) -> dict:
    """An ``mlp`` (64 -> ``hidden`` -> 10) with one nonzero 0.5 in each ``every`` elements.

    ``dense_values=k`` instead fills every element with one of k values (0.5 mostly,
    so that Huffman codes it in ~1 bit).
    """
    shapes = {"fc1": ((64, hidden), (hidden,)), "fc2": ((hidden, 10), (10,))}
    rng = np.random.default_rng(seed)
    params = {}
    for layer, (k_shape, b_shape) in shapes.items():
        leaves = {}
        for leaf, shape in (("kernel", k_shape), ("bias", b_shape)):
            if dense_values:
                arr = np.full(shape, 0.5, np.float32)
                flat = arr.reshape(-1)
                pick = rng.random(flat.size) < 0.05
                flat[pick] = rng.integers(1, dense_values, pick.sum()).astype(np.float32)
            else:
                arr = np.zeros(shape, np.float32)
                arr.reshape(-1)[::every] = 0.5
            leaves[leaf] = arr
        params[layer] = leaves
    return {"params": params}


def write_mlp_cbx(path: Path, hidden: int, *, every: int = 9, index_bits: int = 4,
                  dense_values: int = 0) -> int:
    """Write the :func:`mlp_params` network as a ``.cbx`` of ``digits``; returns its decoded bytes.

    Sparse (default): every leaf relative-indexed with ``index_bits``-bit gaps and a
    two-value codebook, one nonzero in ``every`` elements: ~5 bits per ``every``
    float32s, so ``every=9`` decodes to ~58x the file, just under the 64x cap, the
    most a file may amplify. ``dense_values=k``: every element stored, Huffman coded
    (~1 bit each, ~29x): the shape that stresses the Huffman decoder.
    """
    params = mlp_params(hidden, every, dense_values=dense_values)
    if dense_values:
        cb = np.concatenate([[0.5], np.arange(1, dense_values)]).astype(np.float32)
        coding = {k: LeafCoding(cb, index_bits=0, huffman_index=False) for k in LEAVES}
    else:
        cb = np.array([0.0, 0.5], np.float32)
        coding = {k: LeafCoding(cb, index_bits=index_bits, huffman_weights=False, huffman_index=False)
                  for k in LEAVES}
    meta = {"model": {"name": "mlp", "options": {"hidden": [hidden]}}, "num_classes": 10,
            "input_shape": [8, 8, 1], "dataset": {"name": "digits"}}
    write_cbx(path, params, coding, meta)
    return 4 * sum(a.size for layer in params["params"].values() for a in layer.values())


def write_deflated_export(path: Path, mib: int, spacing: int = 90) -> int:
    """A ``save_factored`` export of ``test_safe_load.Mlp`` with an extra float32 leaf of
    ``mib`` MiB, rewritten deflated; the leaf holds one random value per ``spacing``
    zeros, so the file inflates ~58x (``spacing=90``): just under ``MAX_NPZ_RATIO``, the
    most an export may amplify. Returns the declared (inflated) bytes."""
    import zipfile

    from test_safe_load import make_result

    from coblax.lowrank.export import save_factored

    res = make_result()
    extra = np.zeros(mib << 18, np.float32)
    extra[::spacing] = np.random.default_rng(0).normal(size=extra[::spacing].size)
    res.variables["params"]["extra"] = {"w": extra}
    save_factored(path, res)
    with np.load(path) as data:
        content = {k: data[k] for k in data.files}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for k, v in content.items():
            with zf.open(k + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, v)
    with zipfile.ZipFile(path) as zf:
        return sum(i.file_size for i in zf.infolist())
