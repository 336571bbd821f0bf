"""Fine-tuning-aware COBLA: the masks and the factors trained together (``cobla.joint = S``).

COBLA's relaxed solve minimizes E(m) with the network's weights fixed at the
original's SVD. Fine-tuning then moves the weights, which changes which ranks were
worth keeping; LC rank selection (Idelbayev & Carreira-Perpiñán, CVPR 2020) keeps its
accuracy by choosing ranks while the weights adapt. ``joint = S`` does that after
the relaxed solve: S steps of Adam on the training loss over, jointly,

* the masks m of the layers the solve left free,
* every decomposed layer's factors A_i = U_i √Σ_i and B_i = √Σ_i V_iᵀ, the layer
  computing y = B_i (m_i ⊙ A_i x) (at the start exactly the relaxed masked network);
  each triplet's columns are weight-normalized to their initial norms (√σ_ij on the weight SVD), so that
  a factor cannot grow to undo a mask the projection shrank: the trained factors
  give directions, the triplet's magnitude stays σ_ij·m_ij,
* every other parameter of the network (biases, BatchNorm scales...),

on minibatches of the training data in training mode (BatchNorm on batch statistics
with its running statistics updated, dropout on), the loss the mean cross-entropy.
After every step the masks are projected back onto the budget polytope

    Ω = {0 ≤ m ≤ 1,  a_kᵀ m ≤ b_k}   (MACs, parameters and, if set, latency),

with the solver's own dual projection (:func:`coblax.lowrank.projection.project_budget`),
so every iterate is feasible: projected Adam. Layers the solve saturated (kept in
original form) keep m = 1 and train their exact full-rank factors. The monotone rows
of ``cobla.monotone`` are not imposed here (the rounding does not need them).

The trained factors go back into the SVD layout, σ apart (first = A/√σ,
second = B/√σ: triplets with σ = 0 stay 0, their factors get no gradient), so that
E(m) (:class:`coblax.lowrank.objective.NetworkLoss`, rebound to the trained weights
without recompiling), the rounding (ranked by σ·m), the polish and the truncation
work on them unchanged. The allocation carries them (:class:`TrainedWeights`) and the
factored network, hence the common fine-tuning, starts from them
(:func:`trained_start`).

With ``cobla.joint_hard = H`` COBLA calls :func:`joint_train` twice: S − H steps as
above, then, after the rounding, H steps with no free mask (``idx`` empty, the masks
fixed at the rounded ones), continuing the first call's weights (the returned
problem's trainer holds them). A dropped triplet gets no gradient there, so only the
kept ones and the rest of the network move.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from coblax.lowrank.allocation import Allocation, AllocationProblem, LayerCost
from coblax.lowrank.decompose import Factors, factored_apply, slice_count
from coblax.lowrank.projection import project_budget
from coblax.lowrank.training import TrainedVariables, set_kernel, unmatricize
from coblax.util.errors import NumericalError

__all__ = ["TrainedWeights", "check_joint", "joint_train", "trained_start", "factors_kernel", "rebind_loss",
           "refactorized"]


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedWeights:
    """The weights joint training ends with.

    Attributes:
      variables: the network's variables (every collection): ``params`` trained (the
        decomposed layers' kernels untouched: they were computed in factored form),
        state collections (``batch_stats``) as training mode updated them.
      factors: layer name -> full-rank :class:`Factors` in the SVD layout (σ apart).
    """

    variables: Any
    factors: dict[str, Factors]


def _network_loss(oracle: Any) -> Any:
    """The :class:`~coblax.lowrank.objective.NetworkLoss` inside ``oracle`` (unwrapping ``_loss`` wrappers)."""
    seen = oracle
    while seen is not None:
        if _holds_weights(seen):
            return seen
        seen = getattr(seen, "__dict__", {}).get("_loss")
    raise ValueError("cobla joint needs the network objective of coblax.allocate or the runner (a NetworkLoss); "
                     "this problem's loss has no network weights to train (rank_multiple > 1 and nnx models "
                     "are not supported: set cobla joint = 0)")


def _holds_weights(obj: Any) -> bool:
    # its own attributes, not a wrapper's __getattr__ delegating to the wrapped objective
    own = getattr(obj, "__dict__", {})
    return "_factors" in own and "_params" in own


def _shallow(obj: Any, **changes: Any) -> Any:
    # a copy without calling __getattr__ (wrappers that delegate it would recurse in copy.copy)
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


def rebind_loss(oracle: Any, variables: Any, factors: Mapping[str, Factors]) -> Any:
    """A copy of ``oracle`` whose network runs with ``variables`` and ``factors``.

    The compiled callbacks take the weights as arguments, so equal shapes and dtypes
    reuse them: nothing recompiles. Wrappers (the runner's finite check) are copied
    around the rebound objective; ``oracle`` itself is unchanged (records share it).
    """
    if _holds_weights(oracle):
        return _shallow(oracle, _params=variables, _factors=dict(factors))
    inner = getattr(oracle, "__dict__", {}).get("_loss")
    if inner is None:
        _network_loss(oracle)  # raises the explanatory error
    return _shallow(oracle, _loss=rebind_loss(inner, variables, factors))


def _split_sigma(f: Factors) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(A, B) = (first·√σ, √σ·second): the balanced factors trained."""
    root = jnp.sqrt(jnp.abs(f.sigma))
    return f.first * root, f.second * root[:, None]


def _col_norms(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return jnp.sqrt(jnp.sum(x * x, axis=axes))


def _effective(a: jnp.ndarray, b: jnp.ndarray, norms: tuple[jnp.ndarray, jnp.ndarray] | None
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(A, B) as the layer uses them; with ``norms`` each triplet's columns rescaled to them.

    Weight normalization (Salimans & Kingma 2016) per triplet: the trained factors
    give the directions, the magnitude of triplet j stays what it was at the start,
    so that the masks alone carry what the budget counts (otherwise a factor can grow
    to undo a mask the projection shrank). ``norms`` are the column norms of the
    starting (A, B) (:func:`_start_norms`), so that it is the identity at the start
    in every basis: √σ_j for the weight SVD's orthonormal factors, other norms for
    the whitened basis, whose second factor carries the inverse whitening (rescaling
    to √σ there changed the starting network: ResNet-20 / Fashion-MNIST, its first
    minibatch loss was 107.8 against E = 0.035 at the same masks).
    """
    if norms is None:
        return a, b
    na, nb = _col_norms(a, -1), _col_norms(b, -2)
    sa = jnp.where(na > 0, norms[0] / jnp.where(na > 0, na, 1.0), 0.0)
    sb = jnp.where(nb > 0, norms[1] / jnp.where(nb > 0, nb, 1.0), 0.0)
    return a * sa, b * sb[:, None]


def _start_norms(split: Mapping[str, tuple[jnp.ndarray, jnp.ndarray]], normalize: bool
                 ) -> dict[str, tuple[jnp.ndarray, jnp.ndarray] | None]:
    """Layer -> the column norms of its starting (A, B) that :func:`_effective` keeps, or None (no normalization)."""
    return {n: (_col_norms(a, -1), _col_norms(b, -2)) if normalize else None for n, (a, b) in split.items()}


def _join_sigma(f: Factors, a: jnp.ndarray, b: jnp.ndarray) -> Factors:
    """The SVD layout of trained (A, B): first = A/√σ, second = B/√σ (0 where σ = 0)."""
    root = np.sqrt(np.abs(np.asarray(f.sigma, np.float64)))
    inv = np.where(root > 0, 1.0 / np.where(root > 0, root, 1.0), 0.0)
    dt = np.asarray(f.first).dtype
    first = (np.asarray(a, np.float64) * inv).astype(dt)
    second = (np.asarray(b, np.float64) * inv[:, None]).astype(dt)
    return dataclasses.replace(f, first=jnp.asarray(first), second=jnp.asarray(second))


def factors_kernel(f: Factors, mask: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """The kernel the factored layer computes with the triplets scaled by σ ⊙ mask.

    W = U diag(σ ⊙ mask) Vᵀ in the matricized layout of the scheme, folded back into
    the kernel's shape (:func:`coblax.lowrank.training.unmatricize`); at mask = 1 and
    the SVD's factors it is the original kernel (tested).
    """
    s = np.asarray(f.sigma, np.float64) * np.asarray(mask, np.float64)
    first, second = np.asarray(f.first, np.float64), np.asarray(f.second, np.float64)
    R = s.shape[0]
    if f.kind == "dense":
        u, vt = first, second
    elif f.scheme == "zhang":
        u, vt = first.reshape(-1, R), second.reshape(R, -1)
    else:  # tai: first (X, 1, C, R) from U (C·X, R); second (1, Y, R, N) from Vᵀ (R, Y·N)
        u = first[:, 0].transpose(1, 0, 2).reshape(-1, R)
        vt = second[0].transpose(0, 2, 1).reshape(-1, R).T
    return unmatricize((u * s) @ vt, f.kind, f.scheme, kernel_shape)


def refactorized(variables: Mapping[str, Any], name: str, like: Factors) -> Factors:
    """Full factors of layer ``name``'s kernel in ``variables``, in the layout (scheme,
    strides, padding) of ``like``."""
    from coblax.lowrank.decompose import factorize, get_kernel, layer_like

    kernel = np.asarray(get_kernel(variables, name))
    return factorize(kernel, layer_like(like, kernel.shape, name), like.scheme)


def trained_start(allocation: Allocation, full: Mapping[str, Factors], variables: Mapping[str, Any],
                  layers: Iterable[LayerCost]) -> tuple[Mapping[str, Factors], Mapping[str, Any]]:
    """(full factors, variables) the factored network of ``allocation`` starts from.

    Without trained weights: ``full`` and ``variables`` themselves. With them (joint
    training): the trained factors, and the trained variables with the kernel of
    every layer the allocation keeps in original form rebuilt from its trained
    factors at the allocation's mask (:func:`factors_kernel`), so the network that is
    fine-tuned is the one the rounding scored. With variables trained in original form
    (:class:`~coblax.lowrank.training.TrainedVariables`, LC): those variables, and each
    layer's factors recomputed from its trained kernel in the layout of ``full``.
    """
    weights = getattr(allocation, "weights", None)
    if isinstance(weights, TrainedVariables):
        return {n: refactorized(weights.variables, n, f) for n, f in full.items()}, dict(weights.variables)
    if not isinstance(weights, TrainedWeights):
        return full, variables
    out = dict(weights.variables)
    params = out["params"]
    masks = allocation.masks or {}
    for layer in layers:
        if layer.name not in weights.factors or not layer.is_original(int(allocation.ranks[layer.name])):
            continue
        old = params
        for part in layer.name.split("/"):
            old = old[part]
        mask = masks.get(layer.name)
        mask = np.ones(layer.full_rank) if mask is None else mask
        kernel = factors_kernel(weights.factors[layer.name], mask, tuple(np.shape(old["kernel"])))
        params = set_kernel(params, layer.name, jnp.asarray(kernel.astype(np.asarray(old["kernel"]).dtype)))
    out["params"] = params
    return dict(weights.factors), out


def _step_fn(model: Any, meta: Mapping[str, Factors], splits: list[int], train_kwargs: Mapping[str, Any],
             state_names: tuple[str, ...], streams: tuple[str, ...], tx: optax.GradientTransformation,
             norms: Mapping[str, tuple[jnp.ndarray, jnp.ndarray] | None]):
    """The jitted joint step: (trainable, state, opt_state, m_base, idx, x, y, key) -> updated, loss."""
    names = list(meta)

    def loss_fn(tr, state, m_base, idx, xb, yb, key):
        m = m_base.at[idx].set(tr["m"])
        scales = dict(zip(names, jnp.split(m, splits)))
        fs = {}
        for n in names:
            a, b = _effective(tr["first"][n], tr["second"][n], norms[n])
            fs[n] = dataclasses.replace(meta[n], first=a, second=b)
        kwargs: dict[str, Any] = dict(train_kwargs)
        if streams:
            kwargs["rngs"] = {s: jax.random.fold_in(key, i) for i, s in enumerate(streams)}
        variables = {"params": tr["params"], **state}
        if state_names:
            logits, updated = factored_apply(model, variables, fs, xb, scales, mutable=list(state_names), **kwargs)
            new_state = {k: updated.get(k, state[k]) for k in state_names}
        else:
            logits, new_state = factored_apply(model, variables, fs, xb, scales, **kwargs), state
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))
        return ce, new_state

    @jax.jit
    def step(tr, state, opt_state, m_base, idx, xb, yb, key):
        (ce, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(tr, state, m_base, idx, xb, yb, key)
        updates, opt_state = tx.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), state, opt_state, ce

    return step


def _violation(m: np.ndarray, A: np.ndarray, b: np.ndarray) -> float:
    """Largest constraint violation of m: rows scaled to |b| = 1, and the box [0, 1]."""
    scale = np.where(np.abs(b) > 0, np.abs(b), 1.0)
    rows = float(np.max((A @ m - b) / scale, initial=0.0))
    box = float(max(np.max(-m, initial=0.0), np.max(m - 1.0, initial=0.0)))
    return max(rows, box, 0.0)


def check_joint(problem: AllocationProblem) -> dict[str, Factors]:
    """The full factors joint training starts from; raises before any work where it cannot run.

    Raises:
      ValueError: no trainer on the problem (nnx models, bare problems), no network
        objective, or grouped masks (``rank_multiple > 1``), each naming ``cobla joint``.
    """
    if problem.training is None:
        raise ValueError("cobla joint needs the network and its training data (problem.training): "
                         "coblax.allocate of a linen model and the runner attach them; for nnx models and "
                         "bare problems set cobla joint = 0")
    full: dict[str, Factors] = dict(_network_loss(problem.loss)._factors)
    if list(full) != list(problem.names):
        raise ValueError(f"cobla joint: the objective's layers {list(full)} are not the problem's {problem.names}")
    if [layer.full_rank for layer in problem.layers] != [int(np.shape(f.sigma)[0]) for f in full.values()]:
        raise ValueError("cobla joint needs one mask per singular triplet: it does not run with "
                         "rank_multiple > 1; set cobla joint = 0")  # the grouped problem's masks
    return full


def _kept_columns(full: Mapping[str, Factors], blocks: list[np.ndarray]) -> dict[str, np.ndarray | None]:
    """Layer -> the triplets with a nonzero mask, or None where the layer trains in full.

    With every mask fixed (``idx`` empty) a dropped triplet adds exactly 0 to its layer
    and gets a zero gradient, so Adam leaves it where it is: training only the kept
    columns is the same computation at the rounded network's cost instead of the
    full-rank factors' (up to the order of float sums). Sliced (``alds:k``) factors and
    layers that keep every triplet or none train in full.
    """
    out: dict[str, np.ndarray | None] = {}
    for (n, f), blk in zip(full.items(), blocks):
        keep = np.nonzero(blk)[0]
        sliced = f.kind == "conv" and slice_count(f.scheme) > 0
        out[n] = None if sliced or keep.size in (0, blk.size) else keep
    return out


def _take(f: Factors, keep: np.ndarray | None) -> Factors:
    """``f`` restricted to the triplets ``keep`` (σ and the balanced split unchanged)."""
    if keep is None:
        return f
    return dataclasses.replace(f, first=jnp.take(f.first, keep, axis=-1), second=jnp.take(f.second, keep, axis=-2),
                               sigma=jnp.take(f.sigma, keep))


def _put(full: jnp.ndarray, part: jnp.ndarray, keep: np.ndarray, axis: int) -> jnp.ndarray:
    """``full`` with the columns ``keep`` along ``axis`` replaced by ``part``."""
    index = [slice(None)] * full.ndim
    index[axis] = keep
    return full.at[tuple(index)].set(part)


def joint_train(problem: AllocationProblem, m: np.ndarray, idx: np.ndarray, A: np.ndarray, b: np.ndarray,
                steps: int, lr: float, mask_lr: float, *, mask_optimizer: str = "adam",
                normalize: bool = True, truncate_fixed: bool = True,
                lr_schedule: Callable[[int], float] | None = None, progress: str | None = None,
                average_last: int = 0,
                ) -> tuple[np.ndarray, AllocationProblem, TrainedWeights, dict]:
    """``steps`` steps of projected Adam on the masks m[idx] and the network's weights.

    Args:
      problem: the allocation problem; its ``loss`` must hold the network objective
        (:class:`~coblax.lowrank.objective.NetworkLoss`, possibly wrapped) and its
        ``training`` the :class:`~coblax.lowrank.training.NetworkTrainer` (the model,
        its variables, training data, batch size and training-mode options).
      m: the relaxed solution (flat, problem order); entries outside ``idx`` stay fixed.
      idx: the free entries (the layers the solve did not saturate).
      A, b: the budget rows over m[idx]: A m[idx] ≤ b (COBLA's relaxed system).
      steps: S, the number of steps.
      lr, mask_lr: Adam's learning rates of the weights and of the masks.
      mask_optimizer: ``"adam"`` or ``"sgd"`` (plain projected gradient) for the masks.
      normalize: weight-normalize each triplet's factors (:func:`_effective`); measured
        on LeNet-5 / Fashion-MNIST at 0.2 (100 steps, same relaxed m, E on the objective
        subset 0.645 before): Adam 1e-3 normalized 0.504 (validation 80.5 -> 83.0 %),
        projected SGD 1.0 normalized 0.509 (82.1 %), Adam 1e-2 0.761 plain / 0.869
        normalized (the masks random-walk: Adam's steps do not shrink with the gradient).
      truncate_fixed: with no free mask (``idx`` empty), train only the kept triplets'
        columns (:func:`_kept_columns`: the same steps at the rounded network's cost;
        ``benchmarks/bench_joint_hard.py`` measures the two).
      lr_schedule: the weights' rate at each of these steps (step 0 first); None: ``lr``
        throughout.
      progress: the label of a progress bar over the steps (None: no bar).
      average_last: A, the weights returned are the mean of the weights after each of
        the last A steps (tail averaging, Polyak-Ruppert / SWA: at a constant rate the
        last step's weights are one noisy point of where the steps wander); the
        effective factors (as the layers use them) and the network's other parameters
        are averaged; the masks and the mutable state (BatchNorm's running statistics)
        are the last step's. 0: the last step's. Only without free masks (``idx``
        empty: the weights of a fixed network).

    Returns:
      (m after training (float64, feasible), ``problem`` with its loss rebound to the
      trained weights and its trainer holding the trained variables, the :class:`TrainedWeights`, stats): ``joint_steps``,
      ``joint_seconds``, ``joint_first_step_seconds`` (it compiles) and
      ``joint_step_seconds`` (mean of the rest), ``joint_objective_before`` / ``_after`` (E(m) on the
      objective subset, original weights at the relaxed m / trained weights at the
      trained m), ``joint_train_loss_first`` / ``_last`` (minibatch loss of the first
      step / mean of the last ten), ``joint_val_loss_before`` / ``_after`` and
      ``joint_val_accuracy_before`` / ``_after`` where the objective reports them,
      ``joint_max_violation`` (largest scaled constraint or box violation of any
      step's m as the network used it, float32), ``joint_violation_trace`` (per step),
      ``joint_projection_converged``, ``joint_mask_change`` (‖m_S − m̂‖_∞) and
      ``joint_averaged_steps`` (how many steps' weights were averaged: ``average_last``).

    Raises:
      ValueError: no network objective or no trainer on the problem, or ``average_last``
        outside [0, steps] or nonzero with free masks.
      NumericalError: a non-finite training loss (names the step).
    """
    start = time.perf_counter()
    full = check_joint(problem)
    trainer = problem.training
    average_last = int(average_last)
    if not 0 <= average_last <= int(steps) or (average_last and np.size(idx)):
        raise ValueError(f"average_last = {average_last}: must be in [0, steps = {int(steps)}], "
                         "and 0 while masks are free")
    dt = jnp.asarray(next(iter(full.values())).sigma).dtype
    sizes = [layer.full_rank for layer in problem.layers]
    splits = np.cumsum(sizes)[:-1].tolist()
    idx = np.asarray(idx, int)
    m64 = np.asarray(m, np.float64).copy()
    m_start = m64.copy()

    blocks = np.split(m64, splits)
    keep = (_kept_columns(full, blocks) if truncate_fixed and idx.size == 0
            else dict.fromkeys(full))  # None: the layer trains in full
    work = {n: _take(f, keep[n]) for n, f in full.items()}  # the factors the steps train
    m_work = np.concatenate([blk if keep[n] is None else blk[keep[n]] for n, blk in zip(full, blocks)])
    work_splits = np.cumsum([np.shape(f.sigma)[0] for f in work.values()])[:-1].tolist()

    split = {n: _split_sigma(f) for n, f in work.items()}
    variables = dict(trainer.variables)
    state = {k: variables[k] for k in trainer.mutable}
    trainable = {"m": jnp.asarray(m64[idx], dt), "first": {n: ab[0] for n, ab in split.items()},
                 "second": {n: ab[1] for n, ab in split.items()}, "params": variables["params"]}

    def labels(tree):
        return {k: jax.tree.map(lambda _, k=k: "mask" if k == "m" else "weights", v) for k, v in tree.items()}

    mask_tx = optax.adam(mask_lr) if mask_optimizer == "adam" else optax.sgd(mask_lr)
    tx = optax.multi_transform({"mask": mask_tx, "weights": optax.adam(lr_schedule or lr)}, labels)
    opt_state = tx.init(trainable)
    norms = _start_norms(split, normalize)
    step = _step_fn(trainer.model, work, work_splits, trainer.train_kwargs, tuple(trainer.mutable),
                    tuple(trainer.rng_streams), tx, norms)

    x, y = trainer.x, trainer.y
    n, bs = len(x), int(trainer.batch_size)
    rng = np.random.default_rng([int(problem.seed), 18])
    key0 = jax.random.PRNGKey(int(problem.seed) + 18)
    order, pos = rng.permutation(n), 0
    m_base, idx_dev = jnp.asarray(m_work, dt), jnp.asarray(idx)  # m_work is m64 unless truncated
    losses: list[float] = []
    violations: list[float] = []
    converged = True
    step_times: list[float] = []
    average, averaged = None, 0  # the running mean of the weights over the last average_last steps
    bar = tqdm(range(int(steps)), desc=progress, unit="step", disable=progress is None, leave=False)
    for k in bar:
        t0 = time.perf_counter()
        if pos + bs > n:
            order, pos = rng.permutation(n), 0
        batch = order[pos:pos + bs]
        pos += bs
        trainable, state, opt_state, ce = step(trainable, state, opt_state, m_base, idx_dev, x[batch], y[batch],
                                               jax.random.fold_in(key0, k))
        ce = float(ce)
        step_times.append(time.perf_counter() - t0)
        if not np.isfinite(ce):
            raise NumericalError("cobla joint", k + 1, ce, "lower cobla.joint_lr / cobla.joint_mask_lr")
        losses.append(ce)
        bar.set_postfix(loss=f"{ce:.4f}", refresh=False)
        if k >= int(steps) - average_last:  # the weights as the network uses them: effective factors
            weights = {"factors": {n: _effective(trainable["first"][n], trainable["second"][n], norms[n])
                                   for n in work},
                       "params": trainable["params"]}
            averaged += 1
            average = weights if average is None else jax.tree.map(
                lambda mean, w, c=averaged: mean + (w - mean) / c, average, weights)
        if idx.size:  # no free mask (cobla.joint_hard): nothing to project
            z, _, ok = project_budget(np.asarray(trainable["m"], np.float64), A, b)
            converged &= ok
            m_dev = jnp.asarray(z.astype(np.asarray(trainable["m"]).dtype))
            trainable = {**trainable, "m": m_dev}
            m64[idx] = z
            violations.append(_violation(np.asarray(m_dev, np.float64), A, b))

    bar.close()
    if average is not None:
        trainable = {**trainable, "params": average["params"]}
    trained = {}
    for n, f in full.items():
        a, b = (average["factors"][n] if average is not None
                else _effective(trainable["first"][n], trainable["second"][n], norms[n]))
        if keep[n] is not None:  # trained on the kept columns: the dropped ones stay where they were
            a0, b0 = _split_sigma(f)
            a, b = _put(a0, a, keep[n], -1), _put(b0, b, keep[n], -2)
        trained[n] = _join_sigma(f, a, b)
    new_vars = {**variables, "params": trainable["params"], **state}
    new_loss = rebind_loss(problem.loss, new_vars, trained)
    stats: dict[str, Any] = {
        "joint_steps": int(steps),
        # the first step compiles; the rest is the steady-state cost of one step
        "joint_first_step_seconds": step_times[0] if step_times else None,
        "joint_step_seconds": float(np.mean(step_times[1:])) if len(step_times) > 1 else None,
        "joint_lr": float(lr),
        # the weights' rate at the first and the last step (they differ under a schedule)
        "joint_lr_first": float(lr_schedule(0)) if lr_schedule and steps else float(lr),
        "joint_lr_last": float(lr_schedule(int(steps) - 1)) if lr_schedule and steps else float(lr),
        "joint_mask_lr": float(mask_lr),
        "joint_objective_before": _value(problem.loss, m_start),
        "joint_objective_after": _value(new_loss, m64),
        "joint_train_loss_first": losses[0] if losses else None,
        "joint_train_loss_last": float(np.mean(losses[-10:])) if losses else None,
        "joint_max_violation": max(violations, default=0.0),
        "joint_violation_trace": violations,
        "joint_projection_converged": bool(converged),
        "joint_mask_change": float(np.max(np.abs(m64 - m_start), initial=0.0)),
        "joint_averaged_steps": averaged,
    }
    if hasattr(problem.loss, "validation_metrics"):
        for label, oracle, point in (("before", problem.loss, m_start), ("after", new_loss, m64)):
            loss, acc = oracle.validation_metrics(point)
            stats[f"joint_val_loss_{label}"], stats[f"joint_val_accuracy_{label}"] = float(loss), float(acc)
    stats["joint_seconds"] = time.perf_counter() - start
    # the trainer carries the trained variables too, so that a later call continues them
    # (cobla.joint_hard: the steps at the rounded masks)
    return (m64, dataclasses.replace(problem, loss=new_loss, training=_shallow(trainer, variables=new_vars)),
            TrainedWeights(variables=new_vars, factors=trained), stats)


def _value(oracle: Any, m: np.ndarray) -> float:
    value = getattr(oracle, "value", None)
    return float(value(m)) if value is not None else float(oracle.value_and_grad(m)[0])
