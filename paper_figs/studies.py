"""Figures of ``coblax study`` results: KD, small architectures, SVD of FC layers, pruning, bits,
OBD / OBS vs. magnitude, a layer's weight histogram with its k-means centroids.

Each function takes the loaded payloads and an output folder, and raises
:class:`MissingRecords` naming the study and what is missing when there is nothing to draw.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from paper_figs._common import MissingRecords, label_axes, mean_std, plt, save, study_records, style

__all__ = ["kd_temperature", "small_arch", "svd_fc", "pruning", "bits_accuracy", "obd_vs_magnitude",
           "weight_histogram"]


def _need(payloads, study: str, what: str, keep=lambda r: True) -> list[dict]:
    recs = [r for r in study_records(payloads, study) if keep(r)]
    if not recs:
        raise MissingRecords(f"{study}: no `coblax study` results with {what}")
    return recs


def _series(recs, x_key: str, y_key: str = "acc", scale: float = 100.0):
    """(x, mean, std) arrays over seeds, sorted by x."""
    groups = defaultdict(list)
    for r in recs:
        groups[r[x_key]].append(scale * r[y_key])
    xs = sorted(groups)
    stats = [mean_std(groups[x]) for x in xs]
    return np.array(xs, float), np.array([s[0] for s in stats]), np.array([s[1] for s in stats])


def _line(ax, recs, x_key: str, label: str, i: int, y_key: str = "acc", **overrides) -> None:
    """One series: mean over seeds with ± std error bars when there are several seeds."""
    recs = [r for r in recs if r.get(y_key) is not None]
    if not recs:
        return
    x, y, e = _series(recs, x_key, y_key)
    ax.errorbar(x, y, yerr=e if e.any() else None, capsize=3, label=label, **(style(i) | overrides))


def _base_line(axes, payloads) -> None:
    """The unpruned, unquantized model's accuracy as a thin horizontal line on every panel."""
    m, _, n = mean_std([100 * r["acc"] for r in study_records(payloads, "prune_quant") if r.get("kind") == "base"])
    for ax in axes if n else ():
        ax.axhline(m, color="0.5", linewidth=0.8, linestyle=(0, (1, 2)), label=f"float32 model ({m:.1f} %)")


def kd_temperature(payloads, out_dir) -> list[Path]:
    """Distilled student's accuracy vs. temperature, beside the student alone and the teacher."""
    recs = _need(payloads, "kd", "role = student_kd records (temperature, acc)")
    kd = [r for r in recs if r["role"] == "student_kd"]
    if not kd:
        raise MissingRecords("kd: no student_kd records (distilled students over temperatures)")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x, y, e = _series(kd, "temperature")
    n = max(mean_std([r["acc"] for r in kd if r["temperature"] == t])[2] for t in x)
    ax.errorbar(x, y, yerr=e if n > 1 else None, capsize=3, label=f"student distilled (α = {kd[0]['alpha']:g})",
                **style(0))
    for i, (role, label) in enumerate((("student_alone", "student alone"), ("teacher", "teacher")), start=1):
        m, s, k = mean_std([100 * r["acc"] for r in recs if r["role"] == role])
        if k:
            st = style(i)
            ax.axhline(m, color=st["color"], linestyle=st["linestyle"], label=f"{label} ({m:.1f} %)")
            if k > 1:
                ax.axhspan(m - s, m + s, color=st["color"], alpha=0.12)
    ax.set_xscale("log", base=2)
    label_axes(ax, "softmax temperature T (dimensionless, log scale)", "test accuracy (%)",
               f"Knowledge distillation: {kd[0].get('student', 'student')}"
               + (f" (mean ± std, {n} seeds)" if n > 1 else ""))
    return save(fig, out_dir, "kd_accuracy_vs_temperature")


def small_arch(payloads, out_dir) -> list[Path]:
    """Accuracy vs. parameters and vs. MACs for every small-architecture variant."""
    recs = _need(payloads, "small_arch", "records of Fire / block variants (params, macs, acc)")
    families = sorted({r["family"] for r in recs})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, cost, unit, title in ((axes[0], "params", "parameters (count, log scale)", "parameters"),
                                  (axes[1], "macs", "MACs per example (count, log scale)", "MACs")):
        for i, fam in enumerate(families):
            mine = [r for r in recs if r["family"] == fam]
            pts = []
            for variant in dict.fromkeys(r["variant"] for r in mine):
                grp = [r for r in mine if r["variant"] == variant]
                m, s, _ = mean_std([100 * r["acc"] for r in grp])
                pts.append((grp[0][cost], m, s, variant))
            pts.sort()
            st = style(i) | ({"linestyle": "none"} if fam == "blocks" else {})  # blocks: no order to join
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3,
                        label=fam, **st)
            for p in pts:
                ax.annotate(p[3], (p[0], p[1]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        label_axes(ax, unit, "test accuracy (%)", f"Small architectures: accuracy vs. {title}", xlog=True,
                   legend=cost == "params")
    return save(fig, out_dir, "small_arch_params_vs_accuracy")


def svd_fc(payloads, out_dir) -> list[Path]:
    """Accuracy change vs. weight reduction of each dense layer truncated alone (Denton et al.)."""
    recs = _need(payloads, "svd_fc", "per-layer rank records (layer, weight_reduction, acc_change)")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, layer in enumerate(dict.fromkeys(r["layer"] for r in recs)):
        _line(ax, [r for r in recs if r["layer"] == layer], "weight_reduction", layer, i, "acc_change")
    ax.axhline(0.0, color="black", linewidth=0.8)
    label_axes(ax, "weight reduction in·out / (K·(in + out)) (×, log scale)", "accuracy change (percentage points)",
               "SVD of fully connected layers, no fine-tuning", xlog=True)
    return save(fig, out_dir, "svd_fc_reduction_vs_accuracy")


def pruning(payloads, out_dir) -> list[Path]:
    """Accuracy vs. parameters kept (whole network, with/without retraining) and per layer."""
    recs = _need(payloads, "prune_quant", "kind = prune, dns or layer_prune records",
                 lambda r: r.get("kind") in ("prune", "dns", "layer_prune"))
    whole = [r for r in recs if r["kind"] in ("prune", "dns")]
    dns = [dict(r, kept_pct=100 * r["kept_fraction"]) for r in recs if r["kind"] == "dns"]
    layer = [r for r in recs if r["kind"] == "layer_prune"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    _base_line(axes[0], payloads)
    ax = axes[0][0]
    for i, retrain in enumerate((False, True)):
        mine = [dict(r, kept_pct=100 * r["kept_fraction"]) for r in whole
                if r["kind"] == "prune" and bool(r.get("retrain")) == retrain]
        if mine:
            _line(ax, mine, "kept_pct", "magnitude + retraining" if retrain else "magnitude, no retraining", i)
    # DNS beside magnitude masks with DNS's per-layer kept fractions, retrained for the same epochs.
    _line(ax, dns, "kept_pct", "dynamic network surgery", 2)
    _line(ax, dns, "kept_pct", "magnitude at DNS's kept fractions, retrained", 3, "magnitude_retrained_acc")
    label_axes(ax, "weights kept (% of all kernel weights, log scale)", "test accuracy (%)",
               "Whole-network pruning" if whole else "Whole-network pruning: no records", xlog=True)
    ax = axes[0][1]
    for i, name in enumerate(dict.fromkeys(r["layer"] for r in layer)):
        _line(ax, [dict(r, sp=100 * r["sparsity"]) for r in layer if r["layer"] == name], "sp", name, i)
    label_axes(ax, "weights pruned in the layer (%)", "test accuracy (%)",
               "Per-layer sensitivity (one layer pruned, no retraining)" if layer
               else "Per-layer sensitivity: no records")
    return save(fig, out_dir, "pruning_accuracy_vs_kept")


def bits_accuracy(payloads, out_dir) -> list[Path]:
    """Fixed-point word length vs. accuracy, and codebook (k-means/PQ/RQ) size vs. accuracy."""
    recs = _need(payloads, "prune_quant", "kind = fixed_point, kmeans, pq, rq, binaryconnect or bnn records",
                 lambda r: r.get("kind") in ("fixed_point", "kmeans", "pq", "rq", "binaryconnect", "bnn"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    _base_line(axes, payloads)
    ax = axes[0]
    fixed = [r for r in recs if r["kind"] == "fixed_point"]
    for i, rounding in enumerate(dict.fromkeys(r["rounding"] for r in fixed)):
        _line(ax, [r for r in fixed if r["rounding"] == rounding], "word_length", f"fixed point, {rounding}", i)
    label_axes(ax, "word length IL + FL (bits per weight)", "test accuracy (%)",
               "Fixed point (post-training)" if fixed else "Fixed point: no records")
    ax = axes[1]
    labels = {"kmeans": "k-means (scalar)", "pq": "product quantization", "rq": "residual quantization"}
    for i, kind in enumerate(k for k in labels if any(r["kind"] == k for r in recs)):
        _line(ax, [dict(r, kb=r["kernel_bits"] / 8 / 1024) for r in recs if r["kind"] == kind], "kb", labels[kind], i)
    # Binary nets (1 bit per kernel weight, trained from scratch): single points, no line.
    binary = {("binaryconnect", "det"): "BinaryConnect, det.", ("binaryconnect", "stoch"): "BinaryConnect, stoch.",
              ("bnn", "det"): "binarized net (BNN)"}
    for i, (key, label) in enumerate(binary.items(), start=len(labels)):
        _line(ax, [dict(r, kb=r["kernel_bits"] / 8 / 1024) for r in recs if (r["kind"], r.get("mode")) == key],
              "kb", label, i, linestyle="none")
    label_axes(ax, "size of the kernels (KiB, log scale)", "test accuracy (%)",
               "Codebook quantization and binary weights: size vs. accuracy", xlog=True)
    return save(fig, out_dir, "bits_vs_accuracy")


def obd_vs_magnitude(payloads, out_dir) -> list[Path]:
    """Accuracy vs. sparsity for magnitude, OBD and OBS pruning; solid = retrained, dashed = not."""
    recs = _need(payloads, "prune_quant", "kind = saliency records (method, retrain, sparsity, acc)",
                 lambda r: r.get("kind") == "saliency")
    fig, ax = plt.subplots(figsize=(6, 4))
    _base_line([ax], payloads)
    labels = {"magnitude": "magnitude", "obd": "OBD", "obs": "OBS (layer-wise)"}
    for i, method in enumerate(dict.fromkeys(r["method"] for r in recs)):
        mine = [dict(r, sp=100 * r["sparsity"]) for r in recs if r["method"] == method]
        by_mag = sorted({n for r in mine for n in r.get("obs_magnitude_layers") or ()})
        name = labels.get(method, method) + (f"; {', '.join(by_mag)} by magnitude" if by_mag else "")
        for retrain in (True, False):
            _line(ax, [r for r in mine if bool(r["retrain"]) == retrain], "sp",
                  f"{name}, {'retrained' if retrain else 'no retraining'}", i,
                  linestyle="-" if retrain else "--", markerfacecolor=style(i)["color"] if retrain else "white")
    label_axes(ax, "weights pruned in every layer (%)", "test accuracy (%)",
               "OBD / OBS vs. magnitude pruning (solid: retrained, dashed: one-shot)")
    return save(fig, out_dir, "obd_vs_magnitude")


def weight_histogram(payloads, out_dir) -> list[Path]:
    """One layer's weight histogram with its k-means centroids before and after fine-tuning."""
    recs = _need(payloads, "prune_quant", "kind = kmeans_hist records (hist_counts, hist_edges, centroids)",
                 lambda r: r.get("kind") == "kmeans_hist")
    r = recs[0]  # histograms of different seeds are different nets: draw the first
    counts, edges = np.asarray(r["hist_counts"], float), np.asarray(r["hist_edges"], float)
    top = float(counts.max()) if counts.size else 1.0
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.stairs(counts, edges, fill=True, color="0.85", edgecolor="0.35",
              label=f"weights of {r['layer']} ({int(counts.sum()):,})")
    for c, y, marker, face, label in (
            ("centroids_kmeans", 1.06, "v", "black", f"k-means centroids (acc {100 * r['acc_kmeans']:.1f} %)"),
            ("centroids_finetuned", 1.13, "^", "white",
             f"after fine-tuning, {r.get('finetune_epochs', '?')} epochs (acc {100 * r['acc_finetuned']:.1f} %)")):
        ax.vlines(r[c], 0, y * top, colors="0.3", linestyles=":" if face == "black" else "--", linewidth=0.6)
        ax.plot(r[c], np.full(len(r[c]), y * top), linestyle="none", marker=marker, color="black",
                markerfacecolor=face, markeredgecolor="black", label=label)
    ax.set_ylim(0, 1.25 * top)
    label_axes(ax, "weight value (dimensionless)", "weights per bin (count)",
               f"k-means weight sharing of {r['layer']}: {r['k']} centroids ({r['bits']} bits),"
               f" seed {r.get('seed', '?')}")
    return save(fig, out_dir, "weight_histogram")
