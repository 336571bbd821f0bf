"""Training access to the network for allocators that train it (LC rank selection).

An :class:`~coblax.lowrank.allocation.AllocationProblem` carries the decomposable
layers' spectra and costs; an allocator that alternates training with compression
(the learning-compression algorithm, ``baselines/lc.py``) also needs the network, its
weights and training data. :class:`NetworkTrainer` is that access, attached to the
problem's optional ``training`` field by :func:`attach_trainer` (the runner and
:func:`coblax.allocate` do so for every method; building it costs nothing until
an allocator calls it). It exposes the decomposable kernels as the matrices whose
singular values the problem holds (the problem's scheme) and runs SGD steps on

    L(w) + mu/2 * sum_i || w_i - t_i ||^2

(the L step of an augmented-Lagrangian method with targets t_i = Delta(Theta_i) +
lambda_i / mu) from a given state of the variables. One step function is compiled
per trainer; mu and the learning rate are arguments, so neither recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coblax.lowrank.decompose import matricize
from coblax.util.errors import NumericalError

__all__ = ["NetworkTrainer", "TrainedVariables", "attach_trainer", "set_kernel", "unmatricize"]


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedVariables:
    """The network's variables as an allocator that trains it in original form left them
    (LC's L steps), decomposable kernels included: the factored network starts from the
    SVD of these kernels (:func:`coblax.lowrank.joint.trained_start`), not the original's.
    """

    variables: Any


def unmatricize(matrix: np.ndarray, kind: str, scheme: str, kernel_shape: Sequence[int]) -> np.ndarray:
    """Inverse of the matricization: the kernel whose matrix (``kind``, ``scheme``) is ``matrix``."""
    if kind == "dense":
        return np.asarray(matrix).reshape(kernel_shape)
    X, Y, C, N = kernel_shape
    if scheme == "zhang":
        return np.asarray(matrix).reshape(X, Y, C, N)
    return np.asarray(matrix).reshape(C, X, Y, N).transpose(1, 2, 0, 3)


def _get(tree: Any, name: str) -> Any:
    for part in name.split("/"):
        tree = tree[part]
    return tree["kernel"]


def set_kernel(tree: Mapping[str, Any], name: str, value: Any) -> dict:
    """``tree`` (a params tree) with layer ``name``'s (``"a/b"``: nested) kernel replaced by ``value``."""
    parts = name.split("/")

    def put(node, i):
        node = dict(node)
        if i == len(parts):
            node["kernel"] = value
            return node
        node[parts[i]] = put(node[parts[i]], i + 1)
        return node

    return put(tree, 0)


class NetworkTrainer:
    """Penalized SGD on a network's weights, for learning-compression allocators.

    Args:
      model, variables: the original network (every collection).
      layers: layer name -> (kind, scheme) of each decomposable layer, in problem order.
      data: (x, y) training examples.
      train_kwargs: ``model.apply`` keyword arguments of training mode (``{"train": True}``).
      mutable: state collections updated in training (``("batch_stats",)``).
      rng_streams: RNG streams drawn in training (``("dropout",)``).
      batch_size: examples per SGD step.
      seed: batch order and RNG keys.
    """

    def __init__(
        self,
        model: Any,
        variables: Mapping[str, Any],
        layers: Mapping[str, tuple[str, str]],
        data: tuple[np.ndarray, np.ndarray],
        *,
        train_kwargs: Mapping[str, Any] | None = None,
        mutable: Sequence[str] = (),
        rng_streams: Sequence[str] = (),
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.variables = dict(variables)
        self.layers = dict(layers)
        self.names = tuple(self.layers)
        self.x, self.y = np.asarray(data[0]), np.asarray(data[1])
        self.train_kwargs = dict(train_kwargs or {})
        self.mutable = tuple(mutable)
        self.rng_streams = tuple(rng_streams)
        self.batch_size = int(min(batch_size, len(self.x)))
        self.seed = int(seed)
        self.steps_done = 0
        self._step = None

    # -- weights as the problem's matrices --------------------------------------

    def kernel_shape(self, name: str) -> tuple[int, ...]:
        return tuple(_get(self.variables["params"], name).shape)

    def matrices(self, variables: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Each decomposable kernel matricized as in the problem (float64)."""
        params = (variables or self.variables)["params"]
        return {
            n: matricize(np.asarray(_get(params, n), np.float64), *self.layers[n]) for n in self.names
        }

    def to_kernels(self, matrices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: unmatricize(matrices[n], *self.layers[n], self.kernel_shape(n)) for n in matrices}

    # -- the L step ---------------------------------------------------------------

    def _compile(self):
        names, state_names, streams = self.names, self.mutable, self.rng_streams
        model, train_kwargs = self.model, self.train_kwargs
        tx = optax.trace(decay=0.9, nesterov=True)

        def loss_fn(params, state, xb, yb, key, targets, mu):
            kwargs: dict[str, Any] = dict(train_kwargs)
            if streams:
                kwargs["rngs"] = {s: jax.random.fold_in(key, i) for i, s in enumerate(streams)}
            variables = {"params": params, **state}
            if state_names:
                logits, updated = model.apply(variables, xb, mutable=list(state_names), **kwargs)
                new_state = {k: updated.get(k, state[k]) for k in state_names}
            else:
                logits, new_state = model.apply(variables, xb, **kwargs), state
            ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))
            penalty = sum(jnp.sum((_get(params, n) - targets[n]) ** 2) for n in names)
            return ce + 0.5 * mu * penalty, (ce, new_state)

        @jax.jit
        def step(params, state, opt_state, xb, yb, key, targets, mu, lr):
            (_, (ce, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state, xb, yb, key, targets, mu)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
            return params, state, opt_state, ce

        return tx, step

    def penalized_steps(
        self,
        variables: Mapping[str, Any],
        targets: Mapping[str, np.ndarray],
        mu: float,
        steps: int,
        learning_rate: float,
    ) -> tuple[dict, float]:
        """``steps`` steps of SGD (Nesterov momentum 0.9, fresh each call) on the penalized loss.

        Args:
          variables: the state to start from (every collection).
          targets: layer name -> target kernel t_i (kernel shape).
          mu: penalty weight.
          learning_rate: SGD step size for this call.
        Returns:
          (variables after the steps, mean cross-entropy over the steps).
        Raises:
          NumericalError: a non-finite loss.
        """
        if self._step is None:
            self._step = self._compile()
        tx, step = self._step
        params = variables["params"]
        state = {k: variables[k] for k in self.mutable}
        opt_state = tx.init(params)
        dt = jax.tree.leaves(params)[0].dtype
        tgt = {n: jnp.asarray(targets[n], dt) for n in self.names}
        rng = np.random.default_rng([self.seed, self.steps_done])
        key0 = jax.random.PRNGKey(self.seed)
        losses = []
        n = len(self.x)
        order = rng.permutation(n)
        pos = 0
        for i in range(int(steps)):
            if pos + self.batch_size > n:
                order, pos = rng.permutation(n), 0
            idx = order[pos:pos + self.batch_size]
            pos += self.batch_size
            key = jax.random.fold_in(key0, self.steps_done + i)
            params, state, opt_state, ce = step(params, state, opt_state, self.x[idx], self.y[idx], key, tgt,
                                                jnp.asarray(mu, dt), jnp.asarray(learning_rate, dt))
            losses.append(ce)
        self.steps_done += int(steps)
        values = np.asarray(jax.device_get(losses), np.float64)
        if values.size and not np.all(np.isfinite(values)):
            k = int(np.flatnonzero(~np.isfinite(values))[0])
            raise NumericalError("lc L step", self.steps_done - int(steps) + k + 1, float(values[k]),
                                 "lower the learning rate (method_options.lc.lr)")
        return {**dict(variables), "params": params, **state}, float(values.mean()) if values.size else float("nan")


def attach_trainer(problem: Any, model: Any, variables: Mapping[str, Any], schemes: Mapping[str, tuple[str, str]],
                   data: tuple[np.ndarray, np.ndarray], *, seed: int = 0) -> Any:
    """``problem`` with a :class:`NetworkTrainer` in its ``training`` field.

    Training mode is found as for fine-tuning (:func:`coblax.nn.models.training_options`:
    ``train=True`` when the model takes it, every collection but ``params`` mutable).
    """
    from coblax.nn.models import training_options

    train_kw, fit_kw = training_options(model, variables)
    trainer = NetworkTrainer(model, variables, {n: schemes[n] for n in problem.names}, data,
                             train_kwargs=train_kw, mutable=fit_kw.get("mutable", ()),
                             rng_streams=fit_kw.get("rng_streams", ()), seed=seed)
    return dataclasses.replace(problem, training=trainer)
