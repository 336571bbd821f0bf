"""flax.nnx models in coblax: find the layers, trace them, run them factored, build the result.

An ``nnx.Module`` carries its own state, so there is no ``model.apply`` to intercept as
the linen path does (:mod:`coblax.lowrank.decompose`). Instead the model's graph is
edited on a copy (:func:`flax.nnx.clone`; the user's model is never touched):

* every ``nnx.Linear`` / ``nnx.Conv`` (subclasses included) is found by its canonical
  path in the graph, joined by '/' (``"blocks/0/conv1"``: the path under which
  ``nnx.state`` stores its kernel) -- the same layer names and rules as linen;
* for tracing and for COBLA's masked objective each layer is wrapped in a
  :class:`_Hook` that, while a handler is active (a context, like linen's
  ``intercept_methods``), lets the handler compute the call: record its shapes, or
  compute U diag(m ⊙ σ) Vᵀ with :func:`coblax.lowrank.decompose` 's factored
  arithmetic (so the linen and nnx objectives are the same function of m);
* the result replaces each factored layer by :class:`Factored`: two plain nnx layers,
  ``nnx.Linear(in, r)`` then ``nnx.Linear(r, out)``, or for a conv ``nnx.Conv`` X×Y→r
  then 1×1→N (``zhang``) or X×1→r then 1×Y→N (``tai``: height stride/padding in the
  first, width in the second), the bias on the second -- the same two layers that
  :func:`coblax.lowrank.export.load_factored` runs for a linen export.

Every other part of the graph (BatchNorm and its ``BatchStat`` s, Dropout and its
``Rngs``, a model's own ``nnx.Variable`` types) is carried unchanged. A layer reached
from several places (shared weights) is one layer: one hook, one factored pair,
its MACs counted once per call (as in linen).

"Eval mode" for nnx is ``Module.eval()`` (``deterministic=True``,
``use_running_average=True`` on every sub-module that has them) plus the call's
``apply_kwargs``; fine-tuning uses ``Module.train()`` plus ``train_kwargs``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coblax.lowrank.decompose import (
    Factors,
    TracedLayer,
    apply_factors,
    as_tuple,
    call_pads,
    explicit_pads,
)

__all__ = [
    "LAYER_TYPES",
    "Factored",
    "build_factored",
    "factored_calls",
    "factored_module",
    "find_layers",
    "hooked_copy",
    "is_nnx_module",
    "replace_layers",
    "trace_nnx",
]

#: The nnx layers coblax decomposes (and their subclasses), as nn.Dense / nn.Conv in linen.
LAYER_TYPES = (nnx.Linear, nnx.Conv)


def is_nnx_module(obj: Any) -> bool:
    """Whether ``obj`` is a flax.nnx module (it carries its own state)."""
    return isinstance(obj, nnx.Module)


def _name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def find_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """Layer name -> layer for every ``nnx.Linear`` / ``nnx.Conv`` in the graph.

    The name is the layer's canonical path (where ``nnx.state`` puts its kernel); a
    shared layer appears once.
    """
    return {_name(path): node for path, node in nnx.iter_graph(model) if isinstance(node, LAYER_TYPES)}


def _edges(root: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(parent, key, child) for every edge to a graph node; each parent visited once.

    Unlike ``nnx.iter_graph`` this yields every reference to a shared node, so that a
    replacement reaches all of them.
    """
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for key, child in nnx.iter_children(node):
            if isinstance(child, nnx.Variable):
                continue
            yield node, key, child
            stack.append(child)


def replace_layers(root: nnx.Module, new: Mapping[int, nnx.Module], names: Mapping[int, str]) -> None:
    """Replace, in place, every reference to the nodes ``id -> new node`` in ``root``'s graph.

    Raises:
      ValueError: a layer held where it cannot be replaced (a tuple or another
        container that is not an nnx graph node), named by its path.
    """
    hit: set[int] = set()
    for parent, key, child in list(_edges(root)):
        if id(child) not in new:
            continue
        if hasattr(parent, "__setitem__"):  # nnx.List, nnx.Dict
            parent[key] = new[id(child)]
        else:
            setattr(parent, key, new[id(child)])
        hit.add(id(child))
    missed = [names[i] for i in new if i not in hit]
    if missed:
        raise ValueError(f"layers {missed} sit in a container coblax cannot edit (a tuple?); keep layers in "
                         f"module attributes, nnx.List or nnx.Dict")


class _Hook(nnx.Module):
    """A layer that hands its call to the active handler (see :func:`factored_calls`)."""

    def __init__(self, layer: nnx.Module, name: str):
        self.layer = layer
        self.name = name

    def __call__(self, x: jnp.ndarray, *args: Any, **kwargs: Any) -> jnp.ndarray:
        handler = _HANDLER.get()
        if handler is None:
            return self.layer(x, *args, **kwargs)
        return handler(self, x, args, kwargs)


_HANDLER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("coblax_nnx_handler", default=None)


@contextlib.contextmanager
def _handling(handler: Callable) -> Iterator[None]:
    token = _HANDLER.set(handler)
    try:
        yield
    finally:
        _HANDLER.reset(token)


def hooked_copy(model: nnx.Module, names: Collection[str] | None = None) -> nnx.Module:
    """A copy of ``model`` in eval mode whose layers (all, or those in ``names``) are hooked."""
    copy = nnx.clone(model)
    copy.eval()
    layers = find_layers(copy)
    chosen = {n: l for n, l in layers.items() if names is None or n in names}
    replace_layers(copy, {id(l): _Hook(l, n) for n, l in chosen.items()}, {id(l): n for n, l in chosen.items()})
    return copy


@contextlib.contextmanager
def factored_calls(
    factors: Mapping[str, Factors], scales: Mapping[str, jnp.ndarray] | None = None
) -> Iterator[None]:
    """Within the context, hooked layers in ``factors`` compute in factored form.

    The arithmetic is :func:`coblax.lowrank.decompose.factored_apply` 's (scale
    ``m ⊙ σ`` between the two factors, the original bias added), so the nnx and linen
    networks are the same function of the masks.
    """
    scales = scales or {}

    def handler(hook: _Hook, x, args, kwargs):
        f = factors.get(hook.name)
        if f is None:
            return hook.layer(x, *args, **kwargs)
        x = jnp.asarray(x)
        if f.kind == "conv":
            f = dataclasses.replace(f, pads=call_pads(hook.layer, f, x))
        y = apply_factors(f, x, scales.get(hook.name))
        if hook.layer.use_bias:
            y = y + hook.layer.bias[...]
        return y

    with _handling(handler):
        yield


def _describe(name: str, layer: nnx.Module, x: Any, out: Any) -> TracedLayer:
    """A :class:`TracedLayer` for one call (the same rules as the linen trace)."""
    kernel_shape = tuple(layer.kernel[...].shape)
    in_shape, out_shape = tuple(x.shape[1:]), tuple(out.shape[1:])
    if isinstance(layer, nnx.Linear):
        positions = int(np.prod(in_shape[:-1])) if len(in_shape) > 1 else 1
        return TracedLayer(name, "dense", kernel_shape, in_shape, out_shape,
                           macs=positions * kernel_shape[0] * kernel_shape[1])
    macs = int(np.prod(out_shape[:-1])) * int(np.prod(kernel_shape[:-1])) * kernel_shape[-1]
    strides = as_tuple(layer.strides, len(kernel_shape) - 2)
    reason, pads = "", None
    if len(kernel_shape) != 4 or len(in_shape) != 3:
        reason = "only 2-D convolutions on NHWC inputs are decomposed"
    elif int(layer.feature_group_count) != 1:
        reason = "grouped/depthwise convolution"
    elif as_tuple(layer.kernel_dilation, 2) != (1, 1) or as_tuple(layer.input_dilation, 2) != (1, 1):
        reason = "dilated convolution"
    elif getattr(layer, "mask", None) is not None:
        reason = "masked convolution"
    else:
        pads = explicit_pads(layer, in_shape[:2], kernel_shape[:2], strides)
        if pads is None:
            reason = f"padding {layer.padding!r} is not SAME, VALID or explicit"
    return TracedLayer(name, "conv", kernel_shape, in_shape, out_shape, strides, pads or (), macs, reason)


def trace_nnx(model: nnx.Module, example: jnp.ndarray, apply_kwargs: Mapping[str, Any] | None = None
              ) -> list[TracedLayer]:
    """Every Linear/Conv call of the model (eval mode) on one example, in first-call order.

    Abstract (``jax.eval_shape``): nothing is computed and ``model`` is not changed. A
    layer called several times is one entry whose ``macs`` sum over its calls and whose
    ``calls`` list every call's shapes (as :func:`coblax.lowrank.decompose.trace_layers`).
    """
    kwargs = dict(apply_kwargs or {})
    graphdef, state = nnx.split(hooked_copy(model))
    found: list[TracedLayer] = []

    def handler(hook: _Hook, x, args, kw):
        out = hook.layer(x, *args, **kw)
        found.append(_describe(hook.name, hook.layer, x, out))
        return out

    def run(s, x):
        with _handling(handler):
            return nnx.merge(graphdef, s)(x, **kwargs)

    jax.eval_shape(run, state, jnp.asarray(example[:1]))
    seen: dict[str, TracedLayer] = {}
    for layer in found:
        shapes = ((layer.in_shape, layer.out_shape),)
        if layer.name in seen:  # shared weights: one layer, cost per call
            prev = seen[layer.name]
            seen[layer.name] = dataclasses.replace(prev, macs=prev.macs + layer.macs,
                                                   calls=prev.call_shapes + shapes, reason=prev.reason or layer.reason)
        else:
            seen[layer.name] = dataclasses.replace(layer, calls=shapes)
    return list(seen.values())


class Factored(nnx.Module):
    """One factored layer as two plain nnx layers: ``second(first(x))``.

    ``first`` has no bias; ``second`` carries the original layer's bias. ``kind``
    (``"dense"`` / ``"conv"``) and ``scheme`` (``"dense"``, ``"tai"``, ``"zhang"``) say
    how the kernel was matricized (see :mod:`coblax.lowrank.decompose`).
    """

    def __init__(self, first: nnx.Module, second: nnx.Module, kind: str, scheme: str):
        self.first = first
        self.second = second
        self.kind = kind
        self.scheme = scheme

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.second(self.first(x))


def _split_padding(padding: Any, scheme: str) -> tuple[Any, Any]:
    """The original conv's padding as (first conv's, second conv's).

    'SAME'/'VALID' pad each axis from that axis's size, kernel and stride alone, so the
    string carries over to both convs of ``tai`` (a 1-wide kernel at stride 1 gets no
    padding); explicit padding splits by axis: height in the first, width in the second.
    """
    if isinstance(padding, str):
        return (padding, "VALID") if scheme == "zhang" else (padding, padding)
    if isinstance(padding, int):
        pads = ((padding, padding), (padding, padding))
    else:
        pads = tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)
    if scheme == "zhang":
        return pads, "VALID"
    return (pads[0], (0, 0)), ((0, 0), pads[1])


def factored_module(layer: nnx.Module, f: Factors) -> Factored:
    """The :class:`Factored` form of ``layer`` with the (truncated) factors ``f``.

    The sub-layers keep the original's ``dtype``, ``param_dtype`` and ``precision``;
    ``f.first`` / ``f.second`` become their kernels and the original bias the second's.
    """
    rank = int(np.shape(f.first)[-1])
    common = {"dtype": layer.dtype, "param_dtype": layer.param_dtype, "precision": layer.precision,
              "rngs": nnx.Rngs(0)}
    if f.kind == "dense":
        first = nnx.Linear(layer.in_features, rank, use_bias=False, **common)
        second = nnx.Linear(rank, layer.out_features, use_bias=layer.use_bias, **common)
        scheme = "dense"
    else:
        sh, sw = as_tuple(layer.strides, 2)
        p1, p2 = _split_padding(layer.padding, f.scheme)
        k1, k2 = tuple(np.shape(f.first)[:2]), tuple(np.shape(f.second)[:2])
        s1, s2 = ((sh, sw), (1, 1)) if f.scheme == "zhang" else ((sh, 1), (1, sw))
        first = nnx.Conv(layer.in_features, rank, k1, strides=s1, padding=p1, use_bias=False, **common)
        second = nnx.Conv(rank, layer.out_features, k2, strides=s2, padding=p2, use_bias=layer.use_bias, **common)
        scheme = f.scheme
    first.kernel[...] = jnp.asarray(f.first, layer.param_dtype)
    second.kernel[...] = jnp.asarray(f.second, layer.param_dtype)
    if layer.use_bias:
        second.bias[...] = layer.bias[...]
    return Factored(first, second, f.kind, scheme)


def build_factored(model: nnx.Module, kept: Mapping[str, Factors]) -> nnx.Module:
    """A copy of ``model`` (eval mode) whose layers in ``kept`` are :class:`Factored`."""
    copy = nnx.clone(model)
    copy.eval()
    layers = find_layers(copy)
    new = {id(layers[n]): factored_module(layers[n], f) for n, f in kept.items()}
    replace_layers(copy, new, {id(layers[n]): n for n in kept})
    return copy
