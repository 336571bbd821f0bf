"""``coblax study``: the seed's smaller studies, each from one TOML config.

A study config names its kind (``study = "kd" | "small_arch" | "svd_fc" |
"prune_quant"``), the data, the training settings, the seeds and the study's own
table. :func:`run_study` trains what it needs (base models through
:func:`coblax.app.experiment.train_base_model`, so they are cached like ``coblax
run``'s), calls the library functions (distillation, small architectures,
decomposition, pruning, quantization), and writes ``results.json``: the config,
its text, the seeds, the package versions, the dataset sizes, the wall time and one
record per measured point. :func:`format_study` prints the Markdown tables.

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

import dataclasses
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coblax.app.config import (
    INT_MAX,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_model_options,
    load_toml,
    parse_dataclass,
    read_config_text,
)
from coblax.app.experiment import (
    config_fingerprint,
    default_cache_dir,
    stop_on_signals,
    train_base_model,
    versions,
    writable_problem,
)
from coblax.app.report import ResultsError
from coblax.compress import prune as P
from coblax.compress import quantize as Q
from coblax.compress.transforms import keep_pruned
from coblax.lowrank.costs import count_params as _n_params
from coblax.lowrank.decompose import (
    factored_apply,
    factorize,
    get_kernel,
    layer_key,
    trace_layers,
    truncate,
)
from coblax.nn import train as T
from coblax.nn.data import Dataset, load_dataset
from coblax.nn.distill import distill, softmax_t
from coblax.nn.models import MODEL_NAMES, build_model
from coblax.nn.small import BLOCKS, BlockNet, FireNet, block_net_cost, fire_net_cost
from coblax.util import write_json_atomic
from coblax.util.errors import RunInterrupted
from coblax.util.runlock import run_lock

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
]

STUDIES = ("kd", "small_arch", "svd_fc", "prune_quant")
#: KD diagnostics (training accuracy, soft-target mass) are measured on at most this many
#: of the students' training images.
KD_FIT_EXAMPLES = 10_000
SALIENCY_METHODS = ("magnitude", "obd", "obs")
BINARY_NORMS = ("batch_norm", "none")


def _model(value: Any, where: str) -> ModelConfig:
    """A model table ``{ name = "mlp", hidden = [...] }`` (or a bare name) as a ModelConfig."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{where}: expected a model name or a table with a name, got {value!r}")
    if value["name"] not in MODEL_NAMES:
        raise ConfigError(f"{where}.name = {value['name']!r} is not allowed; valid models: {', '.join(MODEL_NAMES)}")
    options = {k: v for k, v in value.items() if k != "name"}
    problems = check_model_options(value["name"], options, where)
    if problems:
        raise ConfigError("; ".join(problems))
    return ModelConfig(value["name"], options)


def _fractions(values: Sequence[float], where: str, lo_open: bool = True, hi: float = 1.0) -> None:
    for v in values:
        if not ((0.0 < v if lo_open else 0.0 <= v) and v < hi):
            raise ConfigError(f"{where} = {v!r} is outside {'(' if lo_open else '['}0, {hi:g})")


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """Teacher, student, temperatures T and the soft-term weight α."""

    teacher: dict = dataclasses.field(default_factory=lambda: {"name": "mlp", "hidden": [300, 100]})
    student: dict = dataclasses.field(default_factory=lambda: {"name": "mlp", "hidden": [16]})
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    alpha: float = 0.9
    student_epochs: int | None = None  # default: train.epochs
    # The students (alone and distilled) see only this many training images, drawn with the
    # seed; the teacher sees all (Hinton et al. Sec. 3's 3 % transfer set). Default: all.
    transfer_size: int | None = None

    def validate(self, where: str) -> None:
        _model(self.teacher, f"{where}.teacher")
        _model(self.student, f"{where}.student")
        if self.transfer_size is not None and self.transfer_size < 1:
            raise ConfigError(f"{where}.transfer_size = {self.transfer_size!r} must be >= 1 (omit it: all images)")
        if self.student_epochs is not None and self.student_epochs < 1:
            raise ConfigError(f"{where}.student_epochs = {self.student_epochs!r} must be >= 1")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ConfigError(f"{where}.temperatures must be a non-empty list of numbers > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{where}.alpha = {self.alpha!r} is outside [0, 1]")


@dataclasses.dataclass(frozen=True)
class SmallArchConfig:
    """Fire design-space sweep and block comparison (see :mod:`coblax.nn.small`)."""

    stem: int = 32
    expand: int = 32
    squeeze_ratios: tuple[float, ...] = (0.125, 0.25, 0.5, 0.75)
    pct3x3: tuple[float, ...] = (0.125, 0.25, 0.5, 0.75, 0.875)
    squeeze_ratio_fixed: float = 0.125  # for the 3×3 sweep (the paper's choice)
    pct3x3_fixed: float = 0.5  # for the squeeze sweep
    blocks: tuple[str, ...] = BLOCKS
    block_stem: int = 16
    channels: tuple[int, ...] = (32, 64)
    kernel: int = 3

    def validate(self, where: str) -> None:
        _fractions(self.squeeze_ratios + (self.squeeze_ratio_fixed,), f"{where}.squeeze_ratios")
        _fractions(self.pct3x3 + (self.pct3x3_fixed,), f"{where}.pct3x3", lo_open=False, hi=1.0001)
        for b in self.blocks:
            if b not in BLOCKS:
                raise ConfigError(f"{where}.blocks: {b!r} is not allowed; valid: {', '.join(BLOCKS)}")
        if self.expand < 2 or self.stem < 1 or self.block_stem < 1 or self.kernel < 1:
            raise ConfigError(f"{where}: expand must be >= 2, stem, block_stem and kernel >= 1")


@dataclasses.dataclass(frozen=True)
class SVDConfig:
    """Rank K per dense layer: fractions of the full rank (K = max(1, round(f·R)))."""

    model: dict = dataclasses.field(default_factory=lambda: {"name": "mlp", "hidden": [300, 100]})
    rank_fractions: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5)
    layers: tuple[str, ...] = ()  # default: every dense layer

    def validate(self, where: str) -> None:
        _model(self.model, f"{where}.model")
        _fractions(self.rank_fractions, f"{where}.rank_fractions", hi=1.0001)


@dataclasses.dataclass(frozen=True)
class PruneQuantConfig:
    """Pruning (magnitude, DNS, OBD, OBS) and quantization (fixed point, codebooks, binary) settings."""

    model: dict = dataclasses.field(default_factory=lambda: {"name": "mlp", "hidden": [300, 100]})
    layer_sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.98)
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    scope: str = "layer"
    steps: int = 3
    retrain_epochs: int = 2
    retrain_learning_rate: float = 3e-4
    word_lengths: tuple[int, ...] = (2, 3, 4, 6, 8, 12, 16)
    roundings: tuple[str, ...] = ("nearest", "stochastic")
    kmeans_bits: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    pq_k: tuple[int, ...] = (4, 16, 64)
    pq_width: int = 2  # columns per product-quantization block
    rq_k: int = 16
    rq_stages: tuple[int, ...] = (1, 2, 4)
    # Dynamic network surgery (Guo et al. 2016). For each target sparsity every layer's crate is
    # chosen so that DNS's initial masks prune exactly that fraction (the final fraction drifts as
    # weights are spliced back; records carry the measured one). ``dns_rates`` lists Guo's crates to
    # run as they are, besides. Each DNS net is compared with magnitude pruning at its own per-layer
    # kept fractions, without and with the same number of epochs of masked retraining.
    dns_sparsities: tuple[float, ...] | None = None  # default: sparsities; [] runs none
    dns_rates: tuple[float, ...] = ()
    dns_epochs: int | None = None  # default: steps * retrain_epochs (the iterative pruning's budget)
    dns_optimizer: str = "adam"  # learning rate: retrain_learning_rate
    # OBD (LeCun et al. 1989) and layer-wise OBS (Hassibi & Stork 1993) vs. magnitude: one-shot at
    # each sparsity, per layer (OBS is layer-wise, so every method prunes each layer by the same
    # fraction), then the same masks retrained for retrain_epochs.
    saliency_sparsities: tuple[float, ...] | None = None  # default: sparsities; [] runs none
    saliency_methods: tuple[str, ...] = ("magnitude", "obd", "obs")
    saliency_examples: int = 1024  # training examples for OBD's loss Hessian and OBS's layer inputs
    # OBD's Hessian diagonal: "gauss_newton" (LeCun et al.'s Levenberg-Marquardt approximation, exact
    # and never negative), "exact" (the Hessian's: exact up to obd_exact_max_size weights, Hutchinson
    # above) or "hutchinson" (every layer). At a minimum the Hessian's estimate is noisy and deletes
    # the weights its negative saliencies rank first.
    obd_hessian: str = "gauss_newton"
    # OBD deletes each sparsity's weights in obd_steps geometric stages, the saliencies recomputed on
    # the pruned net before each (LeCun et al. iterate; the quadratic model is local). 1: one shot.
    obd_steps: int = 1
    obd_exact_max_size: int = 1024  # "exact": kernels up to this size get the exact Hessian diagonal
    obd_probes: int = 512  # Hutchinson probes ("exact" above obd_exact_max_size, "hutchinson")
    # OBS costs O(d_in^2) per deleted weight (about 15 s for a 300x100 layer at 95 % on 2 cores) and
    # d_in^2 floats per output column: layers with more inputs than this are pruned by magnitude in
    # the "obs" records (named in obs_magnitude_layers), e.g. the 784-input fc1 of LeNet-300-100.
    obs_max_inputs: int = 300
    obs_damp: float = 1e-4  # relative damping of OBS's layer Hessian
    # BinaryConnect (Courbariaux et al. 2015) and a binarized net (BNN, Courbariaux et al. 2016),
    # trained from scratch with 1-bit kernels in the forward pass, real-valued kernels clipped to
    # [-1, 1] after each update.
    binary_modes: tuple[str, ...] = ("det", "stoch")  # BinaryConnect modes; [] runs none
    # BinaryConnect's net: "batch_norm", the paper's MLP with batch normalisation after every layer
    # (widths binary_hidden, default the study MLP's); "none", the study model as it is (with +-1
    # weights and no normalisation its pre-activations blow up: stoch stays near chance).
    binary_norm: str = "batch_norm"
    binary_hidden: tuple[int, ...] = ()  # "batch_norm" hidden widths; default: the study MLP's
    binary_glorot_lr: bool = True  # BinaryConnect kernels' learning rate x 1/H_Glorot, as the paper
    bnn: bool = True
    bnn_hidden: tuple[int, ...] = ()  # BNN hidden widths; default: the study MLP's
    binary_epochs: int | None = None  # default: train.epochs
    binary_learning_rate: float | None = None  # default: train.learning_rate
    # Weight histogram of one layer with its k-means centroids before / after centroid fine-tuning
    # (Han et al. 2016, Fig. 7 style); only that layer is shared.
    hist_layer: str = ""  # default: the largest kernel
    hist_bits: int = 4  # 2^bits centroids; 0 records no histogram
    hist_bins: int = 64
    hist_finetune_epochs: int | None = None  # default: retrain_epochs; learning rate: retrain_learning_rate

    def validate(self, where: str) -> None:
        _model(self.model, f"{where}.model")
        _fractions(self.layer_sparsities, f"{where}.layer_sparsities", lo_open=False)
        _fractions(self.sparsities, f"{where}.sparsities", lo_open=False)
        if self.scope not in P.SCOPES:
            raise ConfigError(f"{where}.scope = {self.scope!r}; valid: {', '.join(P.SCOPES)}")
        if self.steps < 1 or self.retrain_epochs < 0:
            raise ConfigError(f"{where}: steps must be >= 1 and retrain_epochs >= 0")
        for r in self.roundings:
            if r not in Q.ROUNDINGS:
                raise ConfigError(f"{where}.roundings: {r!r}; valid: {', '.join(Q.ROUNDINGS)}")
        if any(not 1 <= w <= 32 for w in self.word_lengths):
            raise ConfigError(f"{where}.word_lengths must be in [1, 32]")
        if any(not 1 <= b <= 16 for b in self.kmeans_bits):
            raise ConfigError(f"{where}.kmeans_bits must be in [1, 16]")
        if any(k < 2 for k in (*self.pq_k, self.rq_k)) or self.pq_width < 1:
            raise ConfigError(f"{where}: pq_k and rq_k must be >= 2, pq_width >= 1")
        if any(t < 1 for t in self.rq_stages):
            raise ConfigError(f"{where}.rq_stages must be >= 1")
        for key in ("dns_sparsities", "saliency_sparsities"):
            _fractions(getattr(self, key) or (), f"{where}.{key}", lo_open=False)
        if self.dns_optimizer not in T.OPTIMIZERS:
            raise ConfigError(f"{where}.dns_optimizer = {self.dns_optimizer!r}; valid: {', '.join(T.OPTIMIZERS)}")
        for m in self.saliency_methods:
            if m not in SALIENCY_METHODS:
                raise ConfigError(f"{where}.saliency_methods: {m!r}; valid: {', '.join(SALIENCY_METHODS)}")
        for m in self.binary_modes:
            if m not in Q.BINARY_MODES:
                raise ConfigError(f"{where}.binary_modes: {m!r}; valid: {', '.join(Q.BINARY_MODES)}")
        if self.obd_hessian not in P.OBD_HESSIANS:
            raise ConfigError(f"{where}.obd_hessian = {self.obd_hessian!r}; valid: {', '.join(P.OBD_HESSIANS)}")
        if self.binary_norm not in BINARY_NORMS:
            raise ConfigError(f"{where}.binary_norm = {self.binary_norm!r}; valid: {', '.join(BINARY_NORMS)}")
        if min(self.saliency_examples, self.obd_probes, self.obd_steps, self.obs_max_inputs, self.hist_bins) < 1:
            raise ConfigError(f"{where}: saliency_examples, obd_probes, obd_steps, obs_max_inputs and hist_bins "
                              "must be >= 1")
        if any(h < 1 for h in (*self.bnn_hidden, *self.binary_hidden)) or (
                self.binary_epochs is not None and self.binary_epochs < 1):
            raise ConfigError(f"{where}: bnn_hidden and binary_hidden widths and binary_epochs must be >= 1")
        for key in ("dns_epochs", "hist_finetune_epochs"):
            if (getattr(self, key) or 0) < 0:
                raise ConfigError(f"{where}.{key} must be >= 0")
        if self.obd_exact_max_size < 0 or self.obs_damp < 0 or (
                self.binary_learning_rate is not None and self.binary_learning_rate <= 0):
            raise ConfigError(f"{where}: obd_exact_max_size and obs_damp must be >= 0, binary_learning_rate > 0")
        if not 0 <= self.hist_bits <= 16:
            raise ConfigError(f"{where}.hist_bits must be in [0, 16] (0: no histogram)")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One study: its kind, data, training, seeds and the study's own settings."""

    study: str
    name: str = ""
    seeds: tuple[int, ...] = (0,)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    cache_dir: str | None = None
    kd: KDConfig = KDConfig()
    small_arch: SmallArchConfig = SmallArchConfig()
    svd_fc: SVDConfig = SVDConfig()
    prune_quant: PruneQuantConfig = PruneQuantConfig()

    def validate(self, where: str) -> None:
        if self.study not in STUDIES:
            raise ConfigError(f"study = {self.study!r} is not allowed; valid studies: {', '.join(STUDIES)}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        for i, seed in enumerate(self.seeds):
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= INT_MAX:
                raise ConfigError(f"seeds[{i}] = {seed!r} must be an integer in [0, {INT_MAX}]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds = {list(self.seeds)} lists a seed twice")

    def settings(self) -> Any:
        """The table of this config's own study."""
        return getattr(self, self.study)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a study config (unknown keys and bad values raise ConfigError)."""
    raw = load_toml(path)
    if "seed" in raw:  # a single seed is a one-element list
        if "seeds" in raw:
            raise ConfigError("give either seed or seeds, not both")
        raw = dict(raw, seeds=[raw.pop("seed")])
    if "study" not in raw:
        raise ConfigError(f"{path}: missing key study; valid studies: {', '.join(STUDIES)}")
    return parse_dataclass(StudyConfig, raw)


# --------------------------------------------------------------------------- helpers


def _run_config(cfg: StudyConfig, seed: int) -> RunConfig:
    """The ``coblax run`` settings that key a cached base model (seed, data, training)."""
    return RunConfig(seed=seed, data=cfg.data, train=cfg.train, cache_dir=cfg.cache_dir)


def _cache(cfg: StudyConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def _train_module(module, data: Dataset, tc: TrainConfig, seed: int, progress: bool, desc: str):
    """Initialise and train a Flax module (no cache); returns (params, test accuracy)."""
    params = module.init(jax.random.key(seed), jnp.asarray(data.x_train[:1]))
    params = T.fit(module.apply, params, data.x_train, data.y_train, epochs=tc.epochs,
                   batch_size=tc.batch_size, learning_rate=tc.learning_rate, optimizer=tc.optimizer,
                   seed=seed, desc=desc, progress=progress)
    return params, T.evaluate(module.apply, params, data.x_test, data.y_test)


def _traced_macs(module, params, data: Dataset) -> int:
    return int(sum(layer.macs for layer in trace_layers(module, params, jnp.asarray(data.x_train[:1]))))


# ------------------------------------------------------------------------------ studies


def _study_kd(cfg: StudyConfig, data: Dataset, seed: int, progress: bool) -> list[dict]:
    kd: KDConfig = cfg.kd
    teacher_mc, student_mc = _model(kd.teacher, "kd.teacher"), _model(kd.student, "kd.student")
    teacher = train_base_model(_run_config(cfg, seed), teacher_mc, data, _cache(cfg), progress)
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
    records = [common | {"role": "teacher", "temperature": None, "alpha": None, "acc": teacher.accuracy,
                         "train_acc": float(np.mean(np.argmax(teacher_logits, -1) == fit_y)),
                         "params": _n_params(teacher.params)}]
    # The same initial student (key seed + 1) and batches for "alone" and every distilled run.
    alone, acc_alone = _train_module(student, transfer, tc, seed + 1, progress, "student alone")
    records.append(common | {"role": "student_alone", "temperature": None, "alpha": 0.0, "acc": acc_alone,
                             "train_acc": T.evaluate(student.apply, alone, fit_x, fit_y),
                             "params": _n_params(alone)})
    init = student.init(jax.random.key(seed + 1), jnp.asarray(x_tr[:1]))
    for t in kd.temperatures:
        p = distill(student.apply, init, x_tr, y_tr, teacher_apply=teacher.model.apply,
                    teacher_params=teacher.params, temperature=t, alpha=kd.alpha, epochs=tc.epochs,
                    batch_size=tc.batch_size, learning_rate=tc.learning_rate, optimizer=tc.optimizer,
                    seed=seed + 1, progress=progress)
        soft = np.asarray(softmax_t(teacher_logits, t))
        records.append(common | {"role": "student_kd", "temperature": t, "alpha": kd.alpha,
                                 "acc": T.evaluate(student.apply, p, data.x_test, data.y_test),
                                 "train_acc": T.evaluate(student.apply, p, fit_x, fit_y),
                                 "soft_off_label": float(1.0 - soft[np.arange(len(fit_y)), fit_y].mean()),
                                 "params": _n_params(p)})
    return records


def _study_small_arch(cfg: StudyConfig, data: Dataset, seed: int, progress: bool) -> list[dict]:
    sa: SmallArchConfig = cfg.small_arch
    shape = data.input_shape
    variants: list[tuple[str, str, Any, Any]] = []
    for sr in sa.squeeze_ratios:
        net = FireNet(data.num_classes, sa.stem, sa.expand, sr, sa.pct3x3_fixed)
        variants.append(("fire_squeeze_ratio", f"SR={sr:g}", net, fire_net_cost(net, shape)))
    for pct in sa.pct3x3:
        net = FireNet(data.num_classes, sa.stem, sa.expand, sa.squeeze_ratio_fixed, pct)
        variants.append(("fire_pct3x3", f"pct3x3={pct:g}", net, fire_net_cost(net, shape)))
    for block in sa.blocks:
        net = BlockNet(data.num_classes, block, sa.block_stem, sa.channels, sa.kernel)
        variants.append(("blocks", block, net, block_net_cost(net, shape)))
    records = []
    trained: dict[str, tuple] = {}  # the two Fire sweeps share their centre point: train it once
    for family, label, net, cost in variants:
        start = time.perf_counter()
        if repr(net) not in trained:
            trained[repr(net)] = _train_module(net, data, cfg.train, seed, progress, f"{family} {label}")
        params, acc = trained[repr(net)]
        rec = {"family": family, "variant": label, "params": cost.params, "macs": cost.macs,
               "traced_macs": _traced_macs(net, params, data), "counted_params": _n_params(params),
               "acc": acc, "train_seconds": time.perf_counter() - start}
        if isinstance(net, FireNet):
            rec |= {"squeeze_ratio": net.squeeze_ratio, "pct3x3": net.pct3x3}
        else:
            rec |= {"block": net.block}
        records.append(rec)
    return records


def _study_svd_fc(cfg: StudyConfig, data: Dataset, seed: int, progress: bool) -> list[dict]:
    sv: SVDConfig = cfg.svd_fc
    mc = _model(sv.model, "svd_fc.model")
    base = train_base_model(_run_config(cfg, seed), mc, data, _cache(cfg), progress)
    traced = [l for l in trace_layers(base.model, base.params, jnp.asarray(data.x_train[:1])) if l.kind == "dense"]
    names = [l.name for l in traced]
    unknown = sorted(set(sv.layers) - set(names))
    if unknown:
        raise ConfigError(f"svd_fc.layers names unknown dense layers {unknown}; dense layers: {', '.join(names)}")
    records = []
    for layer in traced:
        if sv.layers and layer.name not in sv.layers:
            continue
        n_in, n_out = layer.kernel_shape
        full = factorize(get_kernel(base.params, layer.name), layer, "tai")
        R = min(n_in, n_out)
        for r in sorted({max(1, round(f * R)) for f in sv.rank_fractions}):
            mask = np.zeros(R)
            mask[:r] = 1.0
            fs = {layer.name: truncate(full, mask)}
            acc = T.evaluate(lambda p, x, fs=fs: factored_apply(base.model, p, fs, x), base.params,
                             data.x_test, data.y_test)
            records.append({
                "model": mc.label, "layer": layer.name, "shape": [n_in, n_out], "rank": r, "full_rank": R,
                "weights": n_in * n_out, "factored_weights": r * (n_in + n_out),
                "weight_reduction": n_in * n_out / (r * (n_in + n_out)),
                "acc": acc, "base_acc": base.accuracy, "acc_change": acc - base.accuracy,
            })
    return records


def _kernel_bits(sizes: dict[str, int], ratios: dict[str, float]) -> float:
    """Bits of all kernels: 32·n / ratio for the quantized ones, 32·n for the others."""
    return float(sum(32.0 * n / ratios.get(name, 1.0) for name, n in sizes.items()))


def _study_prune_quant(cfg: StudyConfig, data: Dataset, seed: int, progress: bool) -> list[dict]:
    pq: PruneQuantConfig = cfg.prune_quant
    mc = _model(pq.model, "prune_quant.model")
    base = train_base_model(_run_config(cfg, seed), mc, data, _cache(cfg), progress)
    model, params = base.model, base.params
    ev = lambda p: T.evaluate(model.apply, p, data.x_test, data.y_test)  # noqa: E731
    kern = P.kernels(params)
    sizes = {n: int(np.size(w)) for n, w in kern.items()}
    total = sum(sizes.values())
    macs = {l.name: l.macs for l in trace_layers(model, params, jnp.asarray(data.x_train[:1]))}
    total_macs = sum(macs.values())
    common = {"model": mc.label, "base_acc": base.accuracy}
    records: list[dict] = [common | {"kind": "base", "acc": base.accuracy, "weights": total, "macs": total_macs,
                                     "kernel_bits": 32.0 * total}]

    run = _PQRun(cfg, data, seed, progress, model, params, common, macs)
    pruned = run.pruned
    hist_layer = _hist_layer(pq, kern)  # a misnamed layer fails now, not after the pruning runs

    # Per-layer sensitivity (Han et al. 2015, Fig. 5): one layer pruned, the others intact.
    for name in kern:
        for s in pq.layer_sparsities:
            masks = P.magnitude_masks(params, {name: s})
            records.append(common | {"kind": "layer_prune", "layer": name, "sparsity": s,
                                     "acc": ev(P.apply_masks(params, masks))} | pruned(P.mask_report(masks)))
    # Whole network, one-shot without retraining and iterative with retraining.
    for s in pq.sparsities:
        p1, rep = P.magnitude_prune(params, P.MagnitudeSpec(s, pq.scope))
        records.append(common | {"kind": "prune", "retrain": False, "sparsity": s, "acc": ev(p1)} | pruned(rep))
        if pq.retrain_epochs > 0:
            p2, _, rep2 = P.iterative_magnitude_prune(
                model.apply, params, data.x_train, data.y_train, sparsity=s, steps=pq.steps,
                retrain_epochs=pq.retrain_epochs, scope=pq.scope,
                train_kwargs={"learning_rate": pq.retrain_learning_rate, "batch_size": cfg.train.batch_size,
                              "seed": seed, "progress": progress})
            records.append(common | {"kind": "prune", "retrain": True, "sparsity": s, "steps": pq.steps,
                                     "retrain_epochs": pq.retrain_epochs, "acc": ev(p2)} | pruned(rep2))
    # Fixed point ⟨IL, FL⟩ (post-training): IL covers the largest |w| (sign bit included).
    wmax = max(float(np.max(np.abs(np.asarray(w)))) for w in kern.values())
    il_needed = 1 + max(0, math.ceil(math.log2(wmax))) if wmax > 0 else 1
    for wl in pq.word_lengths:
        il = min(il_needed, wl)
        for rounding in pq.roundings:
            qp, rep = Q.fixed_point_quantize(params, Q.FixedPointSpec(il, wl - il, rounding, seed))
            records.append(common | {"kind": "fixed_point", "word_length": wl, "il": il, "fl": wl - il,
                                     "rounding": rounding, "acc": ev(qp),
                                     "kernel_bits": float(wl * total), "compression_ratio": 32.0 / wl})
    # k-means weight sharing: every kernel, 2^bits shared values (codebook neglected, as Gong et al.).
    for b in pq.kmeans_bits:
        qp, _, _, rep = Q.kmeans_share(params, b, seed=seed)
        ratios = {n: Q.kmeans_compression_ratio(max(c.k, 2)) for n, c in rep.layers.items()}
        bits = _kernel_bits(sizes, ratios)
        records.append(common | {"kind": "kmeans", "bits": b, "acc": ev(qp), "kernel_bits": bits,
                                 "compression_ratio": 32.0 * total / bits})
    # Product / residual quantization of the dense kernels (m = in rows, n = out columns).
    dense = {n: np.asarray(w) for n, w in kern.items() if np.ndim(w) == 2}

    def codebook_record(kind: str, setting: dict, quantize: Callable[[np.ndarray], Any]) -> dict:
        new, ratios, skipped = {}, {}, []
        for n, w in dense.items():
            try:
                res = quantize(w)
            except ValueError:  # k > m rows or blocks not dividing n: layer kept in float
                skipped.append(n)
                continue
            new[n] = jnp.asarray(res.reconstruction, w.dtype)
            ratios[n] = getattr(res, "storage_ratio", res.compression_ratio)
        bits = _kernel_bits(sizes, ratios)
        return common | {"kind": kind, **setting, "acc": ev(P.replace_kernels(params, new)),
                         "kernel_bits": bits, "compression_ratio": 32.0 * total / bits,
                         "unquantized_layers": skipped + [n for n in kern if n not in dense]}

    def product(w: np.ndarray, k: int) -> Q.ProductQuantization:
        if w.shape[1] % pq.pq_width:
            raise ValueError(f"pq_width={pq.pq_width} does not divide the {w.shape[1]} columns")
        return Q.product_quantize(w, w.shape[1] // pq.pq_width, k, seed=seed)

    for k in pq.pq_k:
        records.append(codebook_record("pq", {"k": k, "block_width": pq.pq_width}, lambda w, k=k: product(w, k)))
    for t in pq.rq_stages:
        records.append(codebook_record("rq", {"k": pq.rq_k, "stages": t},
                                       lambda w, t=t: Q.residual_quantize(w, t, pq.rq_k, seed=seed)))
    return records + _pq_dns(run) + _pq_saliency(run) + _pq_binary(run) + _pq_kmeans_hist(run, hist_layer)


@dataclasses.dataclass(frozen=True)
class _PQRun:
    """What the parts of the prune_quant study share: the trained base model, its data and settings."""

    cfg: StudyConfig
    data: Dataset
    seed: int
    progress: bool
    model: Any
    params: Any
    common: dict
    macs: dict[str, int]

    @property
    def pq(self) -> PruneQuantConfig:
        return self.cfg.prune_quant

    def acc(self, params: Any, apply_fn: Callable | None = None) -> float:
        return T.evaluate(apply_fn or self.model.apply, params, self.data.x_test, self.data.y_test)

    def pruned(self, report: P.PruneReport) -> dict:
        """Kept fractions (whole net, per layer, of the MACs) and compression of a pruned net."""
        kept = {n: s.kept_fraction for n, s in report.layers.items()}
        total_macs = sum(self.macs.values())
        kept_macs = sum(self.macs.get(n, 0) * f for n, f in kept.items())
        return {"kept_fraction": report.kept_fraction, "compression": report.compression,
                "layer_kept_fraction": kept, "mac_kept_fraction": kept_macs / total_macs if total_macs else 1.0}

    def retrain(self, params: Any, masks: Any, epochs: int, desc: str) -> Any:
        """Masked retraining at retrain_learning_rate: keep_pruned after Adam holds pruned weights at 0."""
        lr = self.pq.retrain_learning_rate
        return T.fit(self.model.apply, params, self.data.x_train, self.data.y_train, epochs=epochs,
                     batch_size=self.cfg.train.batch_size, learning_rate=lr,
                     optimizer=optax.chain(T.make_optimizer("adam", lr), keep_pruned(masks)), seed=self.seed,
                     desc=desc, progress=self.progress)


def _dns_rate(abs_w: np.ndarray, sparsity: float) -> float:
    """Guo et al.'s crate r with mean|W| + r·std|W| = the ``sparsity`` quantile of |W|.

    DNS's first masks then prune that fraction of the layer (what Han et al.'s threshold does).
    """
    std = float(abs_w.std())
    return (float(np.quantile(abs_w, sparsity)) - float(abs_w.mean())) / std if std > 0 else 0.0


def _pq_dns(run: _PQRun) -> list[dict]:
    """Dynamic network surgery vs. magnitude pruning at DNS's own per-layer kept fractions."""
    pq = run.pq
    epochs = pq.steps * pq.retrain_epochs if pq.dns_epochs is None else pq.dns_epochs
    targets = pq.sparsities if pq.dns_sparsities is None else pq.dns_sparsities
    abs_w = {n: np.abs(np.asarray(w, np.float64)) for n, w in P.kernels(run.params).items()}
    settings: list[tuple[dict, Any]] = [({"sparsity": s, "rate": None}, {n: _dns_rate(a, s) for n, a in abs_w.items()})
                                        for s in targets]
    settings += [({"sparsity": None, "rate": r}, r) for r in pq.dns_rates]
    records = []
    for setting, rate in settings:
        p, _, rep = P.dns(run.model.apply, run.params, run.data.x_train, run.data.y_train, rate=rate, epochs=epochs,
                          learning_rate=pq.retrain_learning_rate, batch_size=run.cfg.train.batch_size,
                          optimizer=pq.dns_optimizer, seed=run.seed)
        # Magnitude masks pruning exactly as many weights per layer as DNS kept (at least one kept).
        mag = P.magnitude_masks(run.params, {n: min(1.0 - s.kept_fraction, 1.0 - 1.0 / s.weights)
                                             for n, s in rep.layers.items()})
        mag_params = P.apply_masks(run.params, mag)
        records.append(run.common | setting | {
            "kind": "dns", "epochs": epochs, "acc": run.acc(p),
            "spliced": int(sum(rep.extra["spliced"].values())), "mask_updates": rep.extra["mask_updates"],
            "magnitude_acc": run.acc(mag_params),
            "magnitude_retrained_acc": run.acc(run.retrain(mag_params, mag, epochs, "magnitude at DNS kept"))
            if epochs else None} | run.pruned(rep))
    return records


def _dense_inputs(model: nn.Module, params: Any, x: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The inputs (N, d_in) the named Dense layers see on ``x`` (OBS's layer-wise Hessians need them)."""
    found: dict[str, np.ndarray] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, nn.Dense) and layer_key(mod.path) in names:
            found[layer_key(mod.path)] = np.asarray(args[0], np.float64).reshape(-1, args[0].shape[-1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(params, jnp.asarray(x))
    return found


def _pq_saliency(run: _PQRun) -> list[dict]:
    """OBD and layer-wise OBS vs. magnitude: one-shot per layer at each sparsity, then retrained."""
    pq = run.pq
    sparsities = pq.sparsities if pq.saliency_sparsities is None else pq.saliency_sparsities
    if not sparsities or not pq.saliency_methods:
        return []
    x_tr, y_tr = run.data.x_train, run.data.y_train
    pick = np.sort(np.random.default_rng(run.seed).choice(len(x_tr), min(pq.saliency_examples, len(x_tr)),
                                                          replace=False))
    x, y = x_tr[pick], y_tr[pick]
    kern = P.kernels(run.params)
    magnitude = {n: np.abs(np.asarray(w)) for n, w in kern.items()}

    def by_scores(scores: dict) -> Callable[[float], tuple[Any, Any]]:
        def prune(s: float) -> tuple[Any, Any]:
            masks = P.masks_from_layers(run.params, P.score_masks(scores, s, scope="layer"))
            return P.apply_masks(run.params, masks), masks
        return prune

    narrow = [n for n, w in kern.items() if np.ndim(w) == 2 and w.shape[0] <= pq.obs_max_inputs]
    wide = [n for n in kern if n not in narrow]  # convolutions and wide dense layers: magnitude
    inputs = _dense_inputs(run.model, run.params, x, narrow) if "obs" in pq.saliency_methods else {}

    def obs(s: float) -> tuple[Any, Any]:
        p, masks, _ = P.obs_prune(run.params, inputs, s, damp=pq.obs_damp)
        keep = P.layer_masks(masks) | P.score_masks({n: magnitude[n] for n in wide}, s, scope="layer")
        masks = P.masks_from_layers(run.params, keep)
        return P.apply_masks(p, masks), masks

    methods: dict[str, Callable[[float], tuple[Any, Any]]] = {}
    for m in pq.saliency_methods:
        if m == "magnitude":
            methods[m] = by_scores(magnitude)
        elif m == "obd" and pq.obd_steps == 1:
            loss = lambda p, xb, yb: T.cross_entropy(run.model.apply(p, xb), yb)  # noqa: E731
            methods[m] = by_scores(P.obd_saliency(loss, run.params, data=(jnp.asarray(x), jnp.asarray(y)),
                                                  hessian=pq.obd_hessian, apply_fn=run.model.apply,
                                                  exact_max_size=pq.obd_exact_max_size, n_samples=pq.obd_probes,
                                                  seed=run.seed))
        elif m == "obd":
            def obd(s: float) -> tuple[Any, Any]:
                p, masks, _ = P.obd_prune(run.model.apply, run.params, x, y, sparsity=s, scope="layer",
                                          hessian=pq.obd_hessian, steps=pq.obd_steps,
                                          exact_max_size=pq.obd_exact_max_size, n_samples=pq.obd_probes,
                                          seed=run.seed)
                return p, masks
            methods[m] = obd
        else:
            methods[m] = obs
    records = []
    for s in sparsities:
        for m, prune in methods.items():
            p, masks = prune(s)
            fields = run.common | {"kind": "saliency", "method": m, "sparsity": s} | run.pruned(P.mask_report(masks))
            if m == "obd":
                fields |= {"obd_hessian": pq.obd_hessian, "obd_steps": pq.obd_steps}
            if m == "obs":
                fields["obs_magnitude_layers"] = wide
            records.append(fields | {"retrain": False, "acc": run.acc(p)})
            if pq.retrain_epochs > 0:
                p = run.retrain(p, masks, pq.retrain_epochs, f"{m} {s:g} retrain")
                records.append(fields | {"retrain": True, "retrain_epochs": pq.retrain_epochs, "acc": run.acc(p)})
    return records


def _binary_fields(params: Any) -> dict:
    """1 bit per kernel weight; the distinct values of each deployed kernel (2 for a binary one).

    float_params counts the ``params`` collection's other leaves: BatchNorm's running
    statistics fold into its scale and offset at deployment, so they are not counted.
    """
    kern = P.kernels(params)
    n = sum(int(np.size(w)) for w in kern.values())
    trained = params["params"] if isinstance(params, dict) and "params" in params else params
    return {"kernel_bits": float(n), "compression_ratio": 32.0, "float_params": _n_params(trained) - n,
            "kernel_values": {name: int(np.unique(np.asarray(w)).size) for name, w in kern.items()}}


def _pq_binary(run: _PQRun) -> list[dict]:
    """BinaryConnect (det / stoch) and a binarized MLP, trained from scratch."""
    pq, tc, data = run.pq, run.cfg.train, run.data
    epochs = pq.binary_epochs or tc.epochs
    lr = pq.binary_learning_rate or tc.learning_rate
    x0 = jnp.asarray(data.x_train[:1])

    def train(apply_fn: Callable, params: Any, desc: str, optimizer: Any = None, mutable: tuple = ()) -> Any:
        # clip_project: BinaryConnect clips the real-valued weights to [-1, 1] after each update.
        return T.fit(apply_fn, params, data.x_train, data.y_train, epochs=epochs, batch_size=tc.batch_size,
                     learning_rate=lr, optimizer=optimizer or tc.optimizer, seed=run.seed, project=Q.clip_project,
                     mutable=mutable, desc=desc, progress=run.progress)

    def hidden_widths(given: tuple, key: str) -> tuple:
        hidden = tuple(given or getattr(run.model, "hidden", ()))
        if not hidden:
            raise ConfigError(f"prune_quant.{key}: the study model has no hidden widths; give {key}")
        return hidden

    records = []
    if pq.binary_modes:
        if pq.binary_norm == "batch_norm":
            hidden = hidden_widths(pq.binary_hidden, "binary_hidden")
            net = Q.BinaryConnectMLP(hidden, data.num_classes)
            init = net.init(jax.random.key(run.seed + 2), x0)
            train_fn = functools.partial(net.apply, train=True)
            eval_fn: Callable | None = functools.partial(net.apply, train=False)
            mutable: tuple = ("batch_stats",)
            arch = {"binary_norm": "batch_norm", "hidden": list(hidden)}
        else:
            init = run.model.init(jax.random.key(run.seed + 2), x0)
            train_fn, eval_fn, mutable, arch = run.model.apply, None, (), {"binary_norm": "none"}
        optimizer = (optax.chain(T.make_optimizer(tc.optimizer, lr), Q.glorot_lr_scale())
                     if pq.binary_glorot_lr else None)
        for mode in pq.binary_modes:
            p = train(Q.binaryconnect_apply_fn(train_fn, mode, seed=run.seed), init, f"BinaryConnect {mode}",
                      optimizer, mutable)
            # Deployed: sign(w) for det, one stochastic draw for stoch (1 bit per weight either way).
            # Courbariaux et al. test stoch nets with the real-valued weights (acc_real_weights).
            deployed = Q.binarize_params(p, mode, seed=run.seed)
            records.append(run.common | arch | {
                "kind": "binaryconnect", "mode": mode, "epochs": epochs, "glorot_lr": pq.binary_glorot_lr,
                "acc": run.acc(deployed, eval_fn), "acc_sign": run.acc(Q.binarize_params(p, "det"), eval_fn),
                "acc_real_weights": run.acc(p, eval_fn)} | _binary_fields(deployed))
    if pq.bnn:
        hidden = hidden_widths(pq.bnn_hidden, "bnn_hidden")
        bnn = Q.BinarizedMLP(hidden, data.num_classes)
        p = train(bnn.apply, bnn.init(jax.random.key(run.seed + 3), x0), "BNN")
        # BinaryDense multiplies by sign_ste(kernel), which is binarize(kernel, "det") in the forward pass.
        records.append(run.common | {"kind": "bnn", "mode": "det", "hidden": list(hidden), "epochs": epochs,
                                     "acc": run.acc(p, bnn.apply)} | _binary_fields(Q.binarize_params(p, "det")))
    return records


def _hist_layer(pq: PruneQuantConfig, kern: dict) -> str:
    """The histogram's layer: hist_layer, or the largest kernel."""
    layer = pq.hist_layer or max(kern, key=lambda n: np.size(kern[n]))
    if layer not in kern:
        raise ConfigError(f"prune_quant.hist_layer = {layer!r} is not a layer; layers: {', '.join(kern)}")
    return layer


def _pq_kmeans_hist(run: _PQRun, layer: str) -> list[dict]:
    """One layer's weight histogram and its k-means centroids before / after centroid fine-tuning."""
    pq, data = run.pq, run.data
    if pq.hist_bits == 0:
        return []
    w = np.asarray(P.kernels(run.params)[layer], np.float64)
    counts, edges = np.histogram(w, bins=pq.hist_bins)
    qp, books, idx, rep = Q.kmeans_share(run.params, {layer: pq.hist_bits}, seed=run.seed)
    epochs = pq.retrain_epochs if pq.hist_finetune_epochs is None else pq.hist_finetune_epochs
    tuned, tuned_books = Q.finetune_centroids(
        run.model.apply, run.params, books, idx, None, data.x_train, data.y_train, epochs=epochs,
        learning_rate=pq.retrain_learning_rate, batch_size=run.cfg.train.batch_size, seed=run.seed,
        progress=run.progress)
    k = rep.layers[layer].k
    acc_ft = run.acc(tuned)
    return [run.common | {"kind": "kmeans_hist", "layer": layer, "bits": pq.hist_bits, "k": k,
                          "finetune_epochs": epochs, "acc_kmeans": run.acc(qp), "acc_finetuned": acc_ft, "acc": acc_ft,
                          "hist_counts": counts.tolist(), "hist_edges": [float(e) for e in edges],
                          "centroids_kmeans": [float(c) for c in books[layer]],
                          "centroids_finetuned": [float(c) for c in tuned_books[layer]],
                          "cluster_sizes": np.bincount(idx[layer].ravel(), minlength=k).tolist()}]


_RUNNERS: dict[str, Callable[[StudyConfig, Dataset, int, bool], list[dict]]] = {
    "kd": _study_kd,
    "small_arch": _study_small_arch,
    "svd_fc": _study_svd_fc,
    "prune_quant": _study_prune_quant,
}


PARTIAL = "results.partial.json"


def _model_tables(cfg: StudyConfig) -> list[tuple[str, Any]]:
    """(config key, model table) of every bundled model the study builds."""
    if cfg.study == "kd":
        return [("kd.teacher", cfg.kd.teacher), ("kd.student", cfg.kd.student)]
    if cfg.study in ("svd_fc", "prune_quant"):
        return [(f"{cfg.study}.model", cfg.settings().model)]
    return []


def preflight_study(cfg: StudyConfig, data: Dataset) -> None:
    """Check, before anything is trained, what the config asks of the data and the models.

    Every model table is built abstractly (``jax.eval_shape``) on the data's input
    shape, the KD transfer set against the training images; raises ConfigError.
    The student is checked here, so that a bad student no longer wastes the
    teacher's training.
    """
    x = jax.ShapeDtypeStruct((1, *data.input_shape), jnp.float32)
    for where, table in _model_tables(cfg):
        mc = _model(table, where)
        try:
            model = build_model(mc.name, num_classes=data.num_classes, input_shape=data.input_shape,
                                **dict(mc.options))
            jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        except Exception as err:  # noqa: BLE001 - whatever the options break, report it as theirs
            raise ConfigError(f"{where} ({mc.label}) cannot be built for inputs {tuple(data.input_shape)}: "
                              f"{type(err).__name__}: {err}") from None
    kd = cfg.kd
    if cfg.study == "kd" and kd.transfer_size is not None and kd.transfer_size > len(data.x_train):
        raise ConfigError(f"kd.transfer_size = {kd.transfer_size} exceeds the {len(data.x_train)} training images")


def _previous_partial(out: Path, fingerprint: dict, force: bool) -> dict | None:
    """The partial payload of an interrupted run of the same config in ``out``, or None."""
    path = out / PARTIAL
    if force or not path.exists():
        return None
    try:
        payload = _read_study_payload(path)
    except ResultsError as err:
        raise ConfigError(f"{err}; move it away or pass --force to start over") from None
    if payload.get("fingerprint") != fingerprint:
        raise ConfigError(f"{path} holds results of a different study config; pass --force to start over "
                          "or choose another --out")
    return payload


def _read_study_payload(path: Path) -> dict:
    from coblax.util.errors import FileLoadError
    from coblax.util.limits import parse_json

    try:
        data = parse_json(path.read_bytes(), str(path))
    except (OSError, FileLoadError) as err:
        raise ResultsError(f"{path}: not a valid study results file ({err})") from None
    ok = (isinstance(data, dict) and isinstance(data.get("records"), list)
          and all(isinstance(r, dict) for r in data["records"])
          and isinstance(data.get("done_seeds", []), list))
    if not ok:
        raise ResultsError(f"{path}: expected a study results object with 'records' and 'done_seeds' lists")
    return data


def run_study(cfg: StudyConfig, out_dir: str | Path, *, config_text: str = "", progress: bool = True,
              force: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Run every seed of the study; write ``out_dir/results.json`` atomically and return it.

    Each record carries ``study`` and ``seed``; the payload carries the config (and its
    text), the seeds, the package versions, the dataset sizes and the wall time.

    Checked before any work: the output folder (writable, not a file), the data (a
    config for absent data names the folder and the files expected), every model
    table built on the data's input shape and the KD transfer set
    (:func:`preflight_study`). Then, like ``coblax run``:

    * each seed's records are saved in ``results.partial.json`` as soon as the seed
      is finished; a rerun of the same config resumes after the finished seeds
      (``force`` starts over; a partial file of another config is refused);
    * SIGINT / SIGTERM raise :class:`RunInterrupted` with every finished seed saved
      (a signal during a save waits for it);
    * the folder is locked for the run (:mod:`coblax.util.runlock`).
    """
    log = log or (lambda m: print(f"coblax: {m}", flush=True, file=sys.stderr))
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    reason = writable_problem(out)
    if reason:
        raise ConfigError(f"--out {out}: {reason}")
    datasets = {s: load_dataset(cfg.data.name, cfg.data.dir, seed=s, limit_train=cfg.data.limit_train,
                                limit_test=cfg.data.limit_test) for s in cfg.seeds}
    preflight_study(cfg, datasets[cfg.seeds[0]])
    fingerprint = config_fingerprint(dataclasses.asdict(cfg), None)
    previous = _previous_partial(out, fingerprint, force)
    payload: dict = {
        "study": cfg.study,
        "name": cfg.name,
        "config": dataclasses.asdict(cfg),
        "config_text": config_text,
        "fingerprint": fingerprint,
        "seed": cfg.seeds[0],  # as in ``coblax run`` results; every record names its own seed
        "seeds": list(cfg.seeds),
        "versions": versions(),
        "dataset": {"name": cfg.data.name, "train": len(datasets[cfg.seeds[0]].x_train),
                    "test": len(datasets[cfg.seeds[0]].x_test)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "records": [],
        "done_seeds": [],
    }
    if previous is not None:
        done = [s for s in previous["done_seeds"] if s in cfg.seeds]
        payload["records"] = [r for r in previous["records"] if r.get("seed") in done]
        payload["done_seeds"] = done
        payload["started"] = previous.get("started", payload["started"])
        log(f"resuming {out}: seed(s) {', '.join(map(str, done)) or '(none)'} already finished with this "
            "config; skipping them")
    partial = out / PARTIAL
    with stop_on_signals() as signals, run_lock(out, log):
        try:
            for seed in cfg.seeds:
                if seed in payload["done_seeds"]:
                    continue
                recs = [{"study": cfg.study, "seed": seed} | rec
                        for rec in _RUNNERS[cfg.study](cfg, datasets[seed], seed, progress)]
                payload["records"] += recs
                payload["done_seeds"].append(seed)
                with signals.saving():
                    write_json_atomic(partial, payload)
        except RunInterrupted as err:
            err.saved = len(payload["done_seeds"]) if partial.exists() else 0
            err.partial = partial
            raise
        payload["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        payload["wall_seconds"] = time.perf_counter() - start
        write_json_atomic(out / "results.json", payload)
        partial.unlink(missing_ok=True)
    return payload


def run_study_file(config: str | Path, out: str | Path | None = None, *, force: bool = False,
                   progress: bool = True) -> dict:
    """``coblax study CONFIG [--out DIR] [--force]``: check everything, refuse to overwrite unless forced, run.

    The output folder defaults to ``runs/<config file stem>``; the returned payload
    also names the ``results_file`` written. An existing ``results.json`` is refused
    (ConfigError, exit 2) unless ``force``.
    """
    text = read_config_text(config)
    cfg = load_study_config(config)
    target = Path(out or Path("runs") / Path(config).stem) / "results.json"
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite or choose another --out")
    payload = run_study(cfg, target.parent, config_text=text, progress=progress, force=force)
    return payload | {"results_file": str(target)}


# ------------------------------------------------------------------------------ tables


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f} (n={len(values)})"


def _grouped(records: list[dict], keys: Sequence[str]) -> list[tuple[tuple, list[dict]]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(_hashable(r.get(k)) for k in keys), []).append(r)
    return list(groups.items())


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _md(headers: Sequence[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _table(records: list[dict], keys: Sequence[str], extra: Sequence[str] = (),
           metrics: Sequence[str] = ("acc",)) -> str:
    """One row per distinct ``keys``; ``extra`` columns from the first record; metrics (×100) mean ± std."""
    rows = []
    for key, group in _grouped(records, keys):
        rows.append([_fmt(v) for v in key] + [_fmt(group[0].get(e)) for e in extra]
                    + [_mean_std([g.get(m) for g in group]) for m in metrics])
    units = {"acc": "acc (%)", "acc_change": "acc change (pt)",
             "soft_off_label": "soft targets off the label (%)"}
    return _md([*keys, *extra, *(units.get(m, f"{m} (%)" if "acc" in m.split("_") else m) for m in metrics)], rows)


def format_study(payload: dict) -> str:
    """Markdown tables of a study's records (accuracies in %, mean ± std over seeds)."""
    recs = payload["records"]
    study = payload.get("study")
    title = f"### {payload.get('name') or study} ({payload.get('dataset', {}).get('name', '?')}," \
            f" seeds {', '.join(str(s) for s in payload.get('seeds', []))})"
    parts = [title]
    if study == "kd":
        parts.append(_table(recs, ["role", "temperature"], ["teacher", "student", "alpha", "params", "transfer_size"],
                            ["acc", "train_acc", "soft_off_label"]))
    elif study == "small_arch":
        parts.append(_table(recs, ["family", "variant"], ["params", "macs", "traced_macs"]))
    elif study == "svd_fc":
        parts.append(_table(recs, ["layer", "rank"], ["full_rank", "weight_reduction"], ["acc", "acc_change"]))
    elif study == "prune_quant":
        by = lambda k: [r for r in recs if r["kind"] == k]  # noqa: E731
        parts += ["Base model", _table(by("base"), ["model"], ["weights", "macs"]),
                  "Per-layer pruning (one layer pruned, no retraining)",
                  _table(by("layer_prune"), ["layer", "sparsity"], ["kept_fraction"]),
                  "Whole-network magnitude pruning",
                  _table(by("prune"), ["sparsity", "retrain"], ["kept_fraction", "mac_kept_fraction"]),
                  "Fixed point (post-training)",
                  _table(by("fixed_point"), ["word_length", "rounding"], ["il", "fl"]),
                  "k-means weight sharing / product / residual quantization (kernels only)",
                  _table(by("kmeans") + by("pq") + by("rq"), ["kind", "bits", "k", "stages"],
                         ["compression_ratio"])]
        # Newer parts: a table only when the results have its records (older results.json files lack them).
        if by("dns"):
            parts += ["Dynamic network surgery vs. magnitude pruning at DNS's per-layer kept fractions"
                      " (magnitude retrained for the same epochs)",
                      _table(by("dns"), ["sparsity", "rate"], ["epochs", "kept_fraction", "spliced"],
                             ["acc", "magnitude_acc", "magnitude_retrained_acc"])]
        if by("saliency"):
            parts += ["OBD / OBS vs. magnitude (one-shot per layer; retrained: the same masks)",
                      _table(by("saliency"), ["sparsity", "method", "retrain"], ["kept_fraction"])]
        if by("binaryconnect") or by("bnn"):
            parts += ["Binary weights (BinaryConnect, BNN), kernels only",
                      _table(by("binaryconnect") + by("bnn"), ["kind", "mode"], ["kernel_bits", "compression_ratio"],
                             ["acc", "acc_sign", "acc_real_weights"])]
        if by("kmeans_hist"):
            parts += ["k-means weight sharing of one layer, before / after centroid fine-tuning",
                      _table(by("kmeans_hist"), ["layer", "bits"], ["k", "finetune_epochs"],
                             ["acc_kmeans", "acc_finetuned"])]
    else:
        raise ValueError(f"unknown study {study!r}; valid studies: {', '.join(STUDIES)}")
    return "\n\n".join(parts)
