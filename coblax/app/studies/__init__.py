"""``coblax study``: the seed's smaller studies, each from one TOML config.

A study config names its kind (``study = "kd" | "small_arch" | "svd_fc" |
"prune_quant"``), the data, the training settings, the seeds and the study's own
table. :func:`run_study` trains what it needs (base models through
:func:`coblax.app.experiment.train_base_model`, so they are cached like ``coblax
run``'s), calls the library functions (distillation, small architectures,
decomposition, pruning, quantization), and writes ``results.json``: the config,
its text, the seeds, the package versions, the dataset sizes, the wall time and one
record per measured point. :func:`format_study` prints the Markdown tables.

One module per study (:mod:`.kd`, :mod:`.small_arch`, :mod:`.svd_fc`,
:mod:`.prune_quant`), their configs (:mod:`.config`), what they share (:mod:`.common`),
the runner (:mod:`.runner`) and the tables (:mod:`.format`); this package exports the
public names.

Studies (seed: the lecture; numbers to compare with: ``seed_tables.md``):

* ``kd`` — Hinton et al. 2015: a teacher; the student trained alone; the same
  student distilled at each temperature (loss in :mod:`coblax.nn.distill`), optionally
  on a small transfer set; with each net's training accuracy and the soft targets'
  mass off the label, which say why distillation helps or not.
* ``small_arch`` — Iandola et al. 2016 (Fire squeeze ratio and 3×3 fraction sweep),
  depthwise-separable and flattened (Jin et al. 2014) vs. standard convolutions:
  parameters, MACs (by formula and by coblax's tracer) and accuracy.
* ``svd_fc`` — Denton et al. 2014: each dense layer alone truncated to rank K
  (others intact): weight reduction in·out / (K·(in + out)) and accuracy change,
  no fine-tuning.
* ``prune_quant`` — Han et al. 2015 per-layer pruning sensitivity; whole-network
  magnitude pruning without and with retraining (parameters and MACs kept);
  fixed-point word length (Gupta et al. 2015, nearest and stochastic rounding);
  k-means, product and residual quantization (Gong et al. 2014) size vs. accuracy;
  dynamic network surgery (Guo et al. 2016) vs. magnitude pruning at the same kept
  fractions; OBD (LeCun et al. 1989) and layer-wise OBS (Hassibi & Stork 1993) vs.
  magnitude, with and without retraining; BinaryConnect (Courbariaux et al. 2015)
  and a binarized net (Courbariaux et al. 2016); one layer's weight histogram with
  its k-means centroids before / after centroid fine-tuning (Han et al. 2016).
"""

from __future__ import annotations

from coblax.app.studies.config import (
    BINARY_NORMS,
    SALIENCY_METHODS,
    STUDIES,
    KDConfig,
    PruneQuantConfig,
    SmallArchConfig,
    StudyConfig,
    SVDConfig,
    load_study_config,
)
from coblax.app.studies.format import format_study
from coblax.app.studies.kd import KD_FIT_EXAMPLES
from coblax.app.studies.runner import PARTIAL, preflight_study, run_study, run_study_file

__all__ = [
    "STUDIES",
    "KDConfig",
    "SmallArchConfig",
    "SVDConfig",
    "PruneQuantConfig",
    "StudyConfig",
    "load_study_config",
    "run_study",
    "run_study_file",
    "format_study",
    "preflight_study",
    "PARTIAL",
    "KD_FIT_EXAMPLES",
    "SALIENCY_METHODS",
    "BINARY_NORMS",
]
