"""The base model of a run: trained once per (seed, model) and kept in the model cache.

:func:`train_base_model` loads a cached model when the settings that determine it
(:func:`cache_settings`: model, options, training, seed and the data itself) match,
and trains and caches it otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coblax.app.config import ModelConfig, RunConfig
from coblax.nn import train as T
from coblax.nn.data import Dataset
from coblax.nn.models import build_model, training_options
from coblax.util import jsonable

__all__ = ["BaseModel", "cache_settings", "default_cache_dir", "log_stderr", "train_base_model",
           "versions"]

def versions() -> dict[str, str]:
    """Versions of the packages that determine results."""
    import flax
    import optax
    import scipy

    from coblax import __version__

    return {
        "coblax": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def log_stderr(message: str) -> None:
    print(f"coblax: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class BaseModel:
    model: Any
    params: Any
    accuracy: float
    cached: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get("COBLAX_CACHE", Path.home() / ".cache" / "coblax"))


def train_settings(train: Mapping[str, Any]) -> dict:
    """A ``[train]`` section (as a dict) without keys added later that hold their default.

    Models cached (and runs fingerprinted) before ``schedule`` existed trained at a
    constant rate; leaving the default out keeps their keys, so they are reused.
    """
    settings = dict(train)
    if settings.get("schedule") == "constant":
        del settings["schedule"]
    return settings


def cache_settings(cfg: RunConfig, mc: ModelConfig, data: Dataset, digest: str | None = None) -> dict:
    """What determines a trained base model: model, options, training, seed and the data itself."""
    return {
        "model": mc.name,
        "options": mc.options,
        "train": train_settings(dataclasses.asdict(cfg.train)),
        "seed": cfg.seed,
        "data": {
            "name": data.name,
            "n_train": int(len(data.x_train)),
            "digest": digest or T.data_digest(data.x_train, data.y_train),
        },
    }


def train_base_model(
    cfg: RunConfig,
    mc: ModelConfig,
    data: Dataset,
    cache_dir: Path | None,
    progress: bool = True,
    *,
    log: Callable[[str], None] | None = None,
    digest: str | None = None,
) -> BaseModel:
    """Train the base model, or load it from the cache when settings and data match.

    A cache entry that is unreadable, was written for other settings or data, has
    other shapes or holds non-finite weights is reported through ``log`` and
    replaced by a freshly trained model. A model whose training loss is not finite
    raises :class:`NumericalError` and is never cached; a cache that cannot be
    written is reported and the trained model used anyway.
    """
    log = log or log_stderr
    model = build_model(mc.name, num_classes=data.num_classes, input_shape=data.input_shape,
                        **dict(mc.options))
    params = model.init(jax.random.PRNGKey(cfg.seed), jnp.asarray(data.x_train[:1]))
    settings = jsonable(cache_settings(cfg, mc, data, digest))
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "models" / f"{mc.name}-{T.cache_key(settings)}.npz"
        if path.exists():
            try:
                loaded = T.load_checkpoint(path, params, meta=settings)
            except T.CheckpointError as err:
                log(f"cache: {err}; retraining {mc.label}")
            else:
                acc = T.evaluate(model.apply, loaded, data.x_test, data.y_test)
                return BaseModel(model, loaded, acc, True)
    train_kw, fit_kw = training_options(model, params)
    params = T.fit(
        functools.partial(model.apply, **train_kw), params, data.x_train, data.y_train,
        epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.learning_rate, optimizer=cfg.train.optimizer,
        schedule=cfg.train.schedule,
        seed=cfg.seed, desc=f"train {mc.label}", progress=progress, **fit_kw,
    )
    acc = T.evaluate(model.apply, params, data.x_test, data.y_test)
    if path is not None:
        try:
            T.save_params(path, params, meta=settings | {"test_accuracy": acc})
        except OSError as err:
            log(f"cache: cannot write {path} ({err.strerror or err}); {mc.label} is used but not cached")
    return BaseModel(model, params, acc, False)
