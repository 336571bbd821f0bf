"""Export a factored network as a safe parameter file and run it back standalone.

File format (``.npz``, read with ``allow_pickle=False``, so loading never runs code):

* one array per variable, keyed by its path in the variables tree
  (``params/conv1/bias``, ``batch_stats/bn1/mean``...); a factored layer ``P``
  is stored as two layers, ``params/P/first/kernel`` and ``params/P/second/kernel``
  (its bias, if any, stays at ``params/P/bias``);
* ``__coblax__``: a UTF-8 JSON header (as a uint8 array) with the format version,
  each factored layer's ``kind`` and ``scheme``, the eval-mode ``apply_kwargs``
  and the caller's metadata (accuracy, ranks...).

:func:`load_factored` rebuilds the network from the file and the user's model
definition alone (no SVD, no original weights, no allocator): each factored layer
runs as two consecutive Flax layers — ``nn.Dense(r)`` then ``nn.Dense(out)``, or
for a conv ``nn.Conv`` X×Y→r then 1×1→N (``zhang``) or X×1→r then 1×Y→N (``tai``,
height stride/padding in the first, width in the second).

With pruning and/or k-means weight sharing on top, :func:`save_factored_cbx` writes
the same network as one bit-packed ``.cbx`` file (:mod:`coblax.compress.cbx`): every
collection, the same leaf paths, the kernels as coded leaves (relative-index
nonzeros, codebook codes, Huffman), every other leaf raw, and the header above as
the file's metadata; :func:`load_factored_cbx` reads it back into the same
:class:`Exported` network. ``.cbx`` stores float leaves only, so a leaf of another
dtype (an integer step counter, a bool flag) travels raw as float64 -- exact for
bool, every 8/16/32-bit integer and 64-bit ones below 2^53, checked when writing --
and is restored to its dtype, recorded in the header, when loading.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from coblax.compress import prune as P
from coblax.compress import quantize as Q
from coblax.compress.cbx import CbxError, CbxSizeInfo, LeafCoding, read_cbx, write_cbx
from coblax.compress.pipeline import _needs_zero_code, _walk_axes
from coblax.compress.pipeline import kernel_path as pipeline_kernel_path
from coblax.lowrank.decompose import _as_tuple, _explicit_pads, layer_key
from coblax.util import flatten_tree, to_numpy_tree, unflatten_tree, write_bytes_atomic

__all__ = [
    "FORMAT",
    "CBX_FORMAT",
    "Exported",
    "save_factored",
    "load_factored",
    "exported_variables",
    "prune_and_share",
    "save_factored_cbx",
    "load_factored_cbx",
]

FORMAT = "coblax-factored-1"
CBX_FORMAT = "coblax-factored-cbx-1"
_FLOATS = ("float32", "float16", "bfloat16", "float64")
# dtypes carried as float64 in a .cbx (exactly) and restored when loading
_CARRIED = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_HEADER = "__coblax__"


def exported_variables(variables: Mapping[str, Any]) -> dict:
    """The factored network's variables with each factored layer as two sub-layers."""
    out = {k: v for k, v in variables.items() if k != "factors"}
    params = to_numpy_tree(dict(out["params"]))
    for name, f in variables.get("factors", {}).items():
        node = params
        for part in name.split("/"):
            node = node.setdefault(part, {})
        node["first"] = {"kernel": np.asarray(f["first"])}
        node["second"] = {"kernel": np.asarray(f["second"])}
    out["params"] = params
    return out


def save_factored(path: str | os.PathLike, result: Any, *, variables: Any = None, meta: dict | None = None) -> int:
    """Write a :class:`~coblax.lowrank.api.Compressed` network to ``path`` (.npz, no pickle).

    Args:
      result: the allocated (and possibly fine-tuned) network.
      variables: the variables to write (default ``result.variables``).
      meta: JSON-able metadata stored in the header (e.g. the measured accuracy).

    Returns:
      The file's size in bytes.
    """
    variables = result.variables if variables is None else variables
    header = _header(result, meta, FORMAT)
    arrays = flatten_tree(to_numpy_tree(exported_variables(variables)))
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path).stat().st_size


def _header(result: Any, meta: dict | None, fmt: str) -> dict:
    return {
        "format": fmt,
        "layers": {n: {"kind": f.kind, "scheme": f.scheme} for n, f in result.factors.items()},
        "apply_kwargs": dict(result.apply_kwargs),
        "meta": meta or {},
    }


def _two_layers(mod: nn.Module, spec: Mapping[str, str], weights: Mapping[str, Any], x: jnp.ndarray):
    """A factored layer as two consecutive plain Flax layers (bias on the second)."""
    k1, k2 = weights["first"]["kernel"], weights["second"]["kernel"]
    bias = weights.get("bias")
    p2 = {"kernel": k2} | ({"bias": bias} if bias is not None else {})
    if spec["kind"] == "dense":
        h = nn.Dense(k1.shape[-1], use_bias=False).apply({"params": {"kernel": k1}}, x)
        return nn.Dense(k2.shape[-1], use_bias=bias is not None).apply({"params": p2}, h)
    X = int(k1.shape[0])
    Y = int(k1.shape[1]) if spec["scheme"] == "zhang" else int(k2.shape[1])
    sh, sw = _as_tuple(mod.strides, 2)
    (ph, pw) = _explicit_pads(mod, tuple(x.shape[1:3]), (X, Y), (sh, sw))
    if spec["scheme"] == "zhang":
        c1 = nn.Conv(k1.shape[-1], (X, Y), strides=(sh, sw), padding=(ph, pw), use_bias=False)
        c2 = nn.Conv(k2.shape[-1], (1, 1), padding="VALID", use_bias=bias is not None)
    else:
        c1 = nn.Conv(k1.shape[-1], (X, 1), strides=(sh, 1), padding=(ph, (0, 0)), use_bias=False)
        c2 = nn.Conv(k2.shape[-1], (1, Y), strides=(1, sw), padding=((0, 0), pw), use_bias=bias is not None)
    return c2.apply({"params": p2}, c1.apply({"params": {"kernel": k1}}, x))


@dataclasses.dataclass(frozen=True, eq=False)
class Exported:
    """A network loaded by :func:`load_factored`: ``apply(variables, x)`` runs it (eval mode)."""

    model: Any
    variables: dict
    layers: dict[str, dict[str, str]]
    apply_kwargs: dict
    meta: dict

    def apply_fn(self, variables: Any, x: jnp.ndarray, **kwargs: Any) -> Any:
        """``model.apply`` with the factored layers run as two layers each."""
        layers = self.layers

        def interceptor(next_fun, args, kw, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.Conv)):
                return next_fun(*args, **kw)
            name = layer_key(mod.path)
            if name not in layers:
                return next_fun(*args, **kw)
            node = variables["params"]
            for part in name.split("/"):
                node = node[part]
            return _two_layers(mod, layers[name], node, jnp.asarray(args[0]))

        with nn.intercept_methods(interceptor):
            return self.model.apply(variables, x, **kwargs)

    def apply(self, variables: Any, x: jnp.ndarray) -> jnp.ndarray:
        return self.apply_fn(variables, x, **self.apply_kwargs)


def load_factored(path: str | os.PathLike, model: Any) -> Exported:
    """Read a file written by :func:`save_factored` and rebuild the network.

    ``model`` is the same Flax model definition that was compressed (its code
    unchanged); nothing else of the original is needed.
    """
    with np.load(path, allow_pickle=False) as data:
        if _HEADER not in data.files:
            raise ValueError(f"{path}: not a coblax factored export (no {_HEADER} header)")
        header = json.loads(bytes(data[_HEADER]).decode("utf-8"))
        flat = {k: jnp.asarray(data[k]) for k in data.files if k != _HEADER}
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    return Exported(model, unflatten_tree(flat), header["layers"], header["apply_kwargs"], header["meta"])


# ------------------------------------------------------------------- bit-packed (.cbx)


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
    per_bits = Q._bits_per_layer(bits, list(ks)) if bits is not None else {}
    new, coding = {}, {}
    for i, (name, w) in enumerate(ks.items()):
        m = masks.get(name)
        pruned = m is not None and not bool(np.all(m))
        b = per_bits.get(name)
        if not pruned and b is None:
            continue  # stored raw, bit for bit
        m = np.ones(w.shape, dtype=bool) if m is None else m
        axes = _walk_axes(w.ndim, order)
        gap_bits = index_bits if pruned else 0
        codebook = None
        if b is not None and m.any():
            k = min(2**b - (1 if _needs_zero_code(m, gap_bits or None, axes) else 0), int(m.sum()))
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
        if arr.dtype.name in _FLOATS:
            continue
        if arr.dtype.name not in _CARRIED:
            raise ValueError(f"leaf {path!r} has dtype {arr.dtype.name}; a .cbx export stores "
                             f"{', '.join(_FLOATS + _CARRIED)}")
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
    header = _header(result, meta, CBX_FORMAT) | {"dtypes": dtypes}
    return write_cbx(path, unflatten_tree(flat), coding, header)


def load_factored_cbx(path: str | os.PathLike, model: Any) -> Exported:
    """Read a file written by :func:`save_factored_cbx` and rebuild the network.

    Raises :class:`~coblax.compress.cbx.CbxError` for a damaged file (checksum,
    sizes, header) and ValueError for a ``.cbx`` that is not a factored export.
    """
    tree, header = read_cbx(path)
    if header.get("format") != CBX_FORMAT:
        raise ValueError(f"{path}: format {header.get('format')!r}, expected {CBX_FORMAT!r}")
    flat = flatten_tree(tree)
    for leaf, dtype in header.get("dtypes", {}).items():
        if leaf not in flat or dtype not in _CARRIED:
            raise CbxError(f"{path}: header restores leaf {leaf!r} to {dtype!r}; the file "
                           f"has no such leaf or that is not one of {', '.join(_CARRIED)}")
        flat[leaf] = flat[leaf].astype(dtype)
    variables = unflatten_tree({k: jnp.asarray(v) for k, v in flat.items()})
    return Exported(model, variables, header["layers"], header["apply_kwargs"], header["meta"])
