"""The ``prune_quant`` study: pruning (magnitude, DNS, OBD, OBS) and quantization (fixed point,
codebooks, binary nets), each against the same trained base model."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coblax.app.config import ConfigError
from coblax.app.experiment import train_base_model
from coblax.app.studies.common import base_run_config, study_cache
from coblax.app.studies.config import (
    PruneQuantConfig,
    StudyConfig,
    study_model,
)
from coblax.app.studies.pieces import Pieces
from coblax.compress import prune as P
from coblax.compress import quantize as Q
from coblax.compress.transforms import keep_pruned
from coblax.lowrank.costs import count_params
from coblax.lowrank.decompose import (
    layer_key,
    trace_layers,
)
from coblax.nn import train as T
from coblax.nn.data import Dataset

__all__ = ["study_prune_quant"]


def _kernel_bits(sizes: dict[str, int], ratios: dict[str, float]) -> float:
    """Bits of all kernels: 32·n / ratio for the quantized ones, 32·n for the others."""
    return float(sum(32.0 * n / ratios.get(name, 1.0) for name, n in sizes.items()))


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


def study_prune_quant(cfg: StudyConfig, data: Dataset, seed: int, progress: bool,
                      pieces: Pieces | None = None) -> list[dict]:
    """Every part of the study against one trained base model, in the order of the tables.

    Each part is one piece (:class:`~coblax.app.studies.pieces.Pieces`): saved when it
    finishes, skipped when a resumed run finds it done.
    """
    pq: PruneQuantConfig = cfg.prune_quant
    mc = study_model(pq.model, "prune_quant.model")
    base = train_base_model(base_run_config(cfg, seed), mc, data, study_cache(cfg), progress)
    model, params = base.model, base.params
    kern = P.kernels(params)
    total = sum(int(np.size(w)) for w in kern.values())
    macs = {l.name: l.macs for l in trace_layers(model, params, jnp.asarray(data.x_train[:1]))}
    common = {"model": mc.label, "base_acc": base.accuracy}
    records: list[dict] = [common | {"kind": "base", "acc": base.accuracy, "weights": total,
                                     "macs": sum(macs.values()), "kernel_bits": 32.0 * total}]
    run = _PQRun(cfg, data, seed, progress, model, params, common, macs)
    hist_layer = _hist_layer(pq, kern)  # a misnamed layer fails now, not after the pruning runs
    parts: list[tuple[str, Callable[[], list[dict]]]] = [
        ("base", lambda: records), ("magnitude", lambda: _pq_magnitude(run)),
        ("fixed_point", lambda: _pq_fixed_point(run)), ("codebooks", lambda: _pq_codebooks(run)),
        ("dns", lambda: _pq_dns(run)), ("saliency", lambda: _pq_saliency(run)),
        ("binary", lambda: _pq_binary(run)), ("kmeans_hist", lambda: _pq_kmeans_hist(run, hist_layer))]
    pieces = pieces or Pieces()
    return [rec for key, part in parts for rec in pieces.run(key, part)]


def _pq_magnitude(run: _PQRun) -> list[dict]:
    """Per-layer sensitivity (one layer pruned) and whole-network magnitude pruning (Han et al. 2015)."""
    pq, params, common, cfg, data = run.pq, run.params, run.common, run.cfg, run.data
    records: list[dict] = []
    # Per-layer sensitivity (Han et al. 2015, Fig. 5): one layer pruned, the others intact.
    for name in P.kernels(params):
        for s in pq.layer_sparsities:
            masks = P.magnitude_masks(params, {name: s})
            records.append(common | {"kind": "layer_prune", "layer": name, "sparsity": s,
                                     "acc": run.acc(P.apply_masks(params, masks))}
                           | run.pruned(P.mask_report(masks)))
    # Whole network, one-shot without retraining and iterative with retraining.
    for s in pq.sparsities:
        p1, rep = P.magnitude_prune(params, P.MagnitudeSpec(s, pq.scope))
        records.append(common | {"kind": "prune", "retrain": False, "sparsity": s, "acc": run.acc(p1)}
                       | run.pruned(rep))
        if pq.retrain_epochs > 0:
            p2, _, rep2 = P.iterative_magnitude_prune(
                run.model.apply, params, data.x_train, data.y_train, sparsity=s, steps=pq.steps,
                retrain_epochs=pq.retrain_epochs, scope=pq.scope,
                train_kwargs={"learning_rate": pq.retrain_learning_rate, "batch_size": cfg.train.batch_size,
                              "seed": run.seed, "progress": run.progress})
            records.append(common | {"kind": "prune", "retrain": True, "sparsity": s, "steps": pq.steps,
                                     "retrain_epochs": pq.retrain_epochs, "acc": run.acc(p2)} | run.pruned(rep2))
    return records


def _pq_fixed_point(run: _PQRun) -> list[dict]:
    """Fixed point ⟨IL, FL⟩ (post-training, Gupta et al. 2015): IL covers the largest |w| (sign bit included)."""
    pq, kern = run.pq, P.kernels(run.params)
    total = sum(int(np.size(w)) for w in kern.values())
    wmax = max(float(np.max(np.abs(np.asarray(w)))) for w in kern.values())
    il_needed = 1 + max(0, math.ceil(math.log2(wmax))) if wmax > 0 else 1
    records = []
    for wl in pq.word_lengths:
        il = min(il_needed, wl)
        for rounding in pq.roundings:
            qp, rep = Q.fixed_point_quantize(run.params, Q.FixedPointSpec(il, wl - il, rounding, run.seed))
            records.append(run.common | {"kind": "fixed_point", "word_length": wl, "il": il, "fl": wl - il,
                                         "rounding": rounding, "acc": run.acc(qp),
                                         "kernel_bits": float(wl * total), "compression_ratio": 32.0 / wl})
    return records


def _pq_codebooks(run: _PQRun) -> list[dict]:
    """k-means weight sharing of every kernel; product / residual quantization of the dense ones (Gong et al. 2014)."""
    pq, params, common, seed = run.pq, run.params, run.common, run.seed
    kern = P.kernels(params)
    sizes = {n: int(np.size(w)) for n, w in kern.items()}
    total = sum(sizes.values())
    records = []
    # k-means weight sharing: every kernel, 2^bits shared values (codebook neglected, as Gong et al.).
    for b in pq.kmeans_bits:
        qp, _, _, rep = Q.kmeans_share(params, b, seed=seed)
        ratios = {n: Q.kmeans_compression_ratio(max(c.k, 2)) for n, c in rep.layers.items()}
        bits = _kernel_bits(sizes, ratios)
        records.append(common | {"kind": "kmeans", "bits": b, "acc": run.acc(qp), "kernel_bits": bits,
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
        return common | {"kind": kind, **setting, "acc": run.acc(P.replace_kernels(params, new)),
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
    return records


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
    return {"kernel_bits": float(n), "compression_ratio": 32.0, "float_params": count_params(trained) - n,
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
