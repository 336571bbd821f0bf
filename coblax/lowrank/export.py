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
height stride/padding in the first, width in the second), or a grouped X×Y conv
with k groups →k·r then 1×1→N (``alds:k``).

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
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from coblax.lowrank.decompose import as_tuple as _as_tuple
from coblax.lowrank.decompose import explicit_pads as _explicit_pads
from coblax.lowrank.decompose import layer_key, slice_count
from coblax.lowrank.nnx_adapter import is_nnx_module
from coblax.util import flatten_tree, to_numpy_tree, unflatten_tree, write_bytes_atomic
from coblax.util.errors import FileLoadError
from coblax.util.limits import parse_json
from coblax.util.npz import MAX_NPZ_BYTES, NpyEntry, read_npz
from coblax.util.size import SizeRecord

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
    "ExportError",
    "check_header",
]

FORMAT = "coblax-factored-1"
CBX_FORMAT = "coblax-factored-cbx-1"
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# dtypes carried as float64 in a .cbx (exactly) and restored when loading
CARRIED_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_HEADER = "__coblax__"
_MAX_HEADER_BYTES = 16 << 20
# a dense layer's scheme is not used (it may carry the rule's scheme name)
_KINDS = {"dense": ("dense", "zhang", "tai"), "conv": ("zhang", "tai")}


class ExportError(FileLoadError):
    """An export file (``.npz`` or ``.cbx``) that is damaged or does not fit the model."""


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


def save_factored(path: str | os.PathLike, result: Any, *, variables: Any = None, meta: dict | None = None) -> SizeRecord:
    """Write a :class:`~coblax.lowrank.api.Compressed` network to ``path`` (.npz, no pickle).

    Args:
      result: the allocated (and possibly fine-tuned) network.
      variables: the variables to write (default ``result.variables``).
      meta: JSON-able metadata stored in the header (e.g. the measured accuracy).

    Returns:
      The :class:`~coblax.util.size.SizeRecord` of the file (``total_bytes``: its size).
    """
    if is_nnx_module(getattr(result, "model", None)):  # a flax.nnx network: its own format
        from coblax.lowrank.nnx_export import NNX_FORMAT, save_factored_nnx

        save_factored_nnx(path, result, variables=variables, meta=meta)
        return SizeRecord.of(path, NNX_FORMAT)
    variables = result.variables if variables is None else variables
    header = export_header(result, meta, FORMAT)
    arrays = flatten_tree(to_numpy_tree(exported_variables(variables)))
    # NumPy's .npy has no bfloat16: it would store raw 2-byte voids that load back as
    # |V2. Store the bits as uint16 and name the dtype in the header (exact round trip).
    bits = {k: "bfloat16" for k, v in arrays.items() if v.dtype.name == "bfloat16"}
    for k in bits:
        arrays[k] = arrays[k].view(np.uint16)
    if bits:
        header["dtypes"] = bits
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())
    return SizeRecord.of(path, FORMAT)


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
    groups = _slices(spec)
    Y = int(k1.shape[1]) if spec["scheme"] == "zhang" or groups else int(k2.shape[1])
    sh, sw = _as_tuple(mod.strides, 2)
    (ph, pw) = _explicit_pads(mod, tuple(x.shape[1:3]), (X, Y), (sh, sw))
    if spec["scheme"] == "zhang" or groups:
        c1 = nn.Conv(k1.shape[-1], (X, Y), strides=(sh, sw), padding=(ph, pw), use_bias=False,
                     feature_group_count=groups or 1)
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


def check_header(header: Any, where: str, fmt: str) -> dict:
    """The export header's fields, their types checked; :class:`ExportError` naming the field."""
    if not isinstance(header, dict):
        raise ExportError(f"{where}: header is a JSON {type(header).__name__}, expected an object")
    if header.get("format") != fmt:
        raise ExportError(f"{where}: header field 'format' is {header.get('format')!r}, expected {fmt!r}")
    for key in ("layers", "apply_kwargs", "meta"):
        if not isinstance(header.get(key), dict):
            got = "missing" if key not in header else f"a {type(header[key]).__name__}"
            raise ExportError(f"{where}: header field {key!r} is {got}, expected an object")
    for name, spec in header["layers"].items():
        ok = (isinstance(spec, dict) and spec.get("kind") in _KINDS
              and (spec.get("scheme") in _KINDS.get(spec.get("kind"), ())
                   or (spec.get("kind") == "conv" and _slices(spec) > 0)))
        if not ok:
            raise ExportError(f"{where}: header field 'layers.{name}' must be {{kind: dense}} "
                              f"or {{kind: conv, scheme: zhang|tai|alds:k}}, got {spec!r:.80}")
    dtypes = header.get("dtypes", {})
    if not isinstance(dtypes, dict) or not all(isinstance(v, str) for v in dtypes.values()):
        raise ExportError(f"{where}: header field 'dtypes' must map leaf paths to dtype names")
    return header


def _slices(spec: Mapping[str, Any]) -> int:
    """k of a header layer's ``alds:k`` scheme; 0 for any other (or a malformed one)."""
    try:
        return slice_count(spec.get("scheme"))
    except ValueError:
        return 0


def check_layout(layout: Mapping[str, tuple[tuple[int, ...], str]], header: dict, where: str,
                 expected: Mapping[str, tuple[tuple[int, ...], str]] | None = None) -> None:
    """Every array fits the header's declared layers, and the model when ``expected`` is known.

    ``layout`` and ``expected`` map leaf paths (``params/fc1/bias``) to (shape, dtype).
    A factored layer ``P`` needs ``params/P/first/kernel`` and ``params/P/second/kernel``
    of matching rank (dense ``(I, r), (r, O)``; conv 4-D); with ``expected`` (the
    model's own variables, from ``jax.eval_shape``) every other leaf must have the
    model's shape and the factored kernels its outer dimensions.
    """
    def field(key: str) -> tuple[tuple[int, ...], str]:
        if key not in layout:
            raise ExportError(f"{where}: array {key!r} is missing (header layer needs it)")
        return layout[key]

    factored = set()
    for name, spec in header["layers"].items():
        (k1, _), (k2, _) = field(f"params/{name}/first/kernel"), field(f"params/{name}/second/kernel")
        ndim = 2 if spec["kind"] == "dense" else 4
        if len(k1) != ndim or len(k2) != ndim or k1[-1] != k2[-2] or k1[-1] < 1:
            raise ExportError(f"{where}: arrays 'params/{name}/first|second/kernel' have shapes {k1}, {k2}; "
                              f"a factored {spec['kind']} layer needs two {ndim}-D kernels of one rank")
        if ndim == 4 and _slices(spec) and k1[-1] % _slices(spec):
            raise ExportError(f"{where}: array 'params/{name}/first/kernel' has {k1[-1]} channels, not a multiple "
                              f"of the {_slices(spec)} slices of scheme {spec['scheme']!r}")
        factored |= {f"params/{name}/first/kernel", f"params/{name}/second/kernel"}
        if expected is not None:
            want = expected.get(f"params/{name}/kernel")
            if want is None:
                raise ExportError(f"{where}: header field 'layers' names {name!r}, which the model has no "
                                  "kernel for")
            full = want[0]
            groups = _slices(spec) if ndim == 4 else 0
            outer = (k1[0], k2[-1]) if ndim == 2 else (k1[0], k1[2] * (groups or 1), k2[-1])
            need = (full[0], full[-1]) if ndim == 2 else (full[0], full[2], full[-1])
            if outer != need:
                raise ExportError(f"{where}: factored layer {name!r} has outer dimensions {outer}, the model's "
                                  f"kernel {full}")
    if expected is None:
        return
    for key, (shape, _dtype) in layout.items():
        if key in factored:
            continue
        want = expected.get(key)
        if want is None:
            raise ExportError(f"{where}: array {key!r} is not a variable of the model")
        if tuple(want[0]) != tuple(shape):
            raise ExportError(f"{where}: array {key!r} has shape {tuple(shape)}, the model's is {tuple(want[0])}")
    kernels = {f"params/{n}/kernel" for n in header["layers"]}
    missing = sorted(k for k in expected if k not in layout and k not in kernels)
    if missing:
        raise ExportError(f"{where}: array {missing[0]!r} of the model is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def model_layout(model: Any, example: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """leaf path -> (shape, dtype) of ``model.init`` on ``example`` (computed abstractly)."""
    import jax

    x = example if isinstance(example, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
        tuple(np.shape(example)), jnp.asarray(example).dtype)
    tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return {"/".join(str(getattr(p, "key", p)) for p in path): (tuple(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_dtypes(flat: dict[str, np.ndarray], header: dict, where: str, allowed: tuple[str, ...]) -> None:
    """Leaves the header's ``dtypes`` names turned back to that dtype, in place (exactly)."""
    for leaf, dtype in header.get("dtypes", {}).items():
        if leaf not in flat or dtype not in allowed:
            raise ExportError(f"{where}: header field 'dtypes' restores leaf {leaf!r} to {dtype!r}; the file "
                              f"has no such leaf or that is not one of {', '.join(allowed)}")
        if dtype == "bfloat16":
            import ml_dtypes

            if flat[leaf].dtype != np.uint16:
                raise ExportError(f"{where}: bfloat16 leaf {leaf!r} is stored as {flat[leaf].dtype}, not uint16")
            flat[leaf] = flat[leaf].view(ml_dtypes.bfloat16)
        else:
            flat[leaf] = flat[leaf].astype(dtype)


def load_factored(path: str | os.PathLike, model: Any, *, example: Any = None,
                  max_bytes: int = MAX_NPZ_BYTES) -> Exported:
    """Read a file written by :func:`save_factored` and rebuild the network.

    ``model`` is the same Flax model definition that was compressed (its code
    unchanged); nothing else of the original is needed. For a flax.nnx model pass a
    fresh instance (:func:`coblax.lowrank.nnx_export.load_factored_nnx`).

    Nothing is inflated before it is checked: the zip directory's declared sizes
    and each ``.npy`` header against ``max_bytes`` (:mod:`coblax.util.npz`), the
    JSON header against the JSON caps (:mod:`coblax.util.limits`) and its fields,
    then every array's shape against the header's factored layers and, when
    ``example`` (an input batch or ``jax.ShapeDtypeStruct``) is given, against the
    model's own variables.

    Raises:
      ExportError: (a ``CoblaxError`` and ``ValueError``) naming the file and the
        field for a missing, damaged, oversized or mismatched file.
    """
    if is_nnx_module(model):
        from coblax.lowrank.nnx_export import load_factored_nnx

        return load_factored_nnx(path, model)
    where = os.fspath(path)
    if str(where).endswith(".cbx"):
        raise ExportError(f"{where}: a .cbx file; read it with coblax.app.export_cbx.load_factored_cbx")
    expected = None if example is None else model_layout(model, example)
    header: dict = {}

    def check(layout: dict[str, NpyEntry]) -> None:
        entry = layout.get(_HEADER)
        if entry is None:
            raise ExportError(f"{where}: not a coblax factored export (no {_HEADER} header)")
        if entry.dtype != np.uint8 or len(entry.shape) != 1 or entry.nbytes > _MAX_HEADER_BYTES:
            raise ExportError(f"{where}: member {_HEADER!r} is {entry.shape} {entry.dtype}, expected "
                              f"UTF-8 JSON bytes of at most {_MAX_HEADER_BYTES:,}")
        raw = read_npz(path, lambda lay: None, max_bytes=max_bytes, only=(_HEADER,))[_HEADER]
        header.update(check_header(parse_json(raw.tobytes(), f"{where}: header"), where, FORMAT))
        shapes = {k: (e.shape, e.dtype.name) for k, e in layout.items() if k != _HEADER}
        for leaf, dtype in header.get("dtypes", {}).items():
            if leaf in shapes:
                shapes[leaf] = (shapes[leaf][0], dtype)
        check_layout(shapes, header, where, expected)

    flat = read_npz(path, check, max_bytes=max_bytes)
    flat.pop(_HEADER)
    restore_dtypes(flat, header, where, ("bfloat16",))
    return Exported(model, unflatten_tree(device_leaves(flat)), header["layers"], header["apply_kwargs"],
                    header["meta"])


def device_leaves(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """Leaves as JAX arrays, except those JAX would change: they stay exact NumPy arrays.

    With 64-bit JAX off (the default) ``jnp.asarray`` silently turns int64/uint64/
    float64 into 32 bits; a loaded file must give back what was saved, so such a
    leaf is kept as a NumPy array of its own dtype (JAX converts it only where the
    network computes with it). ``flat`` is emptied leaf by leaf, so that each NumPy
    buffer can be freed once its copy exists (peak: the arrays once, plus one leaf).
    On the CPU, ``jax.device_put`` of a 64-byte aligned buffer (as the bounded
    readers allocate them) wraps it without a copy; ``jnp.asarray`` would copy it,
    transiently twice.
    """
    import jax

    out: dict[str, Any] = {}
    for key in list(flat):
        value = flat.pop(key)
        same = jax.dtypes.canonicalize_dtype(value.dtype) == value.dtype
        out[key] = jax.device_put(value) if same else np.asarray(value)
        del value
    return out
