"""Masking-variable decomposition of any Flax model's Dense and Conv layers.

Each decomposable layer's weight is matricized and factored by SVD, W = U S V^T;
singular triplet j of layer i gets a masking variable m_ij and the layer computes
with U diag(m ⊙ σ) V^T. Three factorizations:

* dense: W (in x out) directly; y = ((x U) ⊙ (m σ)) V^T.
* conv ``zhang`` (Zhang et al. 2016, seed Eq. 4): W (X, Y, C, N) as the
  (X·Y·C) x N matrix; an X x Y conv to R channels, scale, then a 1x1 conv to N.
* conv ``tai`` (Tai et al. 2016, seed Eq. 3): W as the (C·X) x (Y·N) matrix; a
  vertical X x 1 conv to R channels, scale, then a horizontal 1 x Y conv to N.
  Stride and padding split by axis: height in the first conv, width in the second.
* conv ``alds:k`` (Liebenwein et al. 2021, ALDS): the C input channels cut into k
  groups of c = C/k; group s's kernel W_s (X, Y, c, N) as the (X·Y·c) x N matrix,
  W_s = U_s S_s V_sᵀ, R = min(X·Y·c, N). A grouped X x Y conv (k groups, k·R
  channels: group s's R channels are U_s) then a 1x1 conv k·R -> N (rows V_sᵀ)
  sums the slices: y = Σ_s V_s S_s U_sᵀ x_s. Rank r keeps the top r triplets of
  *every* slice (one masking variable per index j, as ALDS keeps one rank per
  layer), so a rank costs k triplets (see :mod:`coblax.lowrank.costs`). The
  layer's spectrum is σ̄_j = sqrt(Σ_s σ_{s,j}²): the tail Σ_{j>=r} σ̄_j² is the
  exact squared Frobenius error of rank r, as for a plain SVD. The first kernel's
  column (s, j) is U_s[:, j]·σ_{s,j}/σ̄_j, so m ⊙ σ̄ repeated over the slices
  scales each slice by its own σ_{s,j} (:func:`slice_spectra` reads them back).
  ``alds:1`` is the ``zhang`` form.

The network is run through ``flax.linen.intercept_methods``: a decomposed layer's
``__call__`` is replaced by the factored computation (its bias is still read from
the layer), so any linen model made of ``nn.Dense`` / ``nn.Conv`` works unchanged.
Every variable collection passes through (``batch_stats`` of ``nn.BatchNorm``,
anything a model ``sow``s or keeps in its own collection), as do ``apply``'s
keyword arguments (``train=False``, ``mutable=``, ``rngs=``). A layer called more
than once (shared weights) is decomposed once; its factors serve every call and
its cost counts once per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

__all__ = [
    "SCHEMES",
    "layer_like",
    "matricize",
    "SPECTRA",
    "input_grams",
    "factorize_whitened",
    "TracedLayer",
    "trace_layers",
    "Factors",
    "factorize",
    "factored_apply",
    "truncate",
    "arrange",
    "layer_key",
    "get_kernel",
    "explicit_pads",
    "as_tuple",
    "SLICED",
    "slice_count",
    "sliced_scheme",
    "check_slices",
    "factorize_sliced",
    "slice_spectra",
    "slice_info",
]

SCHEMES = ("tai", "zhang")
#: Prefix of the sliced conv scheme ``"alds:k"`` (k input-channel slices, ALDS).
SLICED = "alds"
SPECTRA = ("weight", "whitened")
_DN = ("NHWC", "HWIO", "NHWC")


def layer_key(path: Iterable[str]) -> str:
    """The layer's name everywhere in coblax: its module path joined by '/'."""
    return "/".join(path)


@dataclasses.dataclass(frozen=True)
class TracedLayer:
    """A Dense or Conv call seen while tracing the model on one example.

    ``macs`` counts multiply-accumulates per example of the layer as it is;
    ``reason`` is empty for a decomposable layer, else why it is not.
    """

    name: str
    kind: str  # "dense" | "conv"
    kernel_shape: tuple[int, ...]
    in_shape: tuple[int, ...]  # one example, without batch
    out_shape: tuple[int, ...]
    strides: tuple[int, ...] = ()
    pads: tuple[tuple[int, int], ...] = ()
    macs: int = 0
    reason: str = ""
    calls: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()  # (in_shape, out_shape) per call

    @property
    def call_shapes(self) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
        """(in_shape, out_shape) of every call; one entry for a layer called once."""
        return self.calls or ((self.in_shape, self.out_shape),)

    @property
    def decomposable(self) -> bool:
        return not self.reason


def explicit_pads(mod: nn.Conv, in_spatial, kernel_spatial, strides):
    """``mod.padding`` as explicit ((lo, hi), ...) pairs for inputs of ``in_spatial`` size;
    None for a padding mode lax cannot spell out (``"CIRCULAR"``...)."""
    pad = mod.padding
    if isinstance(pad, str):
        if pad.upper() in ("SAME", "VALID"):
            return tuple(lax.padtype_to_pads(in_spatial, kernel_spatial, strides, pad.upper()))
        return None
    if isinstance(pad, int):
        return tuple((pad, pad) for _ in in_spatial)
    pads = []
    for p in pad:
        pads.append((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])))
    return tuple(pads)


def as_tuple(v, n):
    """A conv attribute (None, an int or a sequence) as an ``n``-tuple of ints (None: ones)."""
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(a) for a in v)


def trace_layers(
    model: nn.Module,
    variables: Any,
    example: jnp.ndarray,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> list[TracedLayer]:
    """Run the model abstractly on one example and record every Dense/Conv call.

    Uses ``jax.eval_shape`` so nothing is computed; the order is first-call order.
    ``apply_kwargs`` go to ``model.apply`` (e.g. ``{"train": False}`` for a model
    with BatchNorm or dropout; the trace is meant to see the network in eval mode).
    A layer called several times is one entry whose ``macs`` sum over its calls and
    whose ``calls`` list every call's shapes.
    """
    found: list[TracedLayer] = []
    kwargs = dict(apply_kwargs or {})

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.Conv)):
            return out
        x = args[0]
        kernel = mod.get_variable("params", "kernel")
        name = layer_key(mod.path)
        in_shape, out_shape = tuple(x.shape[1:]), tuple(out.shape[1:])
        if isinstance(mod, nn.Dense):
            positions = int(np.prod(in_shape[:-1])) if len(in_shape) > 1 else 1
            macs = positions * kernel.shape[0] * kernel.shape[1]
            found.append(TracedLayer(name, "dense", tuple(kernel.shape), in_shape, out_shape, macs=macs))
            return out
        groups = int(mod.feature_group_count)
        positions = int(np.prod(out_shape[:-1]))
        macs = positions * int(np.prod(kernel.shape[:-1])) * kernel.shape[-1]
        reason = ""
        strides = as_tuple(mod.strides, kernel.ndim - 2)
        pads = None
        if kernel.ndim != 4 or len(in_shape) != 3:
            reason = "only 2-D convolutions on NHWC inputs are decomposed"
        elif groups != 1:
            reason = "grouped/depthwise convolution"
        elif as_tuple(mod.kernel_dilation, 2) != (1, 1) or as_tuple(mod.input_dilation, 2) != (1, 1):
            reason = "dilated convolution"
        else:
            pads = explicit_pads(mod, in_shape[:2], kernel.shape[:2], strides)
            if pads is None:
                reason = f"padding {mod.padding!r} is not SAME, VALID or explicit"
        found.append(
            TracedLayer(name, "conv", tuple(kernel.shape), in_shape, out_shape, strides,
                        pads or (), macs, reason)
        )
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables, example[:1])
    seen: dict[str, TracedLayer] = {}
    for layer in found:
        shapes = ((layer.in_shape, layer.out_shape),)
        if layer.name in seen:  # shared weights: one layer, cost per call
            prev = seen[layer.name]
            seen[layer.name] = dataclasses.replace(
                prev, macs=prev.macs + layer.macs, calls=prev.call_shapes + shapes,
                reason=prev.reason or layer.reason,
            )
        else:
            seen[layer.name] = dataclasses.replace(layer, calls=shapes)
    return list(seen.values())


def layer_like(like: Factors, kernel_shape: Sequence[int], name: str = "") -> Any:
    """The fields of a :class:`TracedLayer` that :func:`factorize` and :func:`arrange` read
    (kind, kernel shape, strides, padding), taken from factors of the same layer: to factor
    another kernel of that layer (trained, or exact) without tracing the network again."""
    from types import SimpleNamespace

    return SimpleNamespace(name=name, kind=like.kind, kernel_shape=tuple(kernel_shape), strides=like.strides,
                           pads=like.pads)


def get_kernel(params: Any, name: str) -> jnp.ndarray:
    node = params["params"]
    for part in name.split("/"):
        node = node[part]
    return node["kernel"]


def slice_count(scheme: str) -> int:
    """k of a sliced conv scheme ``"alds:k"``; 0 for every other scheme.

    Raises:
      ValueError: ``"alds:..."`` whose k is not a positive integer.
    """
    if not isinstance(scheme, str) or not scheme.startswith(SLICED + ":"):
        return 0
    tail = scheme[len(SLICED) + 1:]
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"scheme {scheme!r}: the slice count after {SLICED + ':'!r} must be a positive integer")
    return int(tail)


def sliced_scheme(k: int) -> str:
    """The scheme name of k input-channel slices (``"alds:k"``)."""
    return f"{SLICED}:{int(k)}"


def check_slices(layer: TracedLayer, k: int, key: str) -> None:
    """ValueError naming ``key`` unless ``k`` slices divide ``layer``'s input channels."""
    C = int(layer.kernel_shape[-2])
    if k < 1 or C % k:
        raise ValueError(f"{key}: {k} slices do not divide the {C} input channels of layer {layer.name!r}; "
                         f"use a divisor of {C}")


def matricize(kernel: np.ndarray, kind: str, scheme: str) -> np.ndarray:
    if kind == "dense":
        return kernel
    if slice_count(scheme):
        raise ValueError(f"scheme {scheme!r}: a sliced layer is k matrices, not one (it has no single matricization)")
    X, Y, C, N = kernel.shape
    if scheme == "zhang":
        return kernel.reshape(X * Y * C, N)
    # tai: rows (c, x), cols (y, n)
    return kernel.transpose(2, 0, 1, 3).reshape(C * X, Y * N)


@dataclasses.dataclass(frozen=True)
class Factors:
    """One layer's factors: ``first`` maps the input to R channels, ``second`` back.

    The layer computes second(scale ⊙ first(x)) where ``scale`` is m ⊙ σ during
    the relaxed solve and absent (folded into the kernels) after truncation.
    dense: first (in, R), second (R, out). zhang: first (X, Y, C, R),
    second (1, 1, R, N). tai: first (X, 1, C, R), second (1, Y, R, N).
    """

    kind: str
    scheme: str
    first: Any
    second: Any
    sigma: Any  # singular values (descending), kept for reference / relaxed scaling
    strides: tuple[int, ...] = ()
    pads: tuple[tuple[int, int], ...] = ()


jax.tree_util.register_dataclass(
    Factors, data_fields=["first", "second", "sigma"], meta_fields=["kind", "scheme", "strides", "pads"]
)


def factorize(kernel: np.ndarray, layer: TracedLayer, scheme: str) -> Factors:
    """SVD of the matricized kernel, arranged as two kernels (singular values apart)."""
    if slice_count(scheme) and layer.kind == "conv":
        return factorize_sliced(kernel, layer, slice_count(scheme))
    if scheme not in SCHEMES and not slice_count(scheme):
        raise ValueError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    mat = matricize(np.asarray(kernel, dtype=np.float64), layer.kind, scheme)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    return arrange(u, s, vt, layer, scheme, np.asarray(kernel).dtype)


def arrange(u: np.ndarray, s: np.ndarray, vt: np.ndarray, layer: TracedLayer, scheme: str, dt) -> Factors:
    """Matrix factors U (rows x R), s, V^T (R x cols) as the layer's two kernels."""
    R = s.shape[0]
    if layer.kind == "dense":
        first, second = u, vt
    else:
        X, Y, C, N = layer.kernel_shape
        if scheme == "zhang":
            first = u.reshape(X, Y, C, R)
            second = vt.reshape(1, 1, R, N)
        else:
            first = u.reshape(C, X, R).transpose(1, 0, 2)[:, None, :, :]  # (X, 1, C, R)
            second = vt.T.reshape(Y, N, R).transpose(0, 2, 1)[None]  # (1, Y, R, N)
    return Factors(layer.kind, scheme, jnp.asarray(first, dt), jnp.asarray(second, dt),
                   jnp.asarray(s, dt), layer.strides, layer.pads)


def factorize_sliced(kernel: np.ndarray, layer: TracedLayer, k: int) -> Factors:
    """ALDS's sliced SVD (scheme ``"alds:k"``, see the module docstring) of a conv kernel.

    first (X, Y, C/k, k·R) is the grouped conv's kernel (output channel s·R + j is
    U_s[:, j]·σ_{s,j}/σ̄_j), second (1, 1, k·R, N) stacks the V_sᵀ, sigma is σ̄ (R,).
    At m = 1 the layer is W exactly.
    """
    check_slices(layer, k, "scheme")
    w = np.asarray(kernel, dtype=np.float64)
    X, Y, C, N = w.shape
    c = C // k
    R = min(X * Y * c, N)
    first = np.zeros((X, Y, c, k * R))
    second = np.zeros((1, 1, k * R, N))
    sig = np.zeros((k, R))
    for s in range(k):
        u, sv, vt = np.linalg.svd(w[:, :, s * c:(s + 1) * c, :].reshape(X * Y * c, N), full_matrices=False)
        sig[s] = sv
        first[..., s * R:(s + 1) * R] = u.reshape(X, Y, c, R)
        second[0, 0, s * R:(s + 1) * R, :] = vt
    bar = np.sqrt(np.sum(sig**2, axis=0))
    ratio = np.divide(sig, bar, out=np.zeros_like(sig), where=bar > 0)  # (k, R)
    first = first * ratio.reshape(-1)
    dt = np.asarray(kernel).dtype
    return Factors("conv", sliced_scheme(k), jnp.asarray(first.astype(dt)), jnp.asarray(second.astype(dt)),
                   jnp.asarray(bar.astype(dt)), layer.strides, layer.pads)


def slice_spectra(f: Factors) -> np.ndarray:
    """(k, R): each slice's singular values σ_{s,j} of sliced factors (σ̄_j times the first
    kernel's column norms, which are σ_{s,j}/σ̄_j; the U_s columns are unit vectors)."""
    k = slice_count(f.scheme)
    first = np.asarray(f.first, dtype=np.float64)
    norms = np.sqrt(np.sum(first.reshape(-1, first.shape[-1]) ** 2, axis=0)).reshape(k, -1)
    return norms * np.abs(np.asarray(f.sigma, dtype=np.float64))


def slice_info(factors: Mapping[str, Factors]) -> dict[str, tuple[np.ndarray, float]]:
    """name -> (per-slice spectra (k, R), ||W||_2 of the whole layer) for the sliced factors.

    ||W||_2 is the operator norm of the unsliced kernel folded as (X·Y·C) x N (ALDS's
    normalization), recomputed from the full-rank factors.
    """
    out = {}
    for name, f in factors.items():
        if f.kind != "conv" or not slice_count(f.scheme):
            continue
        k = slice_count(f.scheme)
        first = np.asarray(f.first, dtype=np.float64)
        second = np.asarray(f.second, dtype=np.float64)[0, 0]
        X, Y, c, kR = first.shape
        R = kR // k
        scale = np.tile(np.asarray(f.sigma, dtype=np.float64), k)
        blocks = [first[..., s * R:(s + 1) * R].reshape(X * Y * c, R)
                  @ (scale[s * R:(s + 1) * R, None] * second[s * R:(s + 1) * R]) for s in range(k)]
        # rows ordered (x, y, c) within a slice; the operator norm ignores the row order
        out[name] = (slice_spectra(f), float(np.linalg.norm(np.concatenate(blocks, axis=0), 2)))
    return out


def truncate(f: Factors, mask: np.ndarray) -> Factors:
    """Keep the triplets where ``mask`` is nonzero, singular values σ·mask folded in.

    The singular value is split as sqrt into both kernels so fine-tuning starts
    from balanced factors.
    """
    if f.kind == "conv" and slice_count(f.scheme):
        return _truncate_sliced(f, mask)
    mask = np.asarray(mask, dtype=np.float64)
    keep = np.nonzero(mask)[0]
    s = np.asarray(f.sigma, dtype=np.float64)[keep] * mask[keep]
    root = np.sqrt(np.abs(s))
    sign = np.sign(s)
    first = np.asarray(f.first)[..., keep] * root
    second = np.take(np.asarray(f.second), keep, axis=-2) * (root * sign)[:, None]
    dt = np.asarray(f.first).dtype
    # cast on the host: jnp.asarray(x, dt) would compile a conversion per shape (issue 19)
    return Factors(f.kind, f.scheme, jnp.asarray(first.astype(dt)), jnp.asarray(second.astype(dt)),
                   jnp.asarray(s.astype(dt)), f.strides, f.pads)


def _truncate_sliced(f: Factors, mask: np.ndarray) -> Factors:
    """:func:`truncate` of sliced factors: index j kept in every slice, each slice's own
    σ_{s,j}·mask_j split as sqrt into its two kernels."""
    mask = np.asarray(mask, dtype=np.float64)
    k = slice_count(f.scheme)
    keep = np.nonzero(mask)[0]
    first = np.asarray(f.first, dtype=np.float64)
    second = np.asarray(f.second, dtype=np.float64)
    ratio = np.sqrt(np.sum(first.reshape(-1, first.shape[-1]) ** 2, axis=0))  # σ_{s,j}/σ̄_j, slice-major
    cols = (np.arange(k)[:, None] * (first.shape[-1] // k) + keep[None, :]).reshape(-1)
    unit = np.divide(first[..., cols], ratio[cols], out=np.zeros_like(first[..., cols]), where=ratio[cols] > 0)
    val = ratio[cols] * np.tile(np.abs(np.asarray(f.sigma, np.float64)[keep]) * mask[keep], k)
    root = np.sqrt(np.abs(val))
    dt = np.asarray(f.first).dtype
    s_kept = np.asarray(f.sigma, dtype=np.float64)[keep] * mask[keep]
    return Factors(f.kind, f.scheme, jnp.asarray((unit * root).astype(dt)),
                   jnp.asarray((second[..., cols, :] * (root * np.sign(val))[:, None]).astype(dt)),
                   jnp.asarray(s_kept.astype(dt)), f.strides, f.pads)


def _conv(x, kernel, strides, pads, precision=None, groups=1):
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN, precision=precision,
                                    feature_group_count=groups)


def apply_factors(f: Factors, x: jnp.ndarray, scale: jnp.ndarray | None, precision: Any = None) -> jnp.ndarray:
    """second(scale ⊙ first(x)); ``precision`` as the original layer's (``lax.Precision``)."""
    if f.kind == "dense":
        h = jnp.matmul(x, f.first, precision=precision)
        if scale is not None:
            h = h * scale
        return jnp.matmul(h, f.second, precision=precision)
    (sh, sw), ((ph0, ph1), (pw0, pw1)) = f.strides, f.pads
    k = slice_count(f.scheme)
    if k:  # grouped conv (k groups), each slice's channels scaled by the same m ⊙ σ̄
        h = _conv(x, f.first, (sh, sw), ((ph0, ph1), (pw0, pw1)), precision, groups=k)
        if scale is not None:
            h = h * jnp.tile(scale, k)
        return _conv(h, f.second, (1, 1), ((0, 0), (0, 0)), precision)
    if f.scheme == "zhang":
        h = _conv(x, f.first, (sh, sw), ((ph0, ph1), (pw0, pw1)), precision)
        if scale is not None:
            h = h * scale
        return _conv(h, f.second, (1, 1), ((0, 0), (0, 0)), precision)
    h = _conv(x, f.first, (sh, 1), ((ph0, ph1), (0, 0)), precision)
    if scale is not None:
        h = h * scale
    return _conv(h, f.second, (1, sw), ((0, 0), (pw0, pw1)), precision)


def _factored_layer(mod: nn.Dense | nn.Conv, f: Factors, x: jnp.ndarray, scale: jnp.ndarray | None) -> jnp.ndarray:
    """The factored form of ``mod``'s call, with ``mod``'s own ``dtype`` and ``precision``.

    As ``nn.Dense`` / ``nn.Conv`` do: input, kernels and bias are promoted to ``mod.dtype``
    (or their common type when it is None) and every contraction runs at ``mod.precision``.
    """
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    x, first, second, bias = promote_dtype(x, f.first, f.second, bias, dtype=mod.dtype)
    f = dataclasses.replace(f, first=first, second=second)
    if f.kind == "conv":
        f = dataclasses.replace(f, pads=call_pads(mod, f, x))
    y = apply_factors(f, x, scale, mod.precision)
    return y if bias is None else y + bias


def call_pads(mod: nn.Conv, f: Factors, x: jnp.ndarray) -> tuple[tuple[int, int], ...]:
    """The layer's explicit padding for this call's input (a shared layer may see several sizes)."""
    kx = int(f.first.shape[0])
    ky = int(f.first.shape[1]) if f.scheme == "zhang" or slice_count(f.scheme) else int(f.second.shape[1])
    pads = explicit_pads(mod, tuple(x.shape[1:3]), (kx, ky), tuple(f.strides))
    return pads if pads is not None else f.pads


def factored_apply(
    model: nn.Module,
    variables: Any,
    factors: Mapping[str, Factors],
    x: jnp.ndarray,
    scales: Mapping[str, jnp.ndarray] | None = None,
    **apply_kwargs: Any,
) -> Any:
    """Run ``model`` with each layer in ``factors`` computed in factored form.

    Args:
      model, variables: the original Flax model and its variables, every
        collection (the decomposed layers' kernels are not read; their biases are).
      factors: layer name -> :class:`Factors`.
      x: a batch of inputs.
      scales: layer name -> the R-vector m ⊙ σ multiplying the intermediate
        channels (the relaxed masked network). Omit for truncated factors whose
        singular values are already folded in.
      **apply_kwargs: passed to ``model.apply`` (``train=False``, ``mutable=[...]``,
        ``rngs={...}``); the return value is ``model.apply``'s (a pair when mutable).
    """
    scales = scales or {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        name = layer_key(mod.path)
        f = factors.get(name)
        if f is None:
            return next_fun(*args, **kwargs)
        return _factored_layer(mod, f, jnp.asarray(args[0]), scales.get(name))

    with nn.intercept_methods(interceptor):
        return model.apply(variables, x, **apply_kwargs)


def masked_scales(factors: Mapping[str, Factors], masks: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """m ⊙ σ for every layer in ``masks``."""
    return {name: masks[name] * factors[name].sigma for name in masks}


__all__.append("masked_scales")


def apply_fn_for(model: nn.Module, factors: Mapping[str, Factors], **bound_kwargs: Any) -> Callable:
    """``apply_fn(variables, x, **kwargs)`` for a factored network whose factors live in the tree.

    The variables are ``{"params": base params, "factors": {name: {first, second}},
    <every other collection>}`` so one optimizer trains factors and the rest
    together while ``batch_stats`` and other state collections ride along.
    ``bound_kwargs`` (e.g. ``train=False``) and the call's own keyword arguments
    go to ``model.apply``.

    The function is a value (:class:`FactoredApply`): two of equal models, layer
    layouts (kind, scheme, strides, padding; not the weights or ranks) and bound
    arguments compare and hash equal, so jitted code keyed on it (evaluation,
    :func:`coblax.nn.train.fit`'s step) is compiled once for all of them per shape.
    """
    meta = tuple((n, dataclasses.replace(f, first=None, second=None, sigma=None)) for n, f in factors.items())
    return FactoredApply(model, meta, tuple(bound_kwargs.items()))


@dataclasses.dataclass(frozen=True)
class FactoredApply:
    """The apply function of a factored network (see :func:`apply_fn_for`)."""

    model: nn.Module
    meta: tuple[tuple[str, Factors], ...]
    bound: tuple[tuple[str, Any], ...] = ()

    def __call__(self, variables, x, **kwargs):
        fs = {
            n: dataclasses.replace(m, first=variables["factors"][n]["first"],
                                   second=variables["factors"][n]["second"])
            for n, m in self.meta
        }
        rest = {k: v for k, v in variables.items() if k != "factors"}
        return factored_apply(self.model, rest, fs, x, **(dict(self.bound) | kwargs))


__all__.append("apply_fn_for")


# -- data-aware ("whitened") spectrum ---------------------------------------------------


def _first_inputs(layer: TracedLayer, scheme: str, x: jnp.ndarray) -> jnp.ndarray:
    """The rows the first factor multiplies: (positions, rows of the matricized kernel).

    dense: the input vectors; conv ``zhang``: the X x Y x C patches at every output
    position; conv ``tai``: the vertical X x 1 x C patches at every output row and
    every input column. Patches are taken by the first factor's own convolution with
    an identity "U", so their coordinates are ordered exactly as the kernel's rows.
    """
    if layer.kind == "dense":
        return x.reshape(-1, x.shape[-1])
    X, Y, C, N = layer.kernel_shape
    rows = X * Y * C if scheme == "zhang" else C * X
    eye = np.eye(rows)
    ident = arrange(eye, np.ones(rows), np.zeros((rows, Y * N if scheme == "tai" else N)), layer, scheme,
                     np.asarray(x).dtype)
    (sh, sw), ((ph0, ph1), (pw0, pw1)) = layer.strides, layer.pads
    if scheme == "zhang":
        patches = _conv(x, ident.first, (sh, sw), ((ph0, ph1), (pw0, pw1)))
    else:
        patches = _conv(x, ident.first, (sh, 1), ((ph0, ph1), (0, 0)))
    return patches.reshape(-1, rows)


def input_grams(
    model: nn.Module,
    params: Any,
    layers: Iterable[TracedLayer],
    x: np.ndarray,
    scheme: str,
    batch_size: int = 250,
) -> dict[str, np.ndarray]:
    """Per layer, G = PᵀP over the rows P its first factor sees on the data ``x``.

    The original network is run on ``x`` in batches; each selected layer's input is
    turned into its first factor's input rows (:func:`_first_inputs`) and their Gram
    matrix accumulated in float64.
    """
    wanted = {l.name: l for l in layers}
    grams: dict[str, np.ndarray] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.Conv)):
            name = layer_key(mod.path)
            if name in wanted:
                rows = np.asarray(_first_inputs(wanted[name], scheme, jnp.asarray(args[0])), np.float64)
                g = rows.T @ rows
                grams[name] = grams[name] + g if name in grams else g
        return next_fun(*args, **kwargs)

    for start in range(0, len(x), batch_size):
        with nn.intercept_methods(interceptor):
            model.apply(params, jnp.asarray(x[start:start + batch_size]))
    missing = set(wanted) - set(grams)
    if missing:
        raise ValueError(f"layers {sorted(missing)} were not called on the data")
    return grams


def factorize_whitened(
    kernel: np.ndarray, layer: TracedLayer, scheme: str, gram: np.ndarray, eps: float = 1e-6
) -> Factors:
    """SVD of the kernel in the metric of its inputs (data-aware spectrum).

    With G = PᵀP + ε·mean(diag G)·I = L Lᵀ (Cholesky) over the rows P the first
    factor sees, ‖P(W − W')‖_F = ‖Lᵀ(W − W')‖_F, so the truncation that is best for
    the layer's response on the data is the SVD of Lᵀ W = U S Vᵀ (Zhang et al.,
    TPAMI 2016; activation-aware SVD). The factors are first = L⁻ᵀ U, σ = S,
    second = Vᵀ: W = L⁻ᵀ U S Vᵀ exactly at m = 1, the same shapes (hence costs) as
    :func:`factorize`, and σ ranks triplets by their effect on the response.

    Args:
      gram: PᵀP from :func:`input_grams` (rows of the matricized kernel square).
      eps: relative ridge that keeps G positive definite (dead inputs).
    """
    if slice_count(scheme) and layer.kind == "conv":
        raise ValueError(f"layer {layer.name}: the whitened spectrum is not built for the sliced scheme {scheme!r}")
    if scheme not in SCHEMES and not (slice_count(scheme) and layer.kind == "dense"):
        raise ValueError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    mat = matricize(np.asarray(kernel, dtype=np.float64), layer.kind, scheme)
    g = np.asarray(gram, np.float64)
    if g.shape != (mat.shape[0], mat.shape[0]):
        raise ValueError(f"layer {layer.name}: Gram matrix {g.shape} does not match the kernel's rows {mat.shape[0]}")
    ridge = eps * max(float(np.mean(np.diag(g))), 1e-12)
    chol = np.linalg.cholesky(g + ridge * np.eye(g.shape[0]))
    u, s, vt = np.linalg.svd(chol.T @ mat, full_matrices=False)
    first = np.linalg.solve(chol.T, u)
    return arrange(first, s, vt, layer, scheme, np.asarray(kernel).dtype)
