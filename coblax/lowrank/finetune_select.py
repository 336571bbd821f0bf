"""Fine-tuning-aware selection of COBLA's rounded candidates (``cobla.select = "finetune"``).

Every allocation is fine-tuned afterwards, and the accuracy users keep is the one
after fine-tuning; the candidate that scores best before it need not be best after
it (issue 18: on a BatchNorm ResNet-20, allocations that ranked together before
fine-tuning ended 4 pt apart after one epoch). Here the K best distinct rounded
candidates, ranked by the usual score (validation accuracy, then loss), are each
fine-tuned for S steps and scored again on the validation split:

    pick = argmax_{c in top-K}  acc_val(c after S steps)      (ties: the better score before),

and only that candidate's ranks and masks are returned (then polished, ``cobla.polish``,
as the accuracy pick would be); the common fine-tuning follows as for every method. The first of the K is COBLA's own accuracy pick (after
its local search), so K = 1 returns exactly that pick, with no training.

The S steps reuse the runner's fine-tuning: the candidate's truncated factors in
the shared layout (:func:`~coblax.lowrank.padding.finetune_layout`: one compiled step
for all candidates whenever the padding is cheap), :func:`coblax.nn.train.fit` with
Adam on ``S * batch`` training examples drawn once (the same for every candidate),
training mode as :func:`~coblax.nn.models.training_options` finds it. BatchNorm is then
scored as the objective's ``bn_stats`` says: the statistics trained in the S steps
(``"running"``), each validation batch's own (``"batch"``), or re-estimated on the
objective subset (``"recalibrated"``, :func:`coblax.nn.bn.recalibrate_bn`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from coblax.lowrank.allocation import AllocationProblem

__all__ = ["FINETUNE_BATCH", "check_finetune_select", "finetune_pick", "candidate_tuner"]

#: Examples per fine-tuning step (``coblax.finetune``'s and ``finetune.batch_size``'s default).
FINETUNE_BATCH = 64

#: A tuner: (ranks, masks) of a candidate -> its validation accuracy after the S steps.
Tuner = Callable[[Mapping[str, int], Mapping[str, np.ndarray]], float]


def check_finetune_select(candidates: Any, steps: Any, learning_rate: Any) -> None:
    """ValueError naming the config key of a K or S that is not an integer >= 1 (or a learning rate <= 0)."""
    for key, value in (("cobla.finetune_candidates", candidates), ("cobla.finetune_steps", steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"cobla.finetune_learning_rate must be a number > 0, got {learning_rate!r}")


def _key(problem: AllocationProblem, ranks: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(int(ranks[l.name]) for l in problem.layers)


def finetune_pick(
    problem: AllocationProblem,
    chosen: tuple[Mapping[str, int], Mapping[str, np.ndarray], Sequence[float]],
    scored: Sequence[tuple[Sequence[float], Mapping[str, int], Mapping[str, np.ndarray]]],
    k: int,
    make_tuner: Callable[[], Tuner],
) -> tuple[dict[str, int], dict[str, np.ndarray], dict]:
    """The best of the top-``k`` distinct candidates after fine-tuning (see the module docstring).

    Args:
      chosen: (ranks, masks, score) of the accuracy pick; always the first candidate.
      scored: every other candidate as (score, ranks, masks); lower scores are better
        (the rounding's (−accuracy, loss)). Candidates whose ranks repeat an earlier
        one's are skipped.
      k: K, how many candidates to fine-tune (1: ``chosen``, nothing trained).
      make_tuner: builds the tuner (called only when K > 1 and a second distinct
        candidate exists, so that nothing compiles otherwise).
    Returns:
      (ranks, masks, stats) with stats["candidates"]: each candidate's ranks, score
      before and validation accuracy after the S steps, and stats["chosen"] its index.
    """
    pool = [(tuple(chosen[2]), dict(chosen[0]), dict(chosen[1]))]
    seen = {_key(problem, chosen[0])}
    for score, ranks, masks in sorted(scored, key=lambda t: tuple(t[0])):  # stable: first of equals
        if len(pool) >= k:
            break
        key = _key(problem, ranks)
        if key not in seen:
            seen.add(key)
            pool.append((tuple(score), dict(ranks), dict(masks)))
    stats: dict = {"k": int(k), "candidates": [], "chosen": 0}
    if len(pool) == 1:
        stats["candidates"].append({"ranks": pool[0][1], "score_before": list(pool[0][0]), "accuracy_after": None})
        return pool[0][1], pool[0][2], stats
    tuner = make_tuner()
    after = [float(tuner(ranks, masks)) for _, ranks, masks in pool]
    best = min(range(len(pool)), key=lambda i: (-after[i], pool[i][0], i))
    stats["candidates"] = [{"ranks": r, "score_before": [float(v) for v in s], "accuracy_after": a}
                           for (s, r, _), a in zip(pool, after)]
    stats["chosen"] = int(best)
    return pool[best][1], pool[best][2], stats


@dataclasses.dataclass(frozen=True)
class _BatchStatsApply:
    """Eval-mode apply with every BatchNorm normalized by its batch's own statistics (a hashable value,
    so the evaluation compiles once for all candidates)."""

    inner: Any

    def __call__(self, variables, x, **kwargs):
        from coblax.nn.bn import batch_moments, override_batch_norm

        with override_batch_norm(batch_moments):
            return self.inner(variables, x, **kwargs)


@dataclasses.dataclass
class _NetworkTuner:
    """Fine-tunes a candidate's factored network for ``steps`` steps; returns its validation accuracy."""

    model: Any
    params: Any
    full: Mapping[str, Any]
    layers: Sequence[Any]
    apply_kwargs: Mapping[str, Any]
    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    calibration: np.ndarray
    bn_stats: str
    steps: int
    learning_rate: float
    seed: int

    def __call__(self, ranks: Mapping[str, int], masks: Mapping[str, np.ndarray]) -> float:
        from coblax.lowrank.decompose import truncate
        from coblax.lowrank.padding import finetune_layout
        from coblax.nn import train as T
        from coblax.nn.bn import recalibrate_bn
        from coblax.nn.models import training_options

        kept = {l.name: truncate(self.full[l.name], masks[l.name]) for l in self.layers
                if not l.is_original(int(ranks[l.name]))}
        x, y = self.train
        layout = finetune_layout(kept, self.full, self.params, len(x))
        variables = layout.variables(self.params)
        train_kw, fit_kw = training_options(self.model, variables)
        variables = T.fit(layout.apply_fn(self.model, **train_kw), variables, x, y, epochs=1,
                          batch_size=min(FINETUNE_BATCH, len(x)), learning_rate=self.learning_rate, optimizer="adam",
                          seed=self.seed, desc="cobla select=finetune", progress=False, **fit_kw)
        apply = layout.apply_fn(self.model, **dict(self.apply_kwargs))
        if self.bn_stats == "recalibrated":
            batches = max(1, len(self.calibration) // FINETUNE_BATCH)
            variables = recalibrate_bn(apply, variables, self.calibration, batches=batches,
                                       batch_size=FINETUNE_BATCH, seed=self.seed)
        elif self.bn_stats == "batch":
            apply = _BatchStatsApply(apply)
        return T.evaluate(apply, variables, *self.validation)


def candidate_tuner(problem: AllocationProblem, steps: int, learning_rate: float) -> Tuner:
    """The tuner of ``problem``'s network: its loss oracle gives the model, weights, full factors,
    eval mode and validation split, its training access (``problem.training``) the training data.

    A training access that brings its own ``candidate_tuner(problem, steps, learning_rate)``
    (another framework, a test) is used instead.

    Raises:
      ValueError: the problem has no training data or its oracle is not a linen ``NetworkLoss``.
    """
    training = problem.training
    own = getattr(training, "candidate_tuner", None)
    if own is not None:
        return own(problem, steps, learning_rate)
    loss = problem.loss
    init = getattr(loss, "_init", None)
    if training is None or init is None or not hasattr(training, "x"):
        raise ValueError("cobla select = 'finetune' needs the network and its training data: a linen model's "
                         "NetworkLoss and a problem.training (coblax.allocate and the runner attach both)")
    x, y = np.asarray(training.x), np.asarray(training.y)
    # S batches of training examples, drawn once (the same for every candidate); a set smaller
    # than S batches is passed over several times, so that every candidate takes exactly S steps
    rng = np.random.default_rng([int(training.seed), 18])
    need = int(steps) * min(FINETUNE_BATCH, len(x))
    idx = np.concatenate([rng.permutation(len(x)) for _ in range(-(-need // len(x)))])[:need]
    validation = init["validation_data"] or init["objective_data"]
    return _NetworkTuner(model=init["model"], params=init["params"], full=init["factors"], layers=problem.layers,
                         apply_kwargs=init["apply_kwargs"] or {}, train=(x[idx], y[idx]),
                         validation=tuple(np.asarray(a) for a in validation),
                         calibration=np.asarray(init["objective_data"][0]), bn_stats=loss.bn_stats,
                         steps=int(steps), learning_rate=float(learning_rate), seed=int(training.seed))
