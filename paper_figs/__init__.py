"""Figures rebuilt from saved results only: ``python -m paper_figs RESULTS... --out FIG_DIR``.

:data:`FIGURES` maps each figure's name to its function ``(payloads, out_dir) -> [paths]``;
a function raises :class:`MissingRecords` (naming the study and what is missing) when the
results hold nothing for it, and the command line then draws the others.
"""

from pathlib import Path

from paper_figs._common import MissingRecords, failed_records, load_results, safe_name
from paper_figs.accuracy_vs_budget import (
    accuracy_vs_budget,
    rank_bars,
    relaxed_vs_rounded,
    sqp_convergence,
)
from paper_figs.studies import (
    bits_accuracy,
    kd_temperature,
    obd_vs_magnitude,
    pruning,
    small_arch,
    svd_fc,
    weight_histogram,
)

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

#: The ``coblax study`` kind each study figure draws from. Results of several runs of one
#: study (``kd_full`` and ``kd_transfer_full``; a quick and a full variant) are different
#: experiments: :func:`draw` gives each run (by its config name) its own figure.
STUDY_OF = {"kd_temperature": "kd", "small_arch": "small_arch", "svd_fc": "svd_fc", "pruning": "prune_quant",
            "bits_accuracy": "prune_quant", "obd_vs_magnitude": "prune_quant", "weight_histogram": "prune_quant"}


def draw(name: str, payloads, out_dir) -> list:
    """Draw figure ``name``; a study figure over several runs of its study: one per run.

    With one run (or none) the figure goes to ``out_dir``; with several, run ``NAME``'s
    goes to ``out_dir/NAME/`` (the seeds of one run, split over several result files,
    stay together). A run's name comes from its results file, so it is made a safe, unique
    folder name (:func:`~paper_figs._common.safe_name`): figures never land outside
    ``out_dir``. Raises :class:`MissingRecords` only when no run has what it needs.
    """
    study = STUDY_OF.get(name)
    runs: dict[str, list] = {}
    for payload in payloads if study else ():
        if payload.get("study") == study:
            runs.setdefault(str(payload.get("name") or study), []).append(payload)
    taken: set[str] = set()
    runs = {safe_name(run, taken): group for run, group in runs.items()}
    if len(runs) <= 1:
        return FIGURES[name](payloads, out_dir)
    paths, missing = [], []
    for run, group in runs.items():
        try:
            paths += FIGURES[name](group, Path(out_dir) / run)
        except MissingRecords as err:
            missing.append(f"{run}: {err}")
    if not paths:
        raise MissingRecords("; ".join(missing))
    return paths


__all__ = ["FIGURES", "STUDY_OF", "MissingRecords", "draw", "failed_records", "load_results", *FIGURES]
