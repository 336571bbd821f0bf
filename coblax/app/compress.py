"""``coblax compress`` / ``coblax evaluate``: config -> Deep Compression stages -> files.

Glue only: the config dataclasses and their validation, then :func:`run_compress`
builds the stages of :mod:`coblax.compress.pipeline` from a config, runs them on the
base model (``coblax.app.experiment.train_base_model``) and writes ``model.cbx`` and
``compression.json``; :func:`evaluate_file` decodes a file and measures it.
Every key is documented in ``docs/compression.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coblax.app.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_toml,
    parse_dataclass,
)
from coblax.compress import prune as P
from coblax.compress.cbx import CbxError, read_cbx
from coblax.compress.energy import DEFAULT_SRAM_BYTES
from coblax.compress.pipeline import (
    CompressState,
    EncodeStage,
    EnergyStage,
    PruneStage,
    QuantizeStage,
    Training,
    chain,
)
from coblax.util import flatten_tree, jsonable, write_bytes_atomic
from coblax.util.schema import check_choice

__all__ = [
    "STAGES",
    "PruneStageConfig",
    "QuantizeStageConfig",
    "HuffmanStageConfig",
    "EncodeConfig",
    "EnergyConfig",
    "CompressConfig",
    "load_compress_config",
    "parse_compress_config",
    "build_stages",
    "run_compress",
    "evaluate_file",
    "resolve_data_dir",
]

STAGES = ("prune", "quantize", "huffman")
_MAX_BITS = 16  # widest codebook index the .cbx format stores


def _fraction(value: Any, key: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{key} = {value!r} must be a number in [0, 1)")


def _int_in(value: Any, lo: int, hi: int, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{key} = {value!r} must be an integer in [{lo}, {hi}]")


@dataclasses.dataclass(frozen=True)
class PruneStageConfig:
    """Iterative magnitude pruning (Han et al. 2015).

    ``sparsity``: fraction of each layer's weights pruned (a number, or a table
    ``{layer: fraction}``, missing layers unpruned); with ``scope = "global"`` one
    threshold over all kernels. ``steps`` prune/retrain rounds on a ``schedule``.
    ``weight_decay`` adds the L2 gradient lambda * w before the optimizer while
    retraining (Han et al. 2015, Sec. 3.1): weights that get no gradient from the
    loss -- e.g. those of input pixels that are always 0 -- then shrink to 0 and
    are pruned in the next round instead of surviving on their initial values.
    """

    sparsity: float | dict = 0.9
    scope: str = "layer"
    steps: int = 3
    retrain_epochs: int = 2
    schedule: str = "geometric"
    learning_rate: float = 1e-3
    batch_size: int = 128
    optimizer: str = "adam"
    weight_decay: float = 0.0

    def validate(self, where: str) -> None:
        if isinstance(self.sparsity, dict):
            if self.scope == "global":
                raise ConfigError(f"{where}.sparsity must be one number with scope = 'global'")
            for layer, s in self.sparsity.items():
                _fraction(s, f"{where}.sparsity.{layer}")
        else:
            _fraction(self.sparsity, f"{where}.sparsity")
        check_choice(self.scope, ("layer", "global"), f"{where}.scope")
        check_choice(self.schedule, ("geometric", "linear"), f"{where}.schedule")
        _int_in(self.steps, 1, 1000, f"{where}.steps")
        _int_in(self.retrain_epochs, 0, 10_000, f"{where}.retrain_epochs")
        _int_in(self.batch_size, 1, 1 << 30, f"{where}.batch_size")
        if not self.learning_rate > 0:
            raise ConfigError(f"{where}.learning_rate = {self.learning_rate!r} must be > 0")
        check_choice(self.optimizer, ("adam", "sgd", "momentum"), f"{where}.optimizer")
        if not self.weight_decay >= 0:
            raise ConfigError(f"{where}.weight_decay = {self.weight_decay!r} must be >= 0")


@dataclasses.dataclass(frozen=True)
class QuantizeStageConfig:
    """k-means weight sharing + centroid fine-tuning (Deep Compression, Sec. 3).

    Bits per layer: ``layer_bits[layer]`` if given (0 keeps that layer in float32),
    else ``bits`` if set, else ``conv_bits`` for convolutions and ``fc_bits`` for
    dense layers (the paper's 8 / 5). ``bias_bits`` > 0 shares every bias vector
    the same way (2^b values, fine-tuned with the kernels); 0 keeps biases float32.
    """

    bits: int | None = None
    conv_bits: int = 8
    fc_bits: int = 5
    layer_bits: dict = dataclasses.field(default_factory=dict)
    bias_bits: int = 0
    init: str = "linear"
    iters: int = 50
    finetune_epochs: int = 1
    learning_rate: float = 1e-4
    batch_size: int = 128

    def validate(self, where: str) -> None:
        if self.bits is not None:
            _int_in(self.bits, 1, _MAX_BITS, f"{where}.bits")
        _int_in(self.conv_bits, 1, _MAX_BITS, f"{where}.conv_bits")
        _int_in(self.fc_bits, 1, _MAX_BITS, f"{where}.fc_bits")
        for layer, b in self.layer_bits.items():
            _int_in(b, 0, _MAX_BITS, f"{where}.layer_bits.{layer}")
        _int_in(self.bias_bits, 0, _MAX_BITS, f"{where}.bias_bits")
        check_choice(self.init, ("linear", "density", "random"), f"{where}.init")
        _int_in(self.iters, 0, 100_000, f"{where}.iters")
        _int_in(self.finetune_epochs, 0, 10_000, f"{where}.finetune_epochs")
        _int_in(self.batch_size, 1, 1 << 30, f"{where}.batch_size")
        if not self.learning_rate > 0:
            raise ConfigError(f"{where}.learning_rate = {self.learning_rate!r} must be > 0")

    def layer_bit_width(self, layer: str, kind: str) -> int:
        if layer in self.layer_bits:
            return int(self.layer_bits[layer])
        if self.bits is not None:
            return self.bits
        return self.conv_bits if kind == "conv" else self.fc_bits


@dataclasses.dataclass(frozen=True)
class HuffmanStageConfig:
    """Which streams the ``huffman`` stage codes: the weight codes, the index gaps."""

    weights: bool = True
    index: bool = True


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """Relative sparse index width b (gaps of up to 2^b - 1 zeros; fillers beyond).

    ``order``: ``"out_major"`` walks each kernel one output unit at a time, in
    Caffe's (out, in[, kh, kw]) layout that Deep Compression coded; the gaps then
    follow the input layout (dead input pixels make long, cheap runs).
    ``"stored"`` walks flax's (in, out) / (kh, kw, in, out) layout as stored.
    """

    index_bits: int = 5
    layer_index_bits: dict = dataclasses.field(default_factory=dict)
    order: str = "out_major"

    def validate(self, where: str) -> None:
        check_choice(self.order, ("out_major", "stored"), f"{where}.order")
        _int_in(self.index_bits, 1, 16, f"{where}.index_bits")
        for layer, b in self.layer_index_bits.items():
            _int_in(b, 1, 16, f"{where}.layer_index_bits.{layer}")


@dataclasses.dataclass(frozen=True)
class EnergyConfig:
    """On-chip memory size of the energy model: weights that fit are read from SRAM."""

    sram_bytes: int = DEFAULT_SRAM_BYTES

    def validate(self, where: str) -> None:
        _int_in(self.sram_bytes, 0, 1 << 50, f"{where}.sram_bytes")


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """A ``coblax compress`` run: base model, then ``stages`` in order, then the file."""

    name: str = ""
    seed: int = 0
    stages: tuple[str, ...] = STAGES
    model: ModelConfig = ModelConfig("lenet_300_100")
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneStageConfig = PruneStageConfig()
    quantize: QuantizeStageConfig = QuantizeStageConfig()
    huffman: HuffmanStageConfig = HuffmanStageConfig()
    encode: EncodeConfig = EncodeConfig()
    energy: EnergyConfig = EnergyConfig()
    cache_dir: str | None = None

    def validate(self, where: str) -> None:
        for s in self.stages:
            if s not in STAGES:
                raise ConfigError(f"stages: unknown stage {s!r}; valid stages: {', '.join(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages: a stage is listed twice in {list(self.stages)}")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(order):
            raise ConfigError(
                f"stages must keep the order {' -> '.join(STAGES)}, got {list(self.stages)}"
            )
        from coblax.nn.models import MODEL_NAMES

        check_choice(self.model.name, MODEL_NAMES, "model.name")


def _deep_merge(base: dict, over: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in over.items():
        nested = isinstance(v, Mapping) and isinstance(out.get(k), dict)
        out[k] = _deep_merge(out[k], v) if nested else v
    return out


def parse_compress_config(raw: Mapping[str, Any]) -> CompressConfig:
    """Validate a config dict (TOML contents) into a :class:`CompressConfig`.

    ``[model]`` holds ``name`` and the model's own options (``hidden = [...]``), or
    an explicit ``options`` table.
    """
    raw = copy.deepcopy(dict(raw))
    model = raw.get("model")
    if isinstance(model, str):
        raw["model"] = {"name": model}
    elif isinstance(model, dict) and "options" not in model:
        if "name" not in model:
            raise ConfigError("model needs a name")
        options = {k: v for k, v in model.items() if k != "name"}
        raw["model"] = {"name": model["name"], "options": options}
    return parse_dataclass(CompressConfig, raw)


def load_compress_config(
    path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
) -> CompressConfig:
    """Read a TOML config (deep-merged with ``overrides``) and validate it."""
    raw = load_toml(path)
    if overrides:
        raw = _deep_merge(raw, overrides)
    return parse_compress_config(raw)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str | None:
    """The data directory: ``data_dir``, else ``$COBLAX_DATA``, else ``../shared/datasets``.

    The relative default is tried from the working directory, then from the
    repository root (the folder above the ``coblax`` package). None if none exists
    (``load_dataset`` then explains what is missing).
    """
    if data_dir:
        return str(data_dir)
    if os.environ.get("COBLAX_DATA"):
        return os.environ["COBLAX_DATA"]
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        cand = (root / ".." / "shared" / "datasets").resolve()
        if cand.is_dir():
            return str(cand)
    return None


def _check_layer_keys(table: Mapping[str, Any], names: list[str], key: str) -> None:
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ConfigError(
            f"{key} names unknown layers {unknown}; the model's layers: {', '.join(names)}"
        )


def build_stages(
    cfg: CompressConfig,
    apply_fn: Any,
    data: Any,
    kinds: Mapping[str, str],
    macs: Mapping[str, int],
    *,
    meta: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> list:
    """The stage objects of a config, in order (see :mod:`coblax.compress.pipeline`).

    ``kinds``: ``{layer: "conv" | "dense"}`` of every kernel (for the default bit
    widths); ``macs``: dense MACs per example of each layer (energy estimate).
    """
    from coblax.nn import train as T

    names = list(kinds)
    if isinstance(cfg.prune.sparsity, dict):
        _check_layer_keys(cfg.prune.sparsity, names, "prune.sparsity")
    _check_layer_keys(cfg.quantize.layer_bits, names, "quantize.layer_bits")
    _check_layer_keys(cfg.encode.layer_index_bits, names, "encode.layer_index_bits")
    evaluate = lambda p: T.evaluate(apply_fn, p, data.x_test, data.y_test)  # noqa: E731
    index_bits = {n: cfg.encode.layer_index_bits.get(n, cfg.encode.index_bits) for n in names}
    stages: list = []
    if "prune" in cfg.stages:
        pc = cfg.prune
        tx = T.make_optimizer(pc.optimizer, pc.learning_rate)
        if pc.weight_decay > 0:
            tx = optax.chain(optax.add_decayed_weights(pc.weight_decay), tx)
        training = Training(apply_fn, data.x_train, data.y_train, learning_rate=pc.learning_rate,
                            batch_size=pc.batch_size, seed=cfg.seed, progress=progress,
                            evaluate=evaluate)
        stages.append(PruneStage(
            training, pc.sparsity, steps=pc.steps, retrain_epochs=pc.retrain_epochs,
            scope=pc.scope, schedule=pc.schedule, optimizer=tx,
        ))
    if "quantize" in cfg.stages:
        qc = cfg.quantize
        training = Training(apply_fn, data.x_train, data.y_train, learning_rate=qc.learning_rate,
                            batch_size=qc.batch_size, seed=cfg.seed, progress=progress,
                            evaluate=evaluate)
        stages.append(QuantizeStage(
            training, bits={n: qc.layer_bit_width(n, kinds[n]) for n in names},
            bias_bits=qc.bias_bits, index_bits=index_bits, order=cfg.encode.order,
            init=qc.init, iters=qc.iters, finetune_epochs=qc.finetune_epochs,
        ))
    huff = "huffman" in cfg.stages
    stages.append(EncodeStage(
        index_bits, huffman_weights=huff and cfg.huffman.weights,
        huffman_index=huff and cfg.huffman.index, order=cfg.encode.order, meta=meta,
        evaluate=evaluate,
    ))
    stages.append(EnergyStage(macs, sram_bytes=cfg.energy.sram_bytes))
    return stages


def run_compress(
    config_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a Deep Compression config; write ``out_dir/model.cbx`` and ``out_dir/compression.json``.

    Args:
      config_path: TOML file (see ``docs/compression.md`` for every key).
      out_dir: output directory (created; existing files of the same names are
        replaced atomically, nothing is written if any step fails).
      overrides: dict deep-merged into the TOML before validation (tests, sweeps).
      progress: show training progress bars.

    Returns:
      The report written to ``compression.json``.
    """
    from coblax.app.experiment import default_cache_dir, train_base_model, versions
    from coblax.lowrank.decompose import trace_layers
    from coblax.nn.data import load_dataset

    t0 = time.time()
    config_path = Path(config_path)
    cfg = load_compress_config(config_path, overrides)
    data = load_dataset(cfg.data.name, resolve_data_dir(cfg.data.dir), seed=cfg.seed,
                        limit_train=cfg.data.limit_train, limit_test=cfg.data.limit_test)
    run_cfg = RunConfig(seed=cfg.seed, models=(cfg.model,), data=cfg.data, train=cfg.train)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    base = train_base_model(run_cfg, cfg.model, data, cache_dir, progress)
    traced = {layer.name: layer
              for layer in trace_layers(base.model, base.params, jnp.asarray(data.x_train[:1]))}
    kinds = {n: traced[n].kind if n in traced else ("conv" if np.ndim(k) == 4 else "dense")
             for n, k in P.kernels(base.params).items()}
    meta = {
        "name": cfg.name or config_path.stem,
        "model": {"name": cfg.model.name, "options": dict(cfg.model.options)},
        "input_shape": list(data.input_shape),
        "num_classes": int(data.num_classes),
        "dataset": {"name": cfg.data.name, "limit_test": cfg.data.limit_test, "seed": cfg.seed},
    }
    stages = build_stages(cfg, base.model.apply, data, kinds,
                          {n: int(layer.macs) for n, layer in traced.items()},
                          meta=meta, progress=progress)
    timings = {"base": time.time() - t0}
    state = CompressState(accuracy={"base": base.accuracy})
    _, state, reports = chain(*stages)(base.params, state)
    table = reports.pop("encode")
    energy = reports.pop("energy")
    accuracy = dict(state.accuracy)
    report = {
        "name": meta["name"],
        "config": jsonable(dataclasses.asdict(cfg)),
        "config_text": config_path.read_text(),
        "overrides": jsonable(overrides or {}),
        "seed": cfg.seed,
        "versions": versions(),
        "model": meta["model"],
        "dataset": {
            "name": data.name, "train": int(len(data.x_train)), "test": int(len(data.x_test))
        },
        "stages": list(cfg.stages),
        "base_cached": bool(base.cached),
        **{k: v for k, v in table.items() if k != "seconds"},
        "accuracy": accuracy,
        "accuracy_loss_pt": 100 * (accuracy["base"] - accuracy["file"]),
        "energy": {k: v for k, v in energy.items() if k != "seconds"},
        "stage_reports": {k: {kk: vv for kk, vv in v.items() if kk != "seconds"}
                          for k, v in reports.items()},
        "timings_s": timings | {k: v["seconds"] for k, v in reports.items()}
        | {"encode": table["seconds"], "total": time.time() - t0},
        "files": {"model": "model.cbx", "report": "compression.json"},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / "model.cbx", state.blob)
    text = json.dumps(jsonable(report), indent=1)
    write_bytes_atomic(out_dir / "compression.json", text.encode())
    return jsonable(report)


def evaluate_file(
    path: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, batch_size: int = 1000
) -> dict[str, Any]:
    """Decode a ``.cbx`` file, rebuild its model and measure test accuracy.

    The model and the test split come from the file's metadata (model name and
    options, number of classes, dataset name, test subset); ``data_dir`` (else
    ``$COBLAX_DATA``, else ``../shared/datasets``) locates file datasets.

    Returns:
      dict with accuracy, file size, number of parameters and the compression
      against float32 parameters.
    """
    from coblax.nn import train as T
    from coblax.nn.data import load_dataset
    from coblax.nn.models import build_model

    path = Path(path)
    params, meta = read_cbx(path)
    for key in ("model", "num_classes", "input_shape", "dataset"):
        if key not in meta:
            raise ValueError(
                f"{path}: metadata lacks {key!r}; this .cbx file was not written by coblax "
                "compress"
            )
    ds = meta["dataset"]
    data = load_dataset(ds["name"], resolve_data_dir(data_dir), seed=int(ds.get("seed", 0)),
                        limit_test=ds.get("limit_test"))
    same_shape = list(data.input_shape) == list(meta["input_shape"])
    if not same_shape or data.num_classes != meta["num_classes"]:
        raise CbxError(
            f"{path}: the model expects inputs {meta['input_shape']} with "
            f"{meta['num_classes']} classes, "
            f"dataset {ds['name']!r} has {list(data.input_shape)} with {data.num_classes}"
        )
    model = build_model(
        meta["model"]["name"], num_classes=int(meta["num_classes"]),
        input_shape=tuple(meta["input_shape"]), **dict(meta["model"].get("options", {})),
    )
    n_params = sum(int(np.size(v)) for v in flatten_tree(params).values())
    # Once on the device for every batch (on the CPU the aligned decoded buffers are
    # wrapped, not copied); NumPy leaves would be copied again for each batch.
    params = jax.device_put(params)
    acc = T.evaluate(model.apply, params, data.x_test, data.y_test, batch_size=batch_size)
    size = path.stat().st_size
    return {
        "file": str(path),
        "accuracy": acc,
        "n_test": int(len(data.x_test)),
        "dataset": ds["name"],
        "model": meta["model"],
        "file_bytes": size,
        "params": n_params,
        "original_bytes": 4 * n_params,
        "compression": 4 * n_params / size,
    }
