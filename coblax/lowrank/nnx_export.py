"""Export a factored flax.nnx network as a safe ``.npz`` and rebuild it from the model code.

Reached from :func:`coblax.lowrank.export.save_factored` / ``load_factored`` when the
network is an nnx module. File format ``coblax-factored-nnx-1`` (read with
``allow_pickle=False``, so loading never runs code):

* one array per variable of the factored module's ``nnx.State``, keyed by its path
  joined by '/' (``conv2/first/kernel``, ``bn1/mean``, ``drop/rngs/default/count``):
  every variable type (``Param``, ``BatchStat``, ``Rng*``, a model's own types);
  a factored layer ``P`` is ``P/first/kernel``, ``P/second/kernel`` and ``P/second/bias``;
  a PRNG key is stored as its raw key data;
* ``__coblax__``: the JSON header of the linen format (format, each factored layer's
  ``kind`` and ``scheme``, eval-mode ``apply_kwargs``, the caller's ``meta``) plus each
  variable's type name and the PRNG implementation of each key.

:func:`load_factored_nnx` takes a fresh instance of the same nnx model (its code
unchanged; its initial weights are overwritten), replaces the layers named in the
header by :class:`~coblax.lowrank.nnx_adapter.Factored` of the stored ranks and fills
every variable from the file: every path must be there with its shape and dtype, and
the file may hold nothing else, so the network comes back exactly.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coblax.lowrank.decompose import Factors
from coblax.lowrank.export import Exported, export_header
from coblax.lowrank.nnx_adapter import factored_module, find_layers, replace_layers
from coblax.util import write_bytes_atomic

__all__ = ["NNX_FORMAT", "NnxExported", "load_factored_nnx", "save_factored_nnx"]

NNX_FORMAT = "coblax-factored-nnx-1"
_HEADER = "__coblax__"


def _flat(state: Any) -> list[tuple[str, Any]]:
    return [("/".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def _is_key(value: Any) -> bool:
    return jax.dtypes.issubdtype(jnp.asarray(value).dtype, jax.dtypes.prng_key)


def save_factored_nnx(path: str | os.PathLike, result: Any, *, variables: Any = None, meta: dict | None = None
                      ) -> int:
    """Write an nnx :class:`~coblax.lowrank.api.Compressed` network to ``path``; returns its size in bytes.

    ``variables`` (default ``result.variables``) is the factored module's ``nnx.State``.
    """
    state = result.variables if variables is None else variables
    arrays: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    keys: dict[str, str] = {}
    for name, var in _flat(state):
        value = var.get_value()
        types[name] = type(var).__name__
        if _is_key(value):
            keys[name] = str(jax.random.key_impl(value))
            value = jax.random.key_data(value)
        arrays[name] = np.asarray(value)
    header = export_header(result, meta, NNX_FORMAT) | {"variables": types, "keys": keys}
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path).stat().st_size


@dataclasses.dataclass(frozen=True, eq=False)
class NnxExported(Exported):
    """A network loaded by :func:`load_factored_nnx`: ``model`` is the factored nnx module
    (eval mode), ``variables`` its ``nnx.State``; ``apply(variables, x)`` runs it."""

    def apply_fn(self, variables: Any, x: jnp.ndarray, **kwargs: Any) -> Any:
        return nnx.merge(nnx.graphdef(self.model), variables)(x, **kwargs)


def load_factored_nnx(path: str | os.PathLike, model: nnx.Module) -> NnxExported:
    """Read a file written by :func:`save_factored_nnx` into a copy of ``model``.

    Raises:
      ValueError: not an nnx export, a factored layer the model does not have, or
        variables missing, extra or of another shape/dtype than the model's (by path).
    """
    with np.load(path, allow_pickle=False) as data:
        if _HEADER not in data.files:
            raise ValueError(f"{path}: not a coblax factored export (no {_HEADER} header)")
        header = json.loads(bytes(data[_HEADER]).decode("utf-8"))
        flat = {k: data[k] for k in data.files if k != _HEADER}
    if header.get("format") != NNX_FORMAT:
        raise ValueError(f"{path}: format {header.get('format')!r}, expected {NNX_FORMAT!r} (an nnx export; "
                         f"a linen export loads with the linen model)")
    template = nnx.clone(model)
    layers = find_layers(template)
    new, names = {}, {}
    for name, spec in header["layers"].items():
        if name not in layers:
            raise ValueError(f"{path}: factored layer {name!r} is not an nnx.Linear/nnx.Conv of "
                             f"{type(model).__name__}; its layers: {', '.join(layers)}")
        k1, k2 = flat.get(f"{name}/first/kernel"), flat.get(f"{name}/second/kernel")
        if k1 is None or k2 is None:
            raise ValueError(f"{path}: layer {name!r} has no first/second kernels")
        f = Factors(spec["kind"], spec["scheme"], k1, k2, None)
        new[id(layers[name])], names[id(layers[name])] = factored_module(layers[name], f), name
    replace_layers(template, new, names)
    template.eval()
    graphdef, state = nnx.split(template)
    wanted = _flat(state)
    missing = [n for n, _ in wanted if n not in flat]
    extra = sorted(set(flat) - {n for n, _ in wanted})
    if missing or extra:
        raise ValueError(f"{path}: does not match {type(model).__name__}: missing {missing}, extra {extra}")
    for name, var in wanted:
        value, like = flat[name], var.get_value()
        if name in header.get("keys", {}):
            value = jax.random.wrap_key_data(value, impl=header["keys"][name])
        if tuple(value.shape) != tuple(like.shape) or jnp.asarray(value).dtype != like.dtype:
            raise ValueError(f"{path}: {name} is {jnp.asarray(value).dtype}{tuple(value.shape)}, the model "
                             f"needs {like.dtype}{tuple(like.shape)}")
        var.set_value(jnp.asarray(value))
    loaded = nnx.merge(graphdef, state)
    return NnxExported(loaded, nnx.state(loaded), header["layers"], header["apply_kwargs"], header["meta"])
