"""Knowledge distillation: a student trained on a teacher's temperature-softened outputs.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network"
(arXiv:1503.02531), as in the seed's lecture (section 7): the softmax at
temperature T,

    q_i = exp(z_i / T) / Σ_j exp(z_j / T),

softens the teacher's logits v into targets p = softmax(v / T); the student with
logits z is trained on

    L = α · T² · KL(p ‖ softmax(z / T)) + (1 − α) · CE(softmax(z), y).

The soft term's gradient is ∂/∂z_i [KL] = (q_i − p_i) / T, which shrinks as 1/T²
once the logits are zero-mean and T is large (Hinton et al., Sec. 2.1:
∂/∂z_i ≈ (z_i − v_i) / (N T²)); the factor T² keeps the soft term's share of the
gradient the same whatever T is. The seed's example: logits (100, 10, 1) give
(1, 0, 0) at T = 1 and (0.56, 0.23, 0.21) at T = 100.

Training reuses :func:`coblax.nn.train.fit`: the teacher's logits are computed
once and travel with the labels as one ``(N, K + 1)`` target array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coblax.nn.train import cross_entropy, fit, predict

__all__ = ["softmax_t", "distill_loss", "distill_targets", "distill"]


def softmax_t(logits: jnp.ndarray, temperature: float) -> jnp.ndarray:
    """Softmax at temperature T: exp(z_i / T) / Σ_j exp(z_j / T) along the last axis."""
    return jax.nn.softmax(jnp.asarray(logits) / temperature, axis=-1)


def _check(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def distill_loss(
    student_logits: jnp.ndarray,
    teacher_logits: jnp.ndarray,
    labels: jnp.ndarray,
    temperature: float,
    alpha: float,
) -> jnp.ndarray:
    """Mean distillation loss α·T²·KL(p_T(teacher) ‖ p_T(student)) + (1 − α)·CE(student, y).

    Args:
      student_logits, teacher_logits: (N, K) logits z and v.
      labels: (N,) integer labels y.
      temperature: T > 0 of the softened softmax.
      alpha: weight α ∈ [0, 1] of the soft term (α = 0: plain cross-entropy).

    Returns:
      scalar: mean over the batch.

    Reference: Hinton, Vinyals & Dean (2015), Sec. 2.
    """
    _check(temperature, alpha)
    t = temperature
    log_q = jax.nn.log_softmax(student_logits / t, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    soft = jnp.mean(kl)
    hard = cross_entropy(student_logits, labels)
    return alpha * t**2 * soft + (1.0 - alpha) * hard


def distill_targets(teacher_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Teacher logits and labels packed as one float32 (N, K + 1) array (label last)."""
    teacher_logits = np.asarray(teacher_logits, np.float32)
    labels = np.asarray(labels)
    if teacher_logits.ndim != 2 or labels.shape != (len(teacher_logits),):
        raise ValueError(
            f"teacher_logits must be (N, K) and labels (N,), got {teacher_logits.shape} and {labels.shape}"
        )
    return np.concatenate([teacher_logits, labels[:, None].astype(np.float32)], axis=1)


def distill(
    apply_fn: Callable[[Any, jnp.ndarray], jnp.ndarray],
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    teacher_apply: Callable[[Any, jnp.ndarray], jnp.ndarray],
    teacher_params: Any,
    temperature: float,
    alpha: float = 0.9,
    epochs: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    optimizer: str = "adam",
    schedule: str = "constant",
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """Train the student ``params`` on :func:`distill_loss` against a fixed teacher.

    The teacher's logits on ``x`` are computed once (the teacher is frozen) and the
    student is trained with :func:`coblax.nn.train.fit` (same batches, optimizer and
    seeding as a plain run, so "student alone" and "distilled" differ only in the loss).

    Args:
      apply_fn: the student's ``apply_fn(params, x) -> logits``.
      params: the student's initial variables.
      x, y: training inputs and integer labels.
      teacher_apply, teacher_params: the trained teacher.
      temperature, alpha: T and α of :func:`distill_loss`.
      epochs, batch_size, learning_rate, optimizer, schedule, seed, progress: as for ``fit``.

    Returns:
      the trained student variables.
    """
    _check(temperature, alpha)
    teacher_logits = predict(teacher_apply, teacher_params, x)
    targets = distill_targets(teacher_logits, y)

    def loss_fn(logits, packed):
        return distill_loss(logits, packed[:, :-1], packed[:, -1].astype(jnp.int32), temperature, alpha)

    return fit(apply_fn, params, x, targets, epochs=epochs, batch_size=batch_size,
               learning_rate=learning_rate, optimizer=optimizer, schedule=schedule, seed=seed,
               loss_fn=loss_fn,
               desc=f"distill T={temperature:g}", progress=progress)
