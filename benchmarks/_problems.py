"""Build COBLA allocation problems from run configs, for the benchmarks (no algorithm logic)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from coblax.app import experiment
from coblax.app.config import load_run_config
from coblax.app.experiment import (
    decomposable_layers,
    decompose_layers,
    default_cache_dir,
    train_base_model,
)
from coblax.lowrank.costs import make_problem, network_cost
from coblax.lowrank.decompose import trace_layers
from coblax.lowrank.objective import NetworkLoss
from coblax.nn.data import load_dataset

try:
    from coblax.app.experiment import split_objective_data
except ImportError:  # a commit from before issue 20 (bench_cobla.py --against) has it under its old name
    split_objective_data = getattr(experiment, "_split")  # noqa: B009


def build(config: str, model: str, scheme: str, budget: tuple[float, float], seed: int | None = None,
          **cobla_overrides):
    """(problem, cfg, base, loss) for one record of ``config`` (the runner's own pieces)."""
    cfg = load_run_config(config)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    if cobla_overrides:
        cfg = dataclasses.replace(cfg, cobla=dataclasses.replace(cfg.cobla, **cobla_overrides))
    data = load_dataset(cfg.data.name, cfg.data.dir, seed=cfg.seed,
                        limit_train=cfg.data.limit_train, limit_test=cfg.data.limit_test)
    obj, val = split_objective_data(data, cfg)
    mc = next(m for m in cfg.models if m.label.startswith(model))
    base = train_base_model(cfg, mc, data, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), progress=False)
    traced = trace_layers(base.model, base.params, jnp.asarray(data.x_train[:1]))
    chosen = decomposable_layers(traced, cfg)
    full = decompose_layers(cfg, base, chosen, scheme, obj[0])
    net = network_cost(traced, base.params, {n: np.asarray(f.sigma) for n, f in full.items()}, scheme)
    loss = NetworkLoss(base.model, base.params, full, obj, val, batch_size=cfg.cobla.batch_size,
                       data_parallel=cfg.cobla.data_parallel)
    problem = make_problem(net, budget[0], budget[1], cfg.budgets.basis, min_rank=cfg.budgets.min_rank,
                           loss=loss, seed=cfg.seed)
    return problem, cfg, base, loss
