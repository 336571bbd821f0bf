"""Figures rebuilt from saved results only: ``python -m paper_figs RESULTS... --out FIG_DIR``.

:data:`FIGURES` maps each figure's name to its function ``(payloads, out_dir) -> [paths]``;
a function raises :class:`MissingRecords` (naming the study and what is missing) when the
results hold nothing for it, and the command line then draws the others.
"""

from paper_figs._common import MissingRecords, load_results
from paper_figs.accuracy_vs_budget import accuracy_vs_budget, rank_bars, relaxed_vs_rounded, sqp_convergence
from paper_figs.studies import (bits_accuracy, kd_temperature, obd_vs_magnitude, pruning, small_arch, svd_fc,
                               weight_histogram)

FIGURES = {
    "accuracy_vs_budget": accuracy_vs_budget,
    "rank_bars": rank_bars,
    "sqp_convergence": sqp_convergence,
    "relaxed_vs_rounded": relaxed_vs_rounded,
    "kd_temperature": kd_temperature,
    "small_arch": small_arch,
    "svd_fc": svd_fc,
    "pruning": pruning,
    "bits_accuracy": bits_accuracy,
    "obd_vs_magnitude": obd_vs_magnitude,
    "weight_histogram": weight_histogram,
}

__all__ = ["FIGURES", "MissingRecords", "load_results", *FIGURES]
