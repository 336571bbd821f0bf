"""Figures of ``coblax study`` results: KD, small architectures, SVD of FC layers, pruning, bits.

Each function takes the loaded payloads and an output folder, and raises
:class:`MissingRecords` naming the study and what is missing when there is nothing to draw.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from paper_figs._common import MissingRecords, label_axes, mean_std, plt, save, study_records, style

__all__ = ["kd_temperature", "small_arch", "svd_fc", "pruning", "bits_accuracy"]


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


def _line(ax, recs, x_key: str, label: str, i: int, y_key: str = "acc") -> None:
    """One series: mean over seeds with ± std error bars when there are several seeds."""
    x, y, e = _series(recs, x_key, y_key)
    ax.errorbar(x, y, yerr=e if e.any() else None, capsize=3, label=label, **style(i))


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
    recs = _need(payloads, "prune_quant", "kind = prune or layer_prune records",
                 lambda r: r.get("kind") in ("prune", "layer_prune"))
    whole = [r for r in recs if r["kind"] == "prune"]
    layer = [r for r in recs if r["kind"] == "layer_prune"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    _base_line(axes[0], payloads)
    ax = axes[0][0]
    for i, retrain in enumerate((False, True)):
        mine = [dict(r, kept_pct=100 * r["kept_fraction"]) for r in whole if bool(r.get("retrain")) == retrain]
        if mine:
            _line(ax, mine, "kept_pct", "magnitude + retraining" if retrain else "magnitude, no retraining", i)
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
    recs = _need(payloads, "prune_quant", "kind = fixed_point, kmeans, pq or rq records",
                 lambda r: r.get("kind") in ("fixed_point", "kmeans", "pq", "rq"))
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
    label_axes(ax, "size of the kernels (KiB, log scale)", "test accuracy (%)",
               "Codebook quantization: size vs. accuracy", xlog=True)
    return save(fig, out_dir, "bits_vs_accuracy")
