"""Deep Compression as a config-driven pipeline: prune -> quantize -> Huffman -> ``.cbx``.

Stages (Han, Mao & Dally 2016, Fig. 1), each optional but in this order:

1. ``prune``: iterative magnitude pruning with retraining
   (:func:`coblax.compress.prune.iterative_magnitude_prune`);
2. ``quantize``: k-means weight sharing with 2^b centroids per layer (default b = 8
   for convolutions, 5 for dense layers, as in the paper) and centroid fine-tuning
   (:func:`coblax.compress.quantize.kmeans_codebook` per layer, :func:`coblax.compress.quantize.finetune_centroids`);
3. ``huffman``: canonical Huffman codes for the weight codes and / or the relative
   index gaps (:mod:`coblax.compress.encode`).

The result is written as ``model.cbx`` (:mod:`coblax.compress.cbx`) and a report
``compression.json`` with the per-layer table of the paper (Tables 2-5), the file
size against float32 parameters, the accuracy after every stage and an energy
estimate (:mod:`coblax.compress.energy`). The reported final accuracy is measured on the
parameters decoded from the file's bytes, so :func:`evaluate_file` reproduces it.

Entry points: :func:`run_compress` (config path -> report) and :func:`evaluate_file`.

Reference: Han, Mao & Dally (2016) "Deep Compression: Compressing Deep Neural
Networks with Pruning, Trained Quantization and Huffman Coding", ICLR.
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

from coblax.compress.cbx import (
    CbxSizeInfo,
    LeafCoding,
    decode_cbx,
    encode_cbx,
    read_cbx,
)
from coblax.util import flatten_tree, jsonable, to_numpy_tree, write_bytes_atomic
from coblax.app.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    load_toml,
    parse_dataclass,
)
from coblax.compress.encode import relative_index_encode
from coblax.compress.energy import DEFAULT_SRAM_BYTES, LayerWork, estimate_energy

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
    "run_compress",
    "evaluate_file",
    "format_compression_table",
    "compression_table",
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


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; valid values: {', '.join(allowed)}")


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
        _choice(self.scope, ("layer", "global"), f"{where}.scope")
        _choice(self.schedule, ("geometric", "linear"), f"{where}.schedule")
        _int_in(self.steps, 1, 1000, f"{where}.steps")
        _int_in(self.retrain_epochs, 0, 10_000, f"{where}.retrain_epochs")
        _int_in(self.batch_size, 1, 1 << 30, f"{where}.batch_size")
        if not self.learning_rate > 0:
            raise ConfigError(f"{where}.learning_rate = {self.learning_rate!r} must be > 0")
        _choice(self.optimizer, ("adam", "sgd", "momentum"), f"{where}.optimizer")
        if not self.weight_decay >= 0:
            raise ConfigError(f"{where}.weight_decay = {self.weight_decay!r} must be >= 0")


@dataclasses.dataclass(frozen=True)
class QuantizeStageConfig:
    """k-means weight sharing + centroid fine-tuning (Deep Compression, Sec. 3).

    Bits per layer: ``layer_bits[layer]`` if given (0 keeps that layer in float32),
    else ``bits`` if set, else ``conv_bits`` for convolutions and ``fc_bits`` for
    dense layers (the paper's 8 / 5).
    """

    bits: int | None = None
    conv_bits: int = 8
    fc_bits: int = 5
    layer_bits: dict = dataclasses.field(default_factory=dict)
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
        _choice(self.init, ("linear", "density", "random"), f"{where}.init")
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
        _choice(self.order, ("out_major", "stored"), f"{where}.order")
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

        _choice(self.model.name, MODEL_NAMES, "model.name")


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


# ------------------------------------------------------------------------------ helpers


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
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = (root / ".." / "shared" / "datasets").resolve()
        if cand.is_dir():
            return str(cand)
    return None


def _versions() -> dict[str, str]:
    from coblax.app.experiment import versions

    return versions()


def _walk_axes(ndim: int, order: str) -> tuple[int, ...] | None:
    """Axis permutation of a kernel for ``encode.order`` (see :class:`EncodeConfig`)."""
    if order == "stored" or ndim < 2:
        return None
    return (ndim - 1, ndim - 2, *range(ndim - 2))


def _kernel_path(layer: str) -> str:
    return f"params/{layer}/kernel"


def _kept(masks_by_layer: Mapping[str, np.ndarray] | None, layer: str, shape) -> np.ndarray:
    if masks_by_layer is None or layer not in masks_by_layer:
        return np.ones(shape, dtype=bool)
    return np.asarray(masks_by_layer[layer], dtype=bool)


# ------------------------------------------------------------------------------- report


def _ceil8(bits: int) -> int:
    return (bits + 7) // 8


def compression_table(
    info: CbxSizeInfo, layer_names: Mapping[str, str], n_params: int
) -> dict[str, Any]:
    """The paper's per-layer table (Tables 2-5) plus totals, from a file's size breakdown.

    Per coded layer with n weights, E stored entries (nonzeros + fillers), codebook
    size K and index width b:
      weight bits P+Q    = ceil(log2 K) (32 if not quantized); P+Q+H = Huffman bits / E
      index bits P+Q     = b;                                  P+Q+H = Huffman bits / E
      compress rate P+Q  = (32 K + E ceil(log2 K) + E b) / (32 n)
      compress rate P+Q+H = (32 K + 8 * code-length bytes + Huffman bits) / (32 n)
    The totals row sums bits over the kernels; ``file`` compares the real file
    (header, metadata, biases, CRC included) with 32 bits per parameter.
    """
    rows = []
    keys = ("weights", "kept", "entries", "w_pq", "w_pqh", "i_pq", "i_pqh", "bits_pq", "bits_pqh")
    sums = dict.fromkeys(keys, 0)
    for leaf in info.leaves:
        if leaf.kind != "coded":
            continue
        cb_bits = 8 * leaf.codebook_bytes
        wl = leaf.codebook_size if leaf.codebook_size else 0
        il = (1 << leaf.index_bits) if leaf.index_bits else 0
        bits_pq = cb_bits + leaf.weight_bits_fixed + leaf.index_bits_fixed
        bits_pqh = cb_bits + 8 * (wl + il) + leaf.weight_bits_huffman + leaf.index_bits_huffman
        if leaf.codebook_size == 0:  # unquantized values are never Huffman coded
            bits_pqh = cb_bits + 8 * il + leaf.weight_bits_fixed + leaf.index_bits_huffman
        e = max(leaf.n_entries, 1)
        rows.append(
            {
                "layer": layer_names.get(leaf.name, leaf.name),
                "weights": leaf.numel,
                "kept": leaf.nnz,
                "kept_fraction": leaf.nnz / leaf.numel,
                "entries": leaf.n_entries,
                "fillers": leaf.n_fillers,
                "codebook_size": leaf.codebook_size,
                "weight_bits_pq": leaf.weight_width,
                "weight_bits_pqh": leaf.weight_bits_huffman / e,
                "index_bits_pq": leaf.index_bits,
                "index_bits_pqh": leaf.index_bits_huffman / e if leaf.index_bits else 0.0,
                "compress_rate_pq": bits_pq / (32 * leaf.numel),
                "compress_rate_pqh": bits_pqh / (32 * leaf.numel),
                "huffman_weights": leaf.huffman_weights,
                "huffman_index": leaf.huffman_index,
            }
        )
        for key, val in (("weights", leaf.numel), ("kept", leaf.nnz), ("entries", leaf.n_entries),
                         ("w_pq", leaf.weight_bits_fixed), ("w_pqh", leaf.weight_bits_huffman),
                         ("i_pq", leaf.index_bits_fixed), ("i_pqh", leaf.index_bits_huffman),
                         ("bits_pq", bits_pq), ("bits_pqh", bits_pqh)):
            sums[key] += val
    # What the file would weigh with fixed-width codes only (P+Q) and with Huffman
    # on every stream that can take it (P+Q+H); the table section is the same.
    pq_bytes = pqh_bytes = info.total_bytes
    for leaf in info.leaves:
        if leaf.kind != "coded":
            continue
        actual = (
            leaf.code_length_bytes
            + _ceil8(leaf.weight_stream_bits)
            + _ceil8(leaf.index_stream_bits)
        )
        pq_bytes += _ceil8(leaf.weight_bits_fixed) + _ceil8(leaf.index_bits_fixed) - actual
        w_h = leaf.weight_bits_huffman if leaf.codebook_size else leaf.weight_bits_fixed
        lens = leaf.codebook_size + ((1 << leaf.index_bits) if leaf.index_bits else 0)
        pqh_bytes += lens + _ceil8(w_h) + _ceil8(leaf.index_bits_huffman) - actual
    e = max(sums["entries"], 1)
    original = 4 * n_params
    totals = {
        "weights": sums["weights"],
        "kept": sums["kept"],
        "kept_fraction": sums["kept"] / max(sums["weights"], 1),
        "prune_rate": sums["weights"] / max(sums["kept"], 1),
        "weight_bits_pq": sums["w_pq"] / e,
        "weight_bits_pqh": sums["w_pqh"] / e,
        "index_bits_pq": sums["i_pq"] / e,
        "index_bits_pqh": sums["i_pqh"] / e,
        "compress_rate_pq": sums["bits_pq"] / (32 * max(sums["weights"], 1)),
        "compress_rate_pqh": sums["bits_pqh"] / (32 * max(sums["weights"], 1)),
    }
    file = {
        "bytes": info.total_bytes,
        "original_bytes": original,
        "params": n_params,
        "compression": original / info.total_bytes,
        "bytes_pq": pq_bytes,
        "compression_pq": original / pq_bytes,
        "bytes_pqh": pqh_bytes,
        "compression_pqh": original / pqh_bytes,
        "sections": {
            "header": info.header_bytes,
            "metadata": info.meta_bytes,
            "table": info.table_bytes,
            "payload": info.payload_bytes,
            "crc": info.crc_bytes,
            "raw_leaves": sum(leaf.raw_bytes for leaf in info.leaves),
        },
    }
    return {"layers": rows, "totals": totals, "file": file}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def format_compression_table(report: Mapping[str, Any]) -> str:
    """Markdown table in the form of Deep Compression's Tables 2-5, plus file and accuracy lines."""
    lines = [
        f"### {report.get('name') or 'deep compression'} — {report['model']['name']} "
        f"on {report['dataset']['name']}",
        "",
        "| layer | #weights | weights % (P) | weight bits (P+Q) | weight bits (P+Q+H) "
        "| index bits (P+Q) | index bits (P+Q+H) | compress rate (P+Q) "
        "| compress rate (P+Q+H) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["layers"]:
        lines.append(
            f"| {r['layer']} | {r['weights']:,} | {_pct(r['kept_fraction'])} "
            f"| {r['weight_bits_pq']} | {r['weight_bits_pqh']:.2f} "
            f"| {r['index_bits_pq']} | {r['index_bits_pqh']:.2f} "
            f"| {_pct(r['compress_rate_pq'])} | {_pct(r['compress_rate_pqh'])} |"
        )
    t = report["totals"]
    lines.append(
        f"| total | {t['weights']:,} | {_pct(t['kept_fraction'])} ({t['prune_rate']:.0f}×) "
        f"| {t['weight_bits_pq']:.2f} | {t['weight_bits_pqh']:.2f} | {t['index_bits_pq']:.2f} "
        f"| {t['index_bits_pqh']:.2f} "
        f"| {_pct(t['compress_rate_pq'])} ({1 / t['compress_rate_pq']:.0f}×) "
        f"| {_pct(t['compress_rate_pqh'])} ({1 / t['compress_rate_pqh']:.0f}×) |"
    )
    f = report["file"]
    acc = report["accuracy"]
    lines += [
        "",
        f"File: {f['bytes']:,} bytes vs {f['original_bytes']:,} bytes of float32 parameters "
        f"→ {f['compression']:.1f}× (fixed-width codes only: {f['compression_pq']:.1f}×).",
        "Accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items() if v is not None)
        + f" (loss {report['accuracy_loss_pt']:+.2f} pt).",
    ]
    if "energy" in report:
        e = report["energy"]
        lines.append(
            f"Energy per inference (estimate): {e['original']['total_pj'] / 1e6:.3f} µJ → "
            f"{e['compressed']['total_pj'] / 1e6:.3f} µJ ({e['ratio']:.1f}× less)."
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pipeline


def _layers(model: Any, params: Any, example: np.ndarray) -> dict[str, Any]:
    from coblax.lowrank.decompose import trace_layers

    return {layer.name: layer for layer in trace_layers(model, params, jnp.asarray(example[:1]))}


def _check_layer_keys(table: Mapping[str, Any], names: list[str], key: str) -> None:
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ConfigError(
            f"{key} names unknown layers {unknown}; the model's layers: {', '.join(names)}"
        )


def _needs_zero_code(
    mask: np.ndarray, index_bits: int | None, axes: tuple[int, ...] | None
) -> bool:
    """Whether the stored entries of a layer include zeros (fillers or dense zeros)."""
    if index_bits is None:
        return not bool(np.all(mask))
    walked = mask if axes is None else np.transpose(mask, axes)
    return relative_index_encode(walked.ravel().astype(np.int8), index_bits).n_fillers > 0


def _share_weights(
    params, bits_by_layer, masks_by_layer, index_bits_by_layer, *, order, init, iters, seed
):
    """k-means weight sharing in which every layer's codes fit its bit width.

    Like :func:`coblax.compress.quantize.kmeans_share` (same k-means, same seeds), except
    that a layer whose stored entries include zeros -- Deep Compression's filler
    entries, or pruned weights in a dense layout -- gets k = 2^b - 1 centroids, so
    that 0.0 is the 2^b-th shared value and every code still fits in b bits.
    """
    from coblax.compress import prune as P
    from coblax.compress import quantize as Q

    kernels = P.kernels(params)
    codebooks, indices, stats, new = {}, {}, {}, {}
    for i, (n, b) in enumerate(bits_by_layer.items()):
        w = np.asarray(kernels[n])
        m = _kept(masks_by_layer, n, w.shape)
        kept = int(m.sum())
        if kept == 0:
            continue
        bi = None if index_bits_by_layer is None else index_bits_by_layer[n]
        k = 2**b - (1 if _needs_zero_code(m, bi, _walk_axes(w.ndim, order)) else 0)
        if k > kept or k < 1:
            raise ValueError(
                f"quantize: layer {n!r} keeps {kept} weights, fewer than the k = {k} centroids of "
                f"{b}-bit codes; lower quantize.bits or set quantize.layer_bits.{n} to at most "
                f"{max(kept.bit_length() - 1, 1)}"
            )
        c, idx, info = Q.kmeans_codebook(w, k, init=init, mask=m, iters=iters, seed=seed + i)
        codebooks[n], indices[n] = c, idx
        new[n] = np.where(m, c[idx], np.float32(0)).astype(np.float32)
        stats[n] = Q.LayerCodebook(bits=b, k=k, n_weights=int(w.size), n_kept=kept,
                                   objective_init=info.objective_init, objective=info.objective)
    return P.replace_kernels(params, new), codebooks, indices, Q.WeightSharingReport(stats, init)


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
    from coblax.compress import prune as P
    from coblax.compress import quantize as Q
    from coblax.nn import train as T
    from coblax.app.config import RunConfig
    from coblax.nn.data import load_dataset
    from coblax.app.experiment import default_cache_dir, train_base_model

    t0 = time.time()
    config_path = Path(config_path)
    cfg = load_compress_config(config_path, overrides)
    out_dir = Path(out_dir)
    data = load_dataset(cfg.data.name, resolve_data_dir(cfg.data.dir), seed=cfg.seed,
                        limit_train=cfg.data.limit_train, limit_test=cfg.data.limit_test)
    run_cfg = RunConfig(seed=cfg.seed, models=(cfg.model,), data=cfg.data, train=cfg.train)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    base = train_base_model(run_cfg, cfg.model, data, cache_dir, progress)
    model, params = base.model, base.params
    apply_fn = model.apply
    layers = _layers(model, params, data.x_train)
    names = list(P.kernels(params))
    kinds = {n: layers[n].kind if n in layers else ("conv" if np.ndim(k) == 4 else "dense")
             for n, k in P.kernels(params).items()}
    if isinstance(cfg.prune.sparsity, dict):
        _check_layer_keys(cfg.prune.sparsity, names, "prune.sparsity")
    _check_layer_keys(cfg.quantize.layer_bits, names, "quantize.layer_bits")
    _check_layer_keys(cfg.encode.layer_index_bits, names, "encode.layer_index_bits")
    evaluate = lambda p: T.evaluate(apply_fn, p, data.x_test, data.y_test)  # noqa: E731
    accuracy: dict[str, float | None] = {"base": base.accuracy}
    stage_reports: dict[str, Any] = {}
    timings: dict[str, float] = {"base": time.time() - t0}

    masks_by_layer: dict[str, np.ndarray] | None = None
    if "prune" in cfg.stages:
        t = time.time()
        pc = cfg.prune
        tx = T.make_optimizer(pc.optimizer, pc.learning_rate)
        if pc.weight_decay > 0:
            tx = optax.chain(optax.add_decayed_weights(pc.weight_decay), tx)
        params, masks, prep = P.iterative_magnitude_prune(
            apply_fn, params, data.x_train, data.y_train,
            sparsity=pc.sparsity, steps=pc.steps, retrain_epochs=pc.retrain_epochs, scope=pc.scope,
            schedule=pc.schedule,
            train_kwargs={"optimizer": tx, "batch_size": pc.batch_size,
                          "seed": cfg.seed, "progress": progress, "desc": "prune+retrain"},
        )
        masks_by_layer = P.layer_masks(masks)
        accuracy["pruned"] = evaluate(params)
        stage_reports["prune"] = prep.to_dict()
        timings["prune"] = time.time() - t

    codebooks: dict[str, np.ndarray] = {}
    bits_by_layer: dict[str, int] = {}
    if "quantize" in cfg.stages:
        t = time.time()
        qc = cfg.quantize
        bits_by_layer = {n: qc.layer_bit_width(n, kinds[n]) for n in names}
        bits_by_layer = {n: b for n, b in bits_by_layer.items() if b > 0}
        index_bits = {n: cfg.encode.layer_index_bits.get(n, cfg.encode.index_bits) for n in names}
        params, codebooks, indices, qrep = _share_weights(
            params, bits_by_layer, masks_by_layer, index_bits if "prune" in cfg.stages else None,
            order=cfg.encode.order, init=qc.init, iters=qc.iters, seed=cfg.seed,
        )
        accuracy["quantized"] = evaluate(params)
        if qc.finetune_epochs > 0:
            params, codebooks = Q.finetune_centroids(
                apply_fn, params, codebooks, indices, masks_by_layer, data.x_train, data.y_train,
                epochs=qc.finetune_epochs, learning_rate=qc.learning_rate, batch_size=qc.batch_size,
                seed=cfg.seed, progress=progress,
            )
        # Rebuild every shared kernel from (codebook, indices, mask) so that its values
        # are exactly the float32 centroids the file stores.
        rebuilt = {}
        for n, idx in indices.items():
            idx = np.asarray(idx)
            values = np.asarray(codebooks[n], np.float32)[idx]
            rebuilt[n] = np.where(_kept(masks_by_layer, n, idx.shape), values, np.float32(0))
        params = P.replace_kernels(params, rebuilt)
        stage_reports["quantize"] = qrep.to_dict() | {"bits": bits_by_layer}
        if qc.finetune_epochs > 0:
            accuracy["finetuned"] = evaluate(params)
        timings["quantize"] = time.time() - t

    # ---- encode
    huff = "huffman" in cfg.stages
    pruned = "prune" in cfg.stages
    coding = {}
    kernels_now = P.kernels(params)
    for n in names:
        cb = codebooks.get(n)
        b = cfg.encode.layer_index_bits.get(n, cfg.encode.index_bits) if pruned else 0
        coding[_kernel_path(n)] = LeafCoding(
            codebook=cb,
            index_bits=b,
            huffman_weights=huff and cfg.huffman.weights and cb is not None,
            huffman_index=huff and cfg.huffman.index and b > 0,
            axes=_walk_axes(np.ndim(kernels_now[n]), cfg.encode.order),
        )
    np_params = to_numpy_tree(params)
    meta = {
        "format": "coblax deep compression",
        "name": cfg.name or config_path.stem,
        "model": {"name": cfg.model.name, "options": dict(cfg.model.options)},
        "input_shape": list(data.input_shape),
        "num_classes": int(data.num_classes),
        "dataset": {"name": cfg.data.name, "limit_test": cfg.data.limit_test, "seed": cfg.seed},
        "stages": list(cfg.stages),
    }
    blob, info = encode_cbx(np_params, coding, meta)
    decoded, _ = decode_cbx(blob)
    accuracy["file"] = evaluate(decoded)
    n_params = sum(int(np.size(v)) for v in flatten_tree(np_params).values())
    table = compression_table(info, {_kernel_path(n): n for n in names}, n_params)

    works = []
    for n in names:
        if n not in layers:
            continue
        leaf = info.leaf(_kernel_path(n))
        works.append(LayerWork(n, macs=int(layers[n].macs), weights=leaf.numel, nonzeros=leaf.nnz,
                               weight_bits=bits_by_layer.get(n, 32)))
    energy = estimate_energy(
        works, original_bits=32 * n_params, compressed_bits=8 * info.total_bytes,
        sram_bytes=cfg.energy.sram_bytes,
    )
    report = {
        "name": meta["name"],
        "config": jsonable(dataclasses.asdict(cfg)),
        "config_text": config_path.read_text(),
        "overrides": jsonable(overrides or {}),
        "seed": cfg.seed,
        "versions": _versions(),
        "model": meta["model"],
        "dataset": {
            "name": data.name, "train": int(len(data.x_train)), "test": int(len(data.x_test))
        },
        "stages": list(cfg.stages),
        "base_cached": bool(base.cached),
        **table,
        "accuracy": accuracy,
        "accuracy_loss_pt": 100 * (accuracy["base"] - accuracy["file"]),
        "energy": energy.to_dict(),
        "stage_reports": stage_reports,
        "timings_s": timings | {"total": time.time() - t0},
        "files": {"model": "model.cbx", "report": "compression.json"},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / "model.cbx", blob)
    write_bytes_atomic(out_dir / "compression.json", json.dumps(jsonable(report), indent=1).encode())
    return jsonable(report)


def evaluate_file(
    path: str | os.PathLike, data_dir: str | os.PathLike | None = None
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
        raise ValueError(
            f"{path}: the model expects inputs {meta['input_shape']} with "
            f"{meta['num_classes']} classes, "
            f"dataset {ds['name']!r} has {list(data.input_shape)} with {data.num_classes}"
        )
    model = build_model(
        meta["model"]["name"], num_classes=int(meta["num_classes"]),
        input_shape=tuple(meta["input_shape"]), **dict(meta["model"].get("options", {})),
    )
    acc = T.evaluate(model.apply, params, data.x_test, data.y_test)
    n_params = sum(int(np.size(v)) for v in flatten_tree(params).values())
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
