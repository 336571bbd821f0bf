"""BatchNorm recalibration ("adaptive BN"): fresh running statistics, no weight changed.

Truncating layers changes the activations every later BatchNorm sees, so the running
statistics stored with the original network are stale: in eval mode the factored
network normalizes with the wrong mean and variance, and its accuracy before
fine-tuning says little about the allocation (Li et al., EagleEye, ECCV 2020, Sec.
3.2, call the fix adaptive batch normalization). :func:`recalibrate_bn` re-estimates
them on N training batches: the network is run with every ``nn.BatchNorm``
normalizing by its batch's own statistics (training-mode behaviour, so every later
layer sees what it would see in training), and each layer's running mean and
variance become the average over the N batches of its batch mean and (biased)
batch variance,

    mu_hat = 1/N sum_b mean_b(x),   var_hat = 1/N sum_b var_b(x),

computed as flax does (float32 at least; E[x^2] - E[x]^2 clipped at 0 with
``use_fast_variance``, else E[(x - mean)^2]). No parameter changes and no dropout
is drawn: the network is called in the eval mode ``apply_fn`` gives, and only the
BatchNorm calls are replaced (through ``flax.linen.intercept_methods``, so any linen
model works unchanged, factored or not). With one batch the result is exactly that
batch's statistics (tested against flax's own update with momentum 0).

Reference: B. Li, B. Wu, J. Su, G. Wang, L. Lin, "EagleEye: fast sub-net evaluation
for efficient neural network pruning", ECCV 2020.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AUTO", "AUTO_BATCHES", "batch_moments", "batch_statistics", "check_batches", "draw_batches",
           "has_batch_stats", "normalize", "override_batch_norm", "recalibrate_bn", "resolve_batches"]

#: ``recalibrate_bn = "auto"``, the default of ``allocate``, ``finetune`` and the runner's
#: ``finetune.recalibrate_bn``: :data:`AUTO_BATCHES` batches where the network has
#: BatchNorm statistics, none elsewhere. Why on by default: truncating layers leaves the
#: stored statistics stale, and every allocator we measured scores near chance with them
#: (ResNet-20 / Fashion-MNIST at 0.3: 19-20 % stale, 57-67 % recalibrated on 40 batches,
#: issue 18), so an allocated network is only usable, and COBLA's batch-statistics masks
#: (``cobla.bn_stats = "auto"``) are only evaluated as they were chosen, once recalibrated.
AUTO = "auto"
#: 20 batches (of the caller's batch size): the issue-18 benchmarks' setting (2,560 images
#: at batch 128; with fewer examples, as many full batches as fit).
AUTO_BATCHES = 20


def check_batches(value: Any, key: str = "recalibrate_bn") -> int:
    """``value`` as a number of batches (an integer >= 0), or a ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise ValueError(f"{key} must be an integer >= 0 (number of training batches), got {value!r}")
    return int(value)


def has_batch_stats(variables: Any, collection: str = "batch_stats") -> bool:
    """Whether ``variables`` hold BatchNorm running statistics (a non-empty ``collection``)."""
    try:
        return bool(variables.get(collection))
    except AttributeError:  # not a mapping (an nnx state or a bare array tree): nothing to recalibrate here
        return False


def resolve_batches(value: Any, variables: Any, key: str = "recalibrate_bn", *,
                    has_statistics: bool | None = None) -> int:
    """``value`` as a number of batches: ``"auto"`` is :data:`AUTO_BATCHES` where ``variables``
    have BatchNorm statistics (or ``has_statistics`` says so: nnx models) and 0 elsewhere;
    anything else as :func:`check_batches` takes it."""
    if isinstance(value, str) and value == AUTO:
        present = has_batch_stats(variables) if has_statistics is None else has_statistics
        return AUTO_BATCHES if present else 0
    if isinstance(value, str):
        raise ValueError(f"{key} must be an integer >= 0 (number of training batches) or {AUTO!r}, got {value!r}")
    return check_batches(value, key)


def _feature_axes(ndim: int, axis: Any) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _compute_dtype(mod: nn.BatchNorm, x: jnp.ndarray) -> Any:
    return jnp.promote_types(jnp.result_type(x) if mod.dtype is None else mod.dtype, jnp.float32)


def batch_moments(mod: nn.BatchNorm, x: jnp.ndarray, weights: jnp.ndarray | None = None
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(batch mean, biased batch variance) of one BatchNorm call's input, as flax trains it.

    With ``weights`` (one per example, axis 0; zero for padding rows) every moment is
    the weighted one, Σ_b w_b Σ_rest x / (Σ_b w_b · |rest|), so that zero-weight
    padding never enters the statistics (weights that do not match axis 0 are ignored).
    """
    features = _feature_axes(x.ndim, mod.axis)
    reduce = tuple(i for i in range(x.ndim) if i not in features)
    shape = [x.shape[i] if i in features else 1 for i in range(x.ndim)]
    xf = x.astype(_compute_dtype(mod, x))
    if weights is None or 0 not in reduce or weights.shape != (x.shape[0],):
        w, denom = None, None
    else:
        w = weights.astype(xf.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
        denom = jnp.sum(w) * np.prod([x.shape[i] for i in reduce if i != 0])

    def average(v):
        return jnp.mean(v, axis=reduce) if w is None else jnp.sum(v * w, axis=reduce) / denom

    mean = average(xf)
    if mod.use_fast_variance:
        var = jnp.maximum(average(xf * xf) - mean * mean, 0.0)
    else:
        var = average((xf - mean.reshape(shape)) ** 2)
    return mean, var


def normalize(mod: nn.BatchNorm, x: jnp.ndarray, mean: jnp.ndarray, var: jnp.ndarray) -> jnp.ndarray:
    """``mod``'s output on ``x`` normalized by (mean, var): (x − μ)/√(var + ε)·scale + bias."""
    features = _feature_axes(x.ndim, mod.axis)
    shape = [x.shape[i] if i in features else 1 for i in range(x.ndim)]
    xf = x.astype(_compute_dtype(mod, x))
    y = (xf - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + mod.epsilon)
    if mod.use_scale:
        y = y * mod.get_variable("params", "scale").reshape(shape)
    if mod.use_bias:
        y = y + mod.get_variable("params", "bias").reshape(shape)
    return y.astype(jnp.result_type(x) if mod.dtype is None else mod.dtype)


def override_batch_norm(moments: Callable[[nn.BatchNorm, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]],
                        found: dict | None = None) -> Any:
    """A context in which every ``nn.BatchNorm`` call normalizes by ``moments(mod, x)``.

    The rest of the network runs as called (eval mode: no dropout drawn); ``found``,
    when given, collects each call's (mean, var) under the module path. With
    :func:`batch_moments` this is training-mode normalization without touching the
    running statistics; with stored moments it is eval mode with other statistics.
    """

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, nn.BatchNorm):
            return next_fun(*args, **kwargs)
        mean, var = moments(mod, args[0])
        if found is not None:
            found.setdefault(tuple(mod.path), []).append((mean, var))
        return normalize(mod, args[0], mean, var)

    return nn.intercept_methods(interceptor)


def _batch_stats_fn(apply_fn: Callable) -> Callable:
    """jit(variables, xb) -> {module path: (mean, var)} with BatchNorm in training-mode normalization."""

    def run(variables, xb):
        found: dict[tuple[str, ...], list] = {}
        with override_batch_norm(batch_moments, found):
            apply_fn(variables, xb)
        # a BatchNorm called several times (shared) averages its calls
        return {k: (sum(m for m, _ in v) / len(v), sum(s for _, s in v) / len(v)) for k, v in found.items()}

    return jax.jit(run)


def draw_batches(n: int, batches: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Index arrays of ``batches`` batches without replacement (as many full ones as fit, at least one)."""
    order = np.random.default_rng(seed).permutation(n)
    size = min(batch_size, n)
    count = max(1, min(batches, n // size))
    return [order[i * size:(i + 1) * size] for i in range(count)]


def batch_statistics(
    apply_fn: Callable, variables: Any, x: np.ndarray, *, batches: int, batch_size: int = 128, seed: int = 0
) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """Module path -> (mean, var) averaged over ``batches`` batches of ``x`` (see the module docstring).

    Batches are drawn without replacement from a permutation seeded by ``seed``;
    with fewer than ``batches * batch_size`` examples, as many full batches as fit
    (at least one, of all of ``x`` when it is smaller than a batch).
    """
    fn = _batch_stats_fn(apply_fn)
    total: dict[tuple[str, ...], list] = {}
    chosen = draw_batches(len(x), batches, batch_size, seed)
    for idx in chosen:
        out = jax.device_get(fn(variables, jnp.asarray(x[idx])))
        for k, (m, v) in out.items():
            acc = total.setdefault(k, [0.0, 0.0])
            acc[0] = acc[0] + np.asarray(m, np.float64)
            acc[1] = acc[1] + np.asarray(v, np.float64)
    return {k: (m / len(chosen), v / len(chosen)) for k, (m, v) in total.items()}


def recalibrate_bn(
    apply_fn: Callable,
    variables: Any,
    x: np.ndarray,
    *,
    batches: int,
    batch_size: int = 128,
    seed: int = 0,
    collection: str = "batch_stats",
) -> Any:
    """``variables`` with every BatchNorm's running mean and variance re-estimated on ``x``.

    Args:
      apply_fn: ``apply_fn(variables, xb)`` in eval mode (e.g. a factored network's
        ``apply_fn_for(...)`` or ``functools.partial(model.apply, train=False)``).
      variables: every collection; only ``collection`` changes.
      x: training inputs.
      batches: N, the number of batches (0 returns ``variables`` unchanged).
      batch_size, seed: batch size and the seed of the batch draw.
    Returns:
      The variables with ``collection[path]["mean"]`` / ``["var"]`` replaced for every
      BatchNorm the network called (dtype kept).
    """
    batches = check_batches(batches, "batches")
    if batches == 0 or collection not in variables:
        return variables
    stats = batch_statistics(apply_fn, variables, x, batches=batches, batch_size=batch_size, seed=seed)

    def put(node: Any, path: tuple[str, ...], mean: np.ndarray, var: np.ndarray) -> Any:
        node = dict(node)
        if not path:
            node["mean"] = jnp.asarray(mean, jnp.asarray(node["mean"]).dtype)
            node["var"] = jnp.asarray(var, jnp.asarray(node["var"]).dtype)
            return node
        node[path[0]] = put(node[path[0]], path[1:], mean, var)
        return node

    tree = variables[collection]
    for path, (mean, var) in stats.items():
        tree = put(tree, path, mean, var)
    return {**dict(variables), collection: tree}
