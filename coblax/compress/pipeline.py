"""Deep Compression as a chain of stages: prune -> quantize -> encode (Huffman) -> energy.

Every stage has one interface, ``stage(params, state) -> (params, state, report)``,
and :func:`chain` composes stages like ``optax.chain`` (Han, Mao & Dally 2016, Fig. 1):

1. :class:`PruneStage`: iterative magnitude pruning with retraining
   (:func:`coblax.compress.prune.iterative_magnitude_prune`, masks held by
   :func:`coblax.compress.transforms.keep_pruned`);
2. :class:`QuantizeStage`: k-means weight sharing with 2^b centroids per layer
   (:func:`coblax.compress.quantize.kmeans_codebook`), optionally of the biases too,
   then centroid fine-tuning with :func:`coblax.compress.transforms.share_by_cluster`
   before the optimizer and ``keep_pruned`` after it (paper Eq. 3);
3. :class:`EncodeStage`: relative sparse index, canonical Huffman codes for the
   weight codes and / or the index gaps, the bit-packed ``.cbx`` bytes
   (:mod:`coblax.compress.cbx`) and the per-layer table of the paper (Tables 2-5);
   the params it returns are those decoded from the bytes;
4. :class:`EnergyStage`: energy estimate of the file (:mod:`coblax.compress.energy`).

The :class:`CompressState` carries what a later stage needs from an earlier one
(masks, codebooks, code indices, accuracies, the file bytes). Nothing here reads a
config or a dataset from disk: ``coblax.app.compress.run_compress`` builds the stages
from a TOML config and runs them.

The accounting of the written file (the paper's per-layer table) is
:mod:`coblax.compress.accounting`; :func:`compression_table` and
:func:`format_compression_table` are re-exported here.

Reference: Han, Mao & Dally (2016) "Deep Compression: Compressing Deep Neural
Networks with Pruning, Trained Quantization and Huffman Coding", ICLR.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
import optax

from coblax.compress import prune as P
from coblax.compress import quantize as Q
from coblax.compress.accounting import compression_table, format_compression_table
from coblax.compress.cbx import CbxSizeInfo, LeafCoding, decode_cbx, encode_cbx
from coblax.compress.encode import relative_index_encode
from coblax.compress.energy import DEFAULT_SRAM_BYTES, LayerWork, estimate_energy
from coblax.util import flatten_tree, to_numpy_tree

__all__ = [
    "CompressState",
    "Stage",
    "Training",
    "chain",
    "PruneStage",
    "QuantizeStage",
    "EncodeStage",
    "EnergyStage",
    "kernel_path",
    "bias_path",
    "compression_table",
    "format_compression_table",
    "walk_axes",
    "needs_zero_code",
]

Params = Any
Evaluate = Callable[[Params], float]


class CompressState(NamedTuple):
    """What the stages pass on. Never mutated: a stage returns ``state._replace(...)``.

    Attributes:
      masks: ``{layer: bool keep-mask}`` once pruned, else None.
      codebooks: ``{leaf path: float32 centroids}`` of the shared leaves.
      indices: ``{leaf path: int32 code per element}`` (0 at pruned positions).
      bits: ``{leaf path: code width b}`` of the shared leaves.
      accuracy: ``{label: accuracy}`` measured after the stages ran.
      blob: the ``.cbx`` bytes once encoded.
      info: their :class:`CbxSizeInfo`.
    """

    masks: Mapping[str, np.ndarray] | None = None
    codebooks: Mapping[str, np.ndarray] = {}
    indices: Mapping[str, np.ndarray] = {}
    bits: Mapping[str, int] = {}
    accuracy: Mapping[str, float] = {}
    blob: bytes | None = None
    info: CbxSizeInfo | None = None


class Stage(Protocol):
    """One compression stage: ``(params, state) -> (params, state, report)``."""

    name: str

    def __call__(self, params: Params, state: CompressState) -> tuple[Params, CompressState, dict]:
        ...


@dataclasses.dataclass(frozen=True)
class _Chain:
    stages: tuple[Stage, ...]
    name: str = "chain"

    def __call__(self, params: Params, state: CompressState) -> tuple[Params, CompressState, dict]:
        reports: dict[str, Any] = {}
        for stage in self.stages:
            t = time.time()
            params, state, rep = stage(params, state)
            reports[stage.name] = dict(rep) | {"seconds": time.time() - t}
        return params, state, reports


def chain(*stages: Stage) -> Stage:
    """Compose stages in order, like ``optax.chain``; the report is ``{stage.name: report}``."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    return _Chain(tuple(stages))


def kernel_path(layer: str) -> str:
    """Leaf path of a layer's kernel in a flax params tree (``params/fc1/kernel``)."""
    return f"params/{layer}/kernel"


def bias_path(layer: str) -> str:
    """Leaf path of a layer's bias (``params/fc1/bias``)."""
    return f"params/{layer}/bias"


def _path_str(path: tuple) -> str:
    return "/".join(P.key_str(k) for k in path)


def _leaf_tree(params: Params, by_path: Mapping[str, Any]) -> Any:
    """A tree shaped like ``params`` with ``by_path[path]`` at each leaf (None if absent)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: by_path.get(_path_str(p)), params)


def _evaluate(evaluate: Evaluate | None, params: Params, state: CompressState, label: str):
    if evaluate is None:
        return state
    return state._replace(accuracy=dict(state.accuracy) | {label: evaluate(params)})


def walk_axes(ndim: int, order: str) -> tuple[int, ...] | None:
    """Axis permutation of a kernel for an element ``order`` (see :class:`EncodeStage`)."""
    if order == "stored" or ndim < 2:
        return None
    return (ndim - 1, ndim - 2, *range(ndim - 2))


@dataclasses.dataclass(frozen=True, eq=False)
class Training:
    """What a stage that trains needs: the network, its data and how to train.

    ``evaluate(params) -> accuracy`` (optional) measures the params after the stage.
    """

    apply_fn: Callable[[Params, Any], Any]
    x: np.ndarray
    y: np.ndarray
    learning_rate: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    progress: bool = False
    evaluate: Evaluate | None = None


# --------------------------------------------------------------------------------- prune


@dataclasses.dataclass(frozen=True, eq=False)
class PruneStage:
    """Iterative magnitude pruning with retraining (Han et al. 2015, Sec. 3).

    ``steps`` rounds; round i prunes each layer to the i-th sparsity of ``schedule``
    (ending at ``sparsity``, a fraction or ``{layer: fraction}``) and retrains
    ``retrain_epochs`` with ``optimizer`` (a name, or any optax transform) followed by
    ``keep_pruned(masks)``, so the pruned weights stay exactly 0. Sets
    ``state.masks``; measures ``"pruned"``.
    """

    training: Training
    sparsity: float | Mapping[str, float]
    steps: int = 3
    retrain_epochs: int = 2
    scope: str = "layer"
    schedule: str = "geometric"
    optimizer: optax.GradientTransformation | str = "adam"
    name: str = "prune"

    def __call__(self, params: Params, state: CompressState) -> tuple[Params, CompressState, dict]:
        t = self.training
        params, masks, rep = P.iterative_magnitude_prune(
            t.apply_fn, params, t.x, t.y,
            sparsity=self.sparsity, steps=self.steps, retrain_epochs=self.retrain_epochs,
            scope=self.scope, schedule=self.schedule,
            train_kwargs={"optimizer": self.optimizer, "learning_rate": t.learning_rate,
                          "batch_size": t.batch_size, "seed": t.seed,
                          "progress": t.progress, "desc": "prune+retrain"},
        )
        state = state._replace(masks=P.layer_masks(masks))
        return params, _evaluate(t.evaluate, params, state, "pruned"), rep.to_dict()


# ------------------------------------------------------------------------------ quantize


def needs_zero_code(
    mask: np.ndarray, index_bits: int | None, axes: tuple[int, ...] | None
) -> bool:
    """Whether the stored entries of a layer include zeros (fillers or dense zeros)."""
    if index_bits is None:
        return not bool(np.all(mask))
    walked = mask if axes is None else np.transpose(mask, axes)
    return relative_index_encode(walked.ravel().astype(np.int8), index_bits).n_fillers > 0


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizeStage:
    """k-means weight sharing and centroid fine-tuning (Deep Compression, Sec. 3).

    Layer l gets 2^b_l shared values, b_l = ``bits[l]`` (layers absent or 0 stay in
    float32). A layer whose stored entries include zeros -- the relative index's
    filler entries (``index_bits[l]`` and ``order`` decide) or pruned weights in a
    dense layout -- gets k = 2^b - 1 centroids, so that 0.0 is the 2^b-th value and
    every code still fits in b bits. With ``bias_bits`` > 0 every bias vector is
    shared the same way (k = min(2^b, size), dense layout) where that is smaller
    than its float32 values: 4k (codebook) + k (Huffman code lengths) +
    ceil(size b / 8) < 4 size; shorter bias vectors stay float32.

    Fine-tuning (``finetune_epochs``): the gradient of every shared entry is replaced
    by its cluster's sum (``share_by_cluster``), Adam follows, and ``keep_pruned``
    zeroes the updates of every pruned weight -- of shared layers and of layers kept
    in float32 alike. The codebooks are then the cluster means and the shared leaves
    are rebuilt from (codebook, indices, mask), so their values are exactly the
    float32 centroids a file stores. Measures ``"quantized"`` and ``"finetuned"``.
    """

    training: Training
    bits: Mapping[str, int]
    bias_bits: int = 0
    index_bits: Mapping[str, int] | None = None
    order: str = "out_major"
    init: str = "linear"
    iters: int = 50
    finetune_epochs: int = 1
    name: str = "quantize"

    def _share(self, params: Params, masks):
        kernels = P.kernels(params)
        codebooks, indices, bits, stats, new = {}, {}, {}, {}, {}
        for i, (n, b) in enumerate((n, b) for n, b in self.bits.items() if b > 0):
            w = np.asarray(kernels[n])
            m = P.mask_or_true(masks, n, w.shape)
            kept = int(m.sum())
            if kept == 0:
                continue
            bi = None if masks is None or self.index_bits is None else self.index_bits[n]
            k = 2**b - (1 if needs_zero_code(m, bi, walk_axes(w.ndim, self.order)) else 0)
            if k > kept or k < 1:
                raise ValueError(
                    f"quantize: layer {n!r} keeps {kept} weights, fewer than the k = {k} centroids "
                    f"of {b}-bit codes; lower quantize.bits or set quantize.layer_bits.{n} to at "
                    f"most {max(kept.bit_length() - 1, 1)}"
                )
            c, idx, info = Q.kmeans_codebook(w, k, init=self.init, mask=m, iters=self.iters,
                                             seed=self.training.seed + i)
            path = kernel_path(n)
            codebooks[path], indices[path], bits[path] = c, idx, b
            new[path] = np.where(m, c[idx], np.float32(0)).astype(np.float32)
            stats[n] = Q.LayerCodebook(bits=b, k=k, n_weights=int(w.size), n_kept=kept,
                                       objective_init=info.objective_init,
                                       objective=info.objective)
        if self.bias_bits > 0:
            for path, v in flatten_tree(to_numpy_tree(params)).items():
                k = min(2**self.bias_bits, v.size)
                # codebook + code lengths + codes must beat the raw float32 values
                coded = 5 * k + (v.size * self.bias_bits + 7) // 8
                if not path.endswith("/bias") or coded >= 4 * v.size:
                    continue
                c, idx, _ = Q.kmeans_codebook(v, k, init=self.init, iters=self.iters,
                                              seed=self.training.seed)
                codebooks[path], indices[path], bits[path] = c, idx, self.bias_bits
                new[path] = c[idx]
        params = jax.tree_util.tree_map_with_path(
            lambda p, leaf: new.get(_path_str(p), leaf), params)
        return params, codebooks, indices, bits, Q.WeightSharingReport(stats, self.init)

    def __call__(self, params: Params, state: CompressState) -> tuple[Params, CompressState, dict]:
        t, masks = self.training, state.masks
        params, codebooks, indices, bits, rep = self._share(params, masks)
        state = _evaluate(t.evaluate, params, state, "quantized")
        mask_of = {kernel_path(n): m for n, m in (masks or {}).items()}
        if self.finetune_epochs > 0:
            assign = {p: np.where(P.mask_or_true(mask_of, p, i.shape), i, -1).astype(np.int32)
                      for p, i in indices.items()}
            params = Q.finetune_shared(
                t.apply_fn, params, _leaf_tree(params, assign), _leaf_tree(params, mask_of),
                t.x, t.y, epochs=self.finetune_epochs, learning_rate=t.learning_rate,
                batch_size=t.batch_size, seed=t.seed, progress=t.progress,
            )
            codebooks = _cluster_means(params, codebooks, indices, mask_of)
        rebuilt = {p: np.where(P.mask_or_true(mask_of, p, i.shape),
                               np.asarray(codebooks[p], np.float32)[i], np.float32(0))
                   for p, i in indices.items()}
        params = jax.tree_util.tree_map_with_path(
            lambda p, leaf: rebuilt.get(_path_str(p), leaf), params)
        if self.finetune_epochs > 0:
            state = _evaluate(t.evaluate, params, state, "finetuned")
        state = state._replace(codebooks=codebooks, indices=indices, bits=bits)
        layer_bits = {n: b for n, b in self.bits.items()}
        return params, state, rep.to_dict() | {"bits": layer_bits, "bias_bits": self.bias_bits}


def _cluster_means(params, codebooks, indices, mask_of) -> dict[str, np.ndarray]:
    """Each centroid := the mean of its kept members (``quantize.cluster_means``)."""
    flat = flatten_tree(to_numpy_tree(params))
    return {p: Q.cluster_means(flat[p], indices[p], mask_of.get(p), c)
            for p, c in codebooks.items()}


# -------------------------------------------------------------------------------- encode


@dataclasses.dataclass(frozen=True, eq=False)
class EncodeStage:
    """Write the params as ``.cbx`` bytes and measure the decoded file.

    Every kernel is a coded leaf: its nonzeros in the relative index with
    ``index_bits[layer]``-bit gaps (0: dense layout; used when nothing was pruned),
    their values as codes into the layer's codebook (float32 bit patterns if it
    has none). Shared biases are coded leaves in the dense layout; other leaves
    are stored raw. ``huffman_weights`` / ``huffman_index`` switch the canonical
    Huffman codes of the two streams. ``order``: ``"out_major"`` walks a kernel
    one output unit at a time (Caffe's (out, in[, kh, kw]) layout that Deep
    Compression coded), ``"stored"`` walks flax's layout as stored.

    Returns the params decoded from the bytes (measured as ``"file"``); the report
    is :func:`compression_table`.
    """

    index_bits: Mapping[str, int]
    huffman_weights: bool = True
    huffman_index: bool = True
    order: str = "out_major"
    meta: Mapping[str, Any] | None = None
    evaluate: Evaluate | None = None
    name: str = "encode"

    def coding(self, params: Params, state: CompressState) -> dict[str, LeafCoding]:
        """The :class:`LeafCoding` of every coded leaf."""
        coding = {}
        for n, w in P.kernels(params).items():
            path = kernel_path(n)
            cb = state.codebooks.get(path)
            b = self.index_bits.get(n, 0) if state.masks is not None else 0
            coding[path] = LeafCoding(
                codebook=cb, index_bits=b,
                huffman_weights=self.huffman_weights and cb is not None,
                huffman_index=self.huffman_index and b > 0,
                axes=walk_axes(np.ndim(w), self.order),
            )
        for path, cb in state.codebooks.items():
            if path not in coding:
                coding[path] = LeafCoding(codebook=cb, index_bits=0,
                                          huffman_weights=self.huffman_weights,
                                          huffman_index=False)
        return coding

    def __call__(self, params: Params, state: CompressState) -> tuple[Params, CompressState, dict]:
        np_params = to_numpy_tree(params)
        blob, info = encode_cbx(np_params, self.coding(params, state), self.meta)
        decoded, _ = decode_cbx(blob)
        state = _evaluate(self.evaluate, decoded, state._replace(blob=blob, info=info), "file")
        n_params = sum(int(np.size(v)) for v in flatten_tree(np_params).values())
        names = {kernel_path(n): n for n in P.kernels(params)}
        return decoded, state, compression_table(info, names, n_params)


# -------------------------------------------------------------------------------- energy


@dataclasses.dataclass(frozen=True, eq=False)
class EnergyStage:
    """Energy per inference of the encoded file vs float32 (:func:`estimate_energy`).

    ``macs``: dense MACs per example of each layer. k-means layers compute with
    float centroids, so their MACs count as float MACs; only layers named in
    ``fixed_point_layers`` (weights from a fixed-point stage) count as 8-bit
    integer MACs.
    """

    macs: Mapping[str, int]
    sram_bytes: int = DEFAULT_SRAM_BYTES
    fixed_point_layers: frozenset[str] = frozenset()
    name: str = "energy"

    def __call__(self, params: Params, state: CompressState) -> tuple[Params, CompressState, dict]:
        if state.info is None:
            raise ValueError("the energy stage needs an encoded file: put it after EncodeStage")
        works = []
        for n in P.kernels(params):
            if n not in self.macs:
                continue
            leaf = state.info.leaf(kernel_path(n))
            works.append(LayerWork(n, macs=int(self.macs[n]), weights=leaf.numel,
                                   nonzeros=leaf.nnz,
                                   weight_bits=state.bits.get(kernel_path(n), 32),
                                   fixed_point=n in self.fixed_point_layers))
        n_params = sum(leaf.numel for leaf in state.info.leaves)
        energy = estimate_energy(works, original_bits=32 * n_params,
                                 compressed_bits=8 * state.info.total_bytes,
                                 sram_bytes=self.sram_bytes)
        return params, state, energy.to_dict()
