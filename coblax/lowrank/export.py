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

from coblax.lowrank.decompose import _as_tuple, _explicit_pads, layer_key
from coblax.lowrank.nnx_adapter import is_nnx_module
from coblax.util import flatten_tree, to_numpy_tree, unflatten_tree, write_bytes_atomic

__all__ = [
    "FORMAT",
    "CBX_FORMAT",
    "Exported",
    "save_factored",
    "load_factored",
    "exported_variables",
    "export_header",
    "FLOAT_DTYPES",
    "CARRIED_DTYPES",
]

FORMAT = "coblax-factored-1"
CBX_FORMAT = "coblax-factored-cbx-1"
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# dtypes carried as float64 in a .cbx (exactly) and restored when loading
CARRIED_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
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
    if is_nnx_module(result.model):  # a flax.nnx network: its own format
        from coblax.lowrank.nnx_export import save_factored_nnx

        return save_factored_nnx(path, result, variables=variables, meta=meta)
    variables = result.variables if variables is None else variables
    header = export_header(result, meta, FORMAT)
    arrays = flatten_tree(to_numpy_tree(exported_variables(variables)))
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path).stat().st_size


def export_header(result: Any, meta: dict | None, fmt: str) -> dict:
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
    unchanged); nothing else of the original is needed. For a flax.nnx model pass a
    fresh instance (:func:`coblax.lowrank.nnx_export.load_factored_nnx`).
    """
    if is_nnx_module(model):
        from coblax.lowrank.nnx_export import load_factored_nnx

        return load_factored_nnx(path, model)
    with np.load(path, allow_pickle=False) as data:
        if _HEADER not in data.files:
            raise ValueError(f"{path}: not a coblax factored export (no {_HEADER} header)")
        header = json.loads(bytes(data[_HEADER]).decode("utf-8"))
        flat = {k: jnp.asarray(data[k]) for k in data.files if k != _HEADER}
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    return Exported(model, unflatten_tree(flat), header["layers"], header["apply_kwargs"], header["meta"])
