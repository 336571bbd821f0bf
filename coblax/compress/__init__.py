"""The compression back-end: pruning, quantization, encoding into ``.cbx``, Deep Compression.

Public names (imported on first use, so that reading a ``.cbx`` file needs NumPy only):

* optax transforms: ``keep_pruned``, ``share_by_cluster`` (:mod:`.transforms`);
* Deep Compression stages, ``stage(params, state) -> (params, state, report)``:
  ``chain``, ``CompressState``, ``Training``, ``PruneStage``, ``QuantizeStage``,
  ``EncodeStage``, ``EnergyStage`` (:mod:`.pipeline`), ``compression_table``,
  ``format_compression_table`` (:mod:`.accounting`, re-exported by :mod:`.pipeline`);
* the file: ``LeafCoding``, ``encode_cbx``, ``decode_cbx``, ``write_cbx``, ``read_cbx``,
  ``CbxError`` (:mod:`.cbx`).

The families themselves: :mod:`.prune` (sub-package: masks, report, magnitude, dns, obd,
obs), :mod:`.quantize` (sub-package: fixed, kmeans, sharing, codebooks, binary, ste),
:mod:`.encode`, :mod:`.energy`; the file's accounting is :mod:`.accounting`.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "keep_pruned": "transforms",
    "share_by_cluster": "transforms",
    "chain": "pipeline",
    "CompressState": "pipeline",
    "Training": "pipeline",
    "PruneStage": "pipeline",
    "QuantizeStage": "pipeline",
    "EncodeStage": "pipeline",
    "EnergyStage": "pipeline",
    "compression_table": "accounting",
    "format_compression_table": "accounting",
    "LeafCoding": "cbx",
    "encode_cbx": "cbx",
    "decode_cbx": "cbx",
    "write_cbx": "cbx",
    "read_cbx": "cbx",
    "CbxError": "cbx",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'coblax.compress' has no attribute {name!r}")
    return getattr(importlib.import_module(f"coblax.compress.{_PUBLIC[name]}"), name)
