"""The ``small_arch`` study: Fire squeeze ratio and 3x3 fraction sweeps (Iandola et al. 2016), block comparison."""

from __future__ import annotations

import time
from typing import Any

from coblax.app.studies.common import traced_macs, train_module
from coblax.app.studies.config import (
    SmallArchConfig,
    StudyConfig,
)
from coblax.app.studies.pieces import Pieces
from coblax.lowrank.costs import count_params
from coblax.nn.data import Dataset
from coblax.nn.small import BlockNet, FireNet, block_net_cost, fire_net_cost

__all__ = ["study_small_arch"]

def study_small_arch(cfg: StudyConfig, data: Dataset, seed: int, progress: bool,
                     pieces: Pieces | None = None) -> list[dict]:
    """Every network of the sweeps, one piece each (:class:`~coblax.app.studies.pieces.Pieces`)."""
    pieces = pieces or Pieces()
    sa: SmallArchConfig = cfg.small_arch
    shape = data.input_shape
    variants: list[tuple[str, str, Any, Any]] = []
    for sr in sa.squeeze_ratios:
        net = FireNet(data.num_classes, sa.stem, sa.expand, sr, sa.pct3x3_fixed)
        variants.append(("fire_squeeze_ratio", f"SR={sr:g}", net, fire_net_cost(net, shape)))
    for pct in sa.pct3x3:
        net = FireNet(data.num_classes, sa.stem, sa.expand, sa.squeeze_ratio_fixed, pct)
        variants.append(("fire_pct3x3", f"pct3x3={pct:g}", net, fire_net_cost(net, shape)))
    for block in sa.blocks:
        net = BlockNet(data.num_classes, block, sa.block_stem, sa.channels, sa.kernel)
        variants.append(("blocks", block, net, block_net_cost(net, shape)))
    records = []
    trained: dict[str, tuple] = {}  # the two Fire sweeps share their centre point: train it once
    for family, label, net, cost in variants:
        records += pieces.run(f"{family} {label}", lambda f=family, la=label, n=net, c=cost:
                              [_variant_record(f, la, n, c, trained, cfg, data, seed, progress)])
    return records


def _variant_record(family: str, label: str, net: Any, cost: Any, trained: dict, cfg: StudyConfig,
                    data: Dataset, seed: int, progress: bool) -> dict:
    start = time.perf_counter()
    if repr(net) not in trained:
        trained[repr(net)] = train_module(net, data, cfg.train, seed, progress, f"{family} {label}")
    params, acc = trained[repr(net)]
    rec = {"family": family, "variant": label, "params": cost.params, "macs": cost.macs,
           "traced_macs": traced_macs(net, params, data), "counted_params": count_params(params),
           "acc": acc, "train_seconds": time.perf_counter() - start}
    if isinstance(net, FireNet):
        rec |= {"squeeze_ratio": net.squeeze_ratio, "pct3x3": net.pct3x3}
    else:
        rec |= {"block": net.block}
    return rec
