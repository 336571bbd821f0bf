"""Bit-packed export of a factored network: pruning and k-means sharing on top, one ``.cbx``.

It composes the two method families — the factored network of :mod:`coblax.lowrank.export`
and the compression back-end's pruning, weight sharing and ``.cbx`` writer — so it lives in
the application layer, which is the one allowed to import both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from coblax.compress import prune as P
from coblax.compress import quantize as Q
from coblax.compress.cbx import CbxError, CbxSizeInfo, LeafCoding, read_cbx, write_cbx
from coblax.compress.pipeline import kernel_path as pipeline_kernel_path
from coblax.compress.pipeline import needs_zero_code, walk_axes
from coblax.lowrank.export import (
    CARRIED_DTYPES,
    CBX_FORMAT,
    FLOAT_DTYPES,
    Exported,
    ExportError,
    check_header,
    check_layout,
    device_leaves,
    export_header,
    exported_variables,
    restore_dtypes,
)
from coblax.util import flatten_tree, to_numpy_tree, unflatten_tree

__all__ = ["prune_and_share", "save_factored_cbx", "load_factored_cbx"]




def prune_and_share(
    variables: Mapping[str, Any],
    *,
    prune: float | Mapping[str, float] | None = None,
    bits: int | Mapping[str, int] | None = None,
    index_bits: int = 5,
    huffman: bool = True,
    order: str = "out_major",
    init: str = "linear",
    iters: int = 50,
    seed: int = 0,
) -> tuple[dict, dict[str, LeafCoding]]:
    """Magnitude pruning and k-means weight sharing of an exported network's kernels.

    ``variables`` are the factored network's (with a ``factors`` collection) or
    already :func:`exported_variables`; layers are named as in the export
    (``"conv1/first"``, ``"conv1/second"``, ``"head"``).

    Args:
      prune: fraction of each kernel's weights to drop, smallest |w| first
        (:func:`coblax.compress.prune.magnitude_masks`, per layer), a float or
        ``{layer: fraction}``; None prunes nothing.
      bits: b bits per weight code, an int or ``{layer: int}`` (layers absent: float32
        nonzeros). A layer whose stored entries include zeros (relative-index fillers)
        gets k = 2^b - 1 centroids so that 0.0 is the 2^b-th value, as
        :class:`coblax.compress.pipeline.QuantizeStage`; k is capped at the kept count.
      index_bits: b of the relative index's gaps of pruned kernels (unpruned kernels:
        dense layout, no index).
      huffman: Huffman-code the weight codes and the gaps.
      order: ``"out_major"`` (one output unit at a time) or ``"stored"``.

    Returns:
      (the exported variables with the kernels pruned and shared -- what the file
      stores, exactly --, ``{leaf path: LeafCoding}`` for :func:`~coblax.compress.cbx.write_cbx`).
    """
    if "factors" in variables:
        variables = exported_variables(variables)
    out = {k: to_numpy_tree(dict(v)) for k, v in variables.items()}
    params = out["params"]
    ks = {n: np.asarray(w) for n, w in P.kernels(params).items()}
    masks = P.layer_masks(P.magnitude_masks(params, prune)) if prune is not None else {}
    per_bits = Q.bits_per_layer(bits, list(ks)) if bits is not None else {}
    new, coding = {}, {}
    for i, (name, w) in enumerate(ks.items()):
        m = masks.get(name)
        pruned = m is not None and not bool(np.all(m))
        b = per_bits.get(name)
        if not pruned and b is None:
            continue  # stored raw, bit for bit
        m = np.ones(w.shape, dtype=bool) if m is None else m
        axes = walk_axes(w.ndim, order)
        gap_bits = index_bits if pruned else 0
        codebook = None
        if b is not None and m.any():
            k = min(2**b - (1 if needs_zero_code(m, gap_bits or None, axes) else 0), int(m.sum()))
            codebook, idx, _ = Q.kmeans_codebook(w, max(k, 1), init=init, mask=m, iters=iters,
                                                 seed=seed + i)
            w = np.where(m, codebook[idx], np.float32(0)).astype(w.dtype)
        else:
            w = np.where(m, w, np.zeros_like(w))
        new[name] = w
        coding[pipeline_kernel_path(name)] = LeafCoding(
            codebook=codebook, index_bits=gap_bits,
            huffman_weights=huffman and codebook is not None,
            huffman_index=huffman and gap_bits > 0, axes=axes,
        )
    out["params"] = P.replace_kernels(params, new)
    return out, coding


def _to_float_carrier(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Non-float leaves as float64 (exact, checked) and their dtypes."""
    dtypes = {}
    for path, arr in flat.items():
        if arr.dtype.name in FLOAT_DTYPES:
            continue
        if arr.dtype.name not in CARRIED_DTYPES:
            raise ValueError(f"leaf {path!r} has dtype {arr.dtype.name}; a .cbx export stores "
                             f"{', '.join(FLOAT_DTYPES + CARRIED_DTYPES)}")
        carried = arr.astype(np.float64)
        if not np.array_equal(carried.astype(arr.dtype), arr) or (
                arr.size and np.abs(carried).max() >= 2.0**53):
            raise ValueError(
                f"leaf {path!r}: its {arr.dtype.name} values do not fit float64 exactly"
            )
        flat[path], dtypes[path] = carried, arr.dtype.name
    return flat, dtypes


def save_factored_cbx(
    path: str | os.PathLike,
    result: Any,
    *,
    variables: Any = None,
    prune: float | Mapping[str, float] | None = None,
    bits: int | Mapping[str, int] | None = None,
    index_bits: int = 5,
    huffman: bool = True,
    meta: dict | None = None,
    seed: int = 0,
) -> CbxSizeInfo:
    """Write a :class:`~coblax.lowrank.api.Compressed` network as one bit-packed ``.cbx`` file.

    The kernels are pruned / shared by :func:`prune_and_share` (``prune``, ``bits``,
    ``index_bits``, ``huffman``, ``seed``); every other leaf of every collection is
    stored raw in its dtype. Without ``prune`` and ``bits`` the file holds the
    :func:`save_factored` values bit for bit. :func:`load_factored_cbx` reads it.

    Returns:
      The size breakdown (``total_bytes`` is the file's size).
    """
    variables = result.variables if variables is None else variables
    stored, coding = prune_and_share(variables, prune=prune, bits=bits, index_bits=index_bits,
                                     huffman=huffman, seed=seed)
    flat, dtypes = _to_float_carrier(flatten_tree(stored))
    header = export_header(result, meta, CBX_FORMAT) | {"dtypes": dtypes}
    return write_cbx(path, unflatten_tree(flat), coding, header)


def load_factored_cbx(path: str | os.PathLike, model: Any) -> Exported:
    """Read a file written by :func:`save_factored_cbx` and rebuild the network.

    Raises :class:`~coblax.compress.cbx.CbxError` for a damaged file (checksum,
    sizes, header) and ValueError for a ``.cbx`` that is not a factored export.
    """
    tree, header = read_cbx(path)
    where = os.fspath(path)
    flat = flatten_tree(tree)
    try:
        check_header(header, where, CBX_FORMAT)
        check_layout({k: (v.shape, v.dtype.name) for k, v in flat.items()}, header, where)
        restore_dtypes(flat, header, where, CARRIED_DTYPES)
    except ExportError as err:
        raise CbxError(str(err)) from None
    return Exported(model, unflatten_tree(device_leaves(flat)), header["layers"], header["apply_kwargs"],
                    header["meta"])
