"""Accounting of a ``.cbx`` file: Deep Compression's per-layer table and its Markdown form.

For every coded kernel the bits of each representation the paper tabulates -- pruned
and quantized with fixed-width codes (P+Q) and with Huffman codes on top (P+Q+H) --
from the exact size breakdown :func:`coblax.compress.cbx.encode_cbx` returns, so the
table describes the bytes that were written, not an estimate.

Reference: Han, Mao & Dally (2016) "Deep Compression", ICLR, Tables 2-5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coblax.compress.cbx import CbxSizeInfo, LeafSize
from coblax.util.bits import ceil_bytes

__all__ = ["compression_table", "format_compression_table"]

_SUMS = ("weights", "kept", "entries", "w_pq", "w_pqh", "i_pq", "i_pqh", "bits_pq", "bits_pqh")


def _layer_bits(leaf: LeafSize) -> tuple[int, int]:
    """(P+Q bits, P+Q+H bits) of one coded leaf, codebook and code-length tables included."""
    cb_bits = 8 * leaf.codebook_bytes
    wl = leaf.codebook_size if leaf.codebook_size else 0
    il = (1 << leaf.index_bits) if leaf.index_bits else 0
    bits_pq = cb_bits + leaf.weight_bits_fixed + leaf.index_bits_fixed
    if leaf.codebook_size == 0:  # unquantized values are never Huffman coded
        return bits_pq, cb_bits + 8 * il + leaf.weight_bits_fixed + leaf.index_bits_huffman
    return bits_pq, cb_bits + 8 * (wl + il) + leaf.weight_bits_huffman + leaf.index_bits_huffman


def _layer_row(leaf: LeafSize, layer: str, bits_pq: int, bits_pqh: int) -> dict[str, Any]:
    e = max(leaf.n_entries, 1)
    return {
        "layer": layer,
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


def _totals(sums: Mapping[str, int]) -> dict[str, Any]:
    e = max(sums["entries"], 1)
    return {
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


def _file_bytes_pq_pqh(info: CbxSizeInfo) -> tuple[int, int]:
    """What the file would weigh with fixed-width codes only (P+Q) and with Huffman on
    every stream that can take it (P+Q+H); the table section is the same."""
    pq_bytes = pqh_bytes = info.total_bytes
    for leaf in info.leaves:
        if leaf.kind != "coded":
            continue
        actual = (
            leaf.code_length_bytes
            + ceil_bytes(leaf.weight_stream_bits)
            + ceil_bytes(leaf.index_stream_bits)
        )
        pq_bytes += ceil_bytes(leaf.weight_bits_fixed) + ceil_bytes(leaf.index_bits_fixed) - actual
        w_h = leaf.weight_bits_huffman if leaf.codebook_size else leaf.weight_bits_fixed
        lens = leaf.codebook_size + ((1 << leaf.index_bits) if leaf.index_bits else 0)
        pqh_bytes += lens + ceil_bytes(w_h) + ceil_bytes(leaf.index_bits_huffman) - actual
    return pq_bytes, pqh_bytes


def _file_record(info: CbxSizeInfo, n_params: int) -> dict[str, Any]:
    pq_bytes, pqh_bytes = _file_bytes_pq_pqh(info)
    original = 4 * n_params
    return {
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
    Rows and totals cover the kernels (the leaves named in ``layer_names``); ``file``
    compares the real file (header, metadata, biases, CRC included) with 32 bits per
    parameter.
    """
    rows = []
    sums = dict.fromkeys(_SUMS, 0)
    for leaf in info.leaves:
        if leaf.kind != "coded" or leaf.name not in layer_names:
            continue
        bits_pq, bits_pqh = _layer_bits(leaf)
        rows.append(_layer_row(leaf, layer_names.get(leaf.name, leaf.name), bits_pq, bits_pqh))
        for key, val in (("weights", leaf.numel), ("kept", leaf.nnz), ("entries", leaf.n_entries),
                         ("w_pq", leaf.weight_bits_fixed), ("w_pqh", leaf.weight_bits_huffman),
                         ("i_pq", leaf.index_bits_fixed), ("i_pqh", leaf.index_bits_huffman),
                         ("bits_pq", bits_pq), ("bits_pqh", bits_pqh)):
            sums[key] += val
    return {"layers": rows, "totals": _totals(sums), "file": _file_record(info, n_params)}


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


