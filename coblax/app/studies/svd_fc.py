"""The ``svd_fc`` study: each dense layer alone truncated to rank K (Denton et al. 2014)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from coblax.app.config import ConfigError
from coblax.app.experiment import train_base_model
from coblax.app.studies.common import base_run_config, study_cache
from coblax.app.studies.config import (
    StudyConfig,
    SVDConfig,
    study_model,
)
from coblax.app.studies.pieces import Pieces
from coblax.lowrank.decompose import (
    factored_apply,
    factorize,
    get_kernel,
    trace_layers,
    truncate,
)
from coblax.nn import train as T
from coblax.nn.data import Dataset

__all__ = ["study_svd_fc"]

def study_svd_fc(cfg: StudyConfig, data: Dataset, seed: int, progress: bool,
                 pieces: Pieces | None = None) -> list[dict]:
    """Each dense layer's truncations, one piece per layer (:class:`~coblax.app.studies.pieces.Pieces`)."""
    pieces = pieces or Pieces()
    sv: SVDConfig = cfg.svd_fc
    mc = study_model(sv.model, "svd_fc.model")
    base = train_base_model(base_run_config(cfg, seed), mc, data, study_cache(cfg), progress)
    traced = [l for l in trace_layers(base.model, base.params, jnp.asarray(data.x_train[:1])) if l.kind == "dense"]
    names = [l.name for l in traced]
    unknown = sorted(set(sv.layers) - set(names))
    if unknown:
        raise ConfigError(f"svd_fc.layers names unknown dense layers {unknown}; dense layers: {', '.join(names)}")
    records = []
    for layer in traced:
        if sv.layers and layer.name not in sv.layers:
            continue
        records += pieces.run(f"layer {layer.name}", lambda layer=layer: _layer_records(sv, mc, base, layer, data))
    return records


def _layer_records(sv: SVDConfig, mc, base, layer, data: Dataset) -> list[dict]:
    n_in, n_out = layer.kernel_shape
    full = factorize(get_kernel(base.params, layer.name), layer, "tai")
    R = min(n_in, n_out)
    records = []
    for r in sorted({max(1, round(f * R)) for f in sv.rank_fractions}):
        mask = np.zeros(R)
        mask[:r] = 1.0
        fs = {layer.name: truncate(full, mask)}
        acc = T.evaluate(lambda p, x, fs=fs: factored_apply(base.model, p, fs, x), base.params,
                         data.x_test, data.y_test)
        records.append({
            "model": mc.label, "layer": layer.name, "shape": [n_in, n_out], "rank": r, "full_rank": R,
            "weights": n_in * n_out, "factored_weights": r * (n_in + n_out),
            "weight_reduction": n_in * n_out / (r * (n_in + n_out)),
            "acc": acc, "base_acc": base.accuracy, "acc_change": acc - base.accuracy,
        })
    return records
