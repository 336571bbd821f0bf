"""What the studies share: the cached base model's run settings, training a module, traced MACs."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from coblax.app.config import (
    RunConfig,
    TrainConfig,
)
from coblax.app.experiment import default_cache_dir
from coblax.app.studies.config import StudyConfig
from coblax.lowrank.decompose import trace_layers
from coblax.nn import train as T
from coblax.nn.data import Dataset

__all__ = ["base_run_config", "study_cache", "train_module", "traced_macs"]

def base_run_config(cfg: StudyConfig, seed: int) -> RunConfig:
    """The ``coblax run`` settings that key a cached base model (seed, data, training)."""
    return RunConfig(seed=seed, data=cfg.data, train=cfg.train, cache_dir=cfg.cache_dir)


def study_cache(cfg: StudyConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def train_module(module, data: Dataset, tc: TrainConfig, seed: int, progress: bool, desc: str):
    """Initialise and train a Flax module (no cache); returns (params, test accuracy)."""
    params = module.init(jax.random.key(seed), jnp.asarray(data.x_train[:1]))
    params = T.fit(module.apply, params, data.x_train, data.y_train, epochs=tc.epochs,
                   batch_size=tc.batch_size, learning_rate=tc.learning_rate, optimizer=tc.optimizer,
                   schedule=tc.schedule, seed=seed, desc=desc, progress=progress)
    return params, T.evaluate(module.apply, params, data.x_test, data.y_test)


def traced_macs(module, params, data: Dataset) -> int:
    return int(sum(layer.macs for layer in trace_layers(module, params, jnp.asarray(data.x_train[:1]))))
