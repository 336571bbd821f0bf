"""``coblax study``'s Markdown tables of a results file (mean ± std over seeds)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coblax.app.studies.config import STUDIES
from coblax.app.tables import format_mean_std, markdown_table

__all__ = ["format_study"]

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


def _table(records: list[dict], keys: Sequence[str], extra: Sequence[str] = (),
           metrics: Sequence[str] = ("acc",)) -> str:
    """One row per distinct ``keys``; ``extra`` columns from the first record; metrics (×100) mean ± std."""
    rows = []
    for key, group in _grouped(records, keys):
        rows.append([_fmt(v) for v in key] + [_fmt(group[0].get(e)) for e in extra]
                    + [format_mean_std([g.get(m) for g in group]) for m in metrics])
    units = {"acc": "acc (%)", "acc_change": "acc change (pt)",
             "soft_off_label": "soft targets off the label (%)"}
    return markdown_table([*keys, *extra, *(units.get(m, f"{m} (%)" if "acc" in m.split("_") else m) for m in metrics)], rows)


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
