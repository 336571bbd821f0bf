"""Study configs: one frozen dataclass per study's table and :class:`StudyConfig` around them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coblax.app.config import (
    INT_MAX,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_model_options,
    load_toml,
    parse_dataclass,
)
from coblax.compress import prune as P
from coblax.compress import quantize as Q
from coblax.nn import train as T
from coblax.nn.models import MODEL_NAMES
from coblax.nn.small import BLOCKS

__all__ = [
    "STUDIES",
    "SALIENCY_METHODS",
    "BINARY_NORMS",
    "study_model",
    "KDConfig",
    "SmallArchConfig",
    "SVDConfig",
    "PruneQuantConfig",
    "StudyConfig",
    "load_study_config",
]

STUDIES = ("kd", "small_arch", "svd_fc", "prune_quant")
SALIENCY_METHODS = ("magnitude", "obd", "obs")
BINARY_NORMS = ("batch_norm", "none")


def study_model(value: Any, where: str) -> ModelConfig:
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
        study_model(self.teacher, f"{where}.teacher")
        study_model(self.student, f"{where}.student")
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
        study_model(self.model, f"{where}.model")
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
        study_model(self.model, f"{where}.model")
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
