"""The ``kd`` study: Hinton et al. (2015) knowledge distillation at several temperatures."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from coblax.app.config import ConfigError
from coblax.app.experiment import train_base_model
from coblax.app.studies.common import base_run_config, study_cache, train_module
from coblax.app.studies.config import (
    KDConfig,
    StudyConfig,
    study_model,
)
from coblax.app.studies.pieces import Pieces
from coblax.lowrank.costs import count_params
from coblax.nn import train as T
from coblax.nn.data import Dataset
from coblax.nn.distill import distill, softmax_t
from coblax.nn.models import build_model

__all__ = ["study_kd"]

#: KD diagnostics (training accuracy, soft-target mass) are measured on at most this many
#: of the students' training images.
KD_FIT_EXAMPLES = 10_000


def study_kd(cfg: StudyConfig, data: Dataset, seed: int, progress: bool,
             pieces: Pieces | None = None) -> list[dict]:
    """Teacher, student alone, and a distilled student per temperature: one piece each
    (:class:`~coblax.app.studies.pieces.Pieces`; the teacher itself is a cached base model)."""
    pieces = pieces or Pieces()
    kd: KDConfig = cfg.kd
    teacher_mc, student_mc = study_model(kd.teacher, "kd.teacher"), study_model(kd.student, "kd.student")
    teacher = train_base_model(base_run_config(cfg, seed), teacher_mc, data, study_cache(cfg), progress)
    student = build_model(student_mc.name, num_classes=data.num_classes, **dict(student_mc.options))
    tc = cfg.train if kd.student_epochs is None else dataclasses.replace(cfg.train, epochs=kd.student_epochs)
    n = len(data.x_train)
    if kd.transfer_size is not None and kd.transfer_size > n:
        raise ConfigError(f"kd.transfer_size = {kd.transfer_size} exceeds the {n} training images")
    pick = (np.sort(np.random.default_rng(seed).permutation(n)[:kd.transfer_size])
            if kd.transfer_size is not None else np.arange(n))
    x_tr, y_tr = data.x_train[pick], data.y_train[pick]
    transfer = dataclasses.replace(data, x_train=x_tr, y_train=y_tr)
    # Diagnostics that say why distillation helps or not: how well each net fits the
    # images the students train on (a student that does not overfit has nothing for soft
    # targets to regularise), and how much probability the teacher's softened targets put
    # off the true label (near 0: the soft targets are the hard labels again).
    fit_x, fit_y = x_tr[:KD_FIT_EXAMPLES], y_tr[:KD_FIT_EXAMPLES]
    teacher_logits = np.asarray(T.predict(teacher.model.apply, teacher.params, fit_x))
    common = {"teacher": teacher_mc.label, "student": student_mc.label, "transfer_size": len(pick)}
    records = pieces.run("teacher", lambda: [common | {
        "role": "teacher", "temperature": None, "alpha": None, "acc": teacher.accuracy,
        "train_acc": float(np.mean(np.argmax(teacher_logits, -1) == fit_y)),
        "params": count_params(teacher.params)}])

    def alone() -> list[dict]:
        # The same initial student (key seed + 1) and batches for "alone" and every distilled run.
        p, acc_alone = train_module(student, transfer, tc, seed + 1, progress, "student alone")
        return [common | {"role": "student_alone", "temperature": None, "alpha": 0.0, "acc": acc_alone,
                          "train_acc": T.evaluate(student.apply, p, fit_x, fit_y), "params": count_params(p)}]

    records += pieces.run("student_alone", alone)
    init = student.init(jax.random.key(seed + 1), jnp.asarray(x_tr[:1]))

    def distilled(t: float) -> list[dict]:
        p = distill(student.apply, init, x_tr, y_tr, teacher_apply=teacher.model.apply,
                    teacher_params=teacher.params, temperature=t, alpha=kd.alpha, epochs=tc.epochs,
                    batch_size=tc.batch_size, learning_rate=tc.learning_rate, optimizer=tc.optimizer,
                    schedule=tc.schedule, seed=seed + 1, progress=progress)
        soft = np.asarray(softmax_t(teacher_logits, t))
        return [common | {"role": "student_kd", "temperature": t, "alpha": kd.alpha,
                          "acc": T.evaluate(student.apply, p, data.x_test, data.y_test),
                          "train_acc": T.evaluate(student.apply, p, fit_x, fit_y),
                          "soft_off_label": float(1.0 - soft[np.arange(len(fit_y)), fit_y].mean()),
                          "params": count_params(p)}]

    for t in kd.temperatures:
        records += pieces.run(f"student_kd T={t!r}", lambda t=t: distilled(t))
    return records
