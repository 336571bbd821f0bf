"""What a pruning run reports: per-layer kept counts, stage history and extras."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from coblax.compress.prune.masks import Masks, layer_masks

__all__ = ["LayerSparsity", "PruneReport", "mask_report"]


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """How many weights a layer has and how many it keeps."""

    weights: int
    kept: int

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.weights if self.weights else 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class PruneReport:
    """Per-layer kept counts of a pruning result (plus stage history and extras).

    Attributes:
      layers: ``{layer: LayerSparsity}`` in tree order.
      stages: one dict per pruning stage / event (method specific).
      extra: method-specific diagnostics (thresholds, saliencies...).
      masks: the mask tree itself (not part of :meth:`to_dict`).
    """

    layers: Mapping[str, LayerSparsity]
    stages: tuple[Mapping[str, Any], ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    masks: Any = None

    @property
    def total_weights(self) -> int:
        return sum(s.weights for s in self.layers.values())

    @property
    def total_kept(self) -> int:
        return sum(s.kept for s in self.layers.values())

    @property
    def kept_fraction(self) -> float:
        return self.total_kept / self.total_weights if self.total_weights else 1.0

    @property
    def compression(self) -> float:
        """Weight-count reduction total / kept (Han et al.'s "compression rate")."""
        return self.total_weights / max(self.total_kept, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no arrays)."""
        return {
            "layers": {
                k: {"weights": v.weights, "kept": v.kept, "kept_fraction": v.kept_fraction}
                for k, v in self.layers.items()
            },
            "total_weights": self.total_weights,
            "total_kept": self.total_kept,
            "kept_fraction": self.kept_fraction,
            "compression": self.compression,
            "stages": [dict(s) for s in self.stages],
            **{k: v for k, v in self.extra.items() if _jsonable(v)},
        }


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, list, tuple, dict)) or v is None


def mask_report(
    masks: Masks,
    stages: tuple[Mapping[str, Any], ...] = (),
    extra: Mapping[str, Any] | None = None,
) -> PruneReport:
    """:class:`PruneReport` counting the kept entries of every kernel mask."""
    layers = {
        name: LayerSparsity(weights=int(m.size), kept=int(m.sum()))
        for name, m in layer_masks(masks).items()
    }
    return PruneReport(layers=layers, stages=tuple(stages), extra=dict(extra or {}), masks=masks)

