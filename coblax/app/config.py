"""The run's config: frozen dataclasses validated by :mod:`coblax.util.schema`.

Each dataclass below declares every key of one config table in its fields, with
:func:`setting` giving a value's range or choices; :mod:`coblax.util.schema` says
how they are checked (``parse_dataclass``, re-exported here, the one validator)
and how every problem is reported together by one :class:`ConfigError`. Every key
of an experiment config is documented in the README.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from coblax.util.schema import (
    INT_MAX,
    ConfigError,
    Problems,
    Reported,
    check_value,
    is_sequence_type,
    load_toml,
    parse_dataclass,
    read_config_text,
    setting,
)

__all__ = [
    "ConfigError",
    "Problems",
    "INT_MAX",
    "setting",
    "read_config_text",
    "load_toml",
    "parse_dataclass",
    "check_model_options",
    "check_method_options",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "DecomposeConfig",
    "BudgetConfig",
    "CoblaConfig",
    "FinetuneConfig",
    "RunConfig",
    "load_run_config",
]

# ----------------------------------------------------- model and method options


def _model_names() -> tuple[str, ...]:
    from coblax.nn.models import MODEL_NAMES

    return MODEL_NAMES


def _method_names() -> tuple[str, ...]:
    from coblax.lowrank.registry import allocator_names

    return tuple(allocator_names())


def _warm_starts() -> tuple[str, ...]:
    return ("constant",) + tuple(m for m in _method_names() if m != "cobla")


def _int_leaves(value: Any, tp) -> list[int]:
    """The integers of an int option (or of each element of a Sequence[int] option)."""
    if value is None:
        return []
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _int_leaves(value, args[0]) if len(args) == 1 else []
    if tp is int:
        return [value]
    if is_sequence_type(tp) and typing.get_args(tp)[:1] == (int,):
        return list(value)
    return []


def check_model_options(name: str, options: dict, where: str) -> list[str]:
    """Problems with a bundled model's ``options``, checked against the model's own fields.

    Unknown options list the model's fields; values are checked against the fields'
    type annotations; layer sizes (integer options) must be >= 1. That the model
    can be built with them is checked later on the data's input shape.
    """
    from coblax.nn.models import MODEL_NAMES, build_model

    if name not in MODEL_NAMES:
        return [f"{where}.name = {name!r} is not allowed; valid models: {', '.join(MODEL_NAMES)}"]
    module = build_model(name, num_classes=2)
    cls = type(module)
    fixed = {"parent", "name", "num_classes"}
    fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: leave types to the builder
        hints = {}
    problems: list[str] = []
    for key in sorted(options):
        value = options[key]
        if key not in fields:
            problems.append(
                f"{where}.{key}: unknown option of model {name!r}; its options: "
                f"{', '.join(fields) or '(none)'}"
            )
            continue
        tp = hints.get(key, Any)
        try:
            checked = check_value(value, tp, f"{where}.{key}", Problems())
        except (ConfigError, Reported) as err:
            problems.append(str(err) or f"{where}.{key}: wrong type")
            continue
        for v in _int_leaves(checked, tp):
            if v < 1:
                problems.append(f"{where}.{key} = {value!r}: layer sizes must be >= 1")
                break
    return problems


def _allocator_options(factory) -> tuple[dict[str, Any], bool]:
    """(option name -> type, accepts any keyword) of an allocator factory."""
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        try:
            hints = typing.get_type_hints(factory)
        except Exception:  # noqa: BLE001
            hints = {}
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(factory)
                if f.init and f.name != "name"}, False
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}, True
    opts, anything = {}, False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            anything = True
        elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "name":
            ann = p.annotation
            opts[p.name] = Any if ann is inspect.Parameter.empty or isinstance(ann, str) else ann
    return opts, anything


def check_method_options(method: str, options: Any, where: str) -> list[str]:
    """Problems with ``method_options.<method>``, checked against the allocator's options."""
    from coblax.lowrank.registry import allocator_factory

    if not isinstance(options, dict):
        return [f"{where}: expected a table of options, got {options!r}"]
    factory = allocator_factory(method)
    known, anything = _allocator_options(factory)
    problems: list[str] = []
    for key in sorted(options):
        if key not in known and not anything:
            problems.append(
                f"{where}.{key}: unknown option of method {method!r}; its options: "
                f"{', '.join(sorted(known)) or '(none)'}"
            )
            continue
        try:
            check_value(options[key], known.get(key, Any), f"{where}.{key}", Problems())
        except (ConfigError, Reported) as err:
            problems.append(str(err) or f"{where}.{key}: wrong type")
    if method == "cobla" and "warm_start" in options and options["warm_start"] not in _warm_starts():
        problems.append(
            f"{where}.warm_start = {options['warm_start']!r} is not allowed; valid values: "
            f"{', '.join(_warm_starts())}"
        )
    if not problems:
        try:
            allocator = factory(**options)
        except (TypeError, ValueError) as err:
            problems.append(f"{where}: {err}")
        else:  # options only coblax.allocate can serve (ALDS's slices > 1) say so here
            unsupported = getattr(allocator, "runner_unsupported", None)
            if unsupported:
                problems.append(f"{where}: {unsupported}")
    return problems


# ------------------------------------------------------------------------- configs

_OPTIMIZERS = ("adam", "sgd", "momentum")
_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset; ``dir`` overrides ``COBLAX_DATA`` for file datasets."""

    name: str = setting("digits", choices=_DATASETS)
    dir: str | None = None
    limit_train: int | None = setting(None, ge=1)
    limit_test: int | None = setting(None, ge=1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model by name plus its own options (passed to ``build_model``)."""

    name: str = setting(choices=_model_names, allowed="models")
    options: dict = setting(factory=dict)

    @property
    def label(self) -> str:
        return self.name if not self.options else f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Base-model training."""

    epochs: int = setting(20, ge=0)
    batch_size: int = setting(64, ge=1)
    learning_rate: float = setting(1e-3, gt=0)
    optimizer: str = setting("adam", choices=_OPTIMIZERS)
    # "cosine" decays the rate to zero over the run: a constant Adam step leaves a ResNet
    # unconverged (ResNet-20 / Fashion-MNIST: 20 epochs scored below 8 on one seed)
    schedule: str = setting("constant", choices=("constant", "cosine"))


@dataclasses.dataclass(frozen=True)
class DecomposeConfig:
    """Which layers are decomposed and how convolutions are matricized."""

    schemes: tuple[str, ...] = setting(("tai",), choices=("tai", "zhang"), nonempty=True, unique=True)
    layers: tuple[str, ...] = setting((), unique=True)
    exclude: tuple[str, ...] = setting((), unique=True)
    spectrum: str = setting("weight", choices=("weight", "whitened"))
    whiten_eps: float = setting(1e-6, gt=0)


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """Budget pairs (mac[i], param[i]) as fractions of the original cost."""

    mac: tuple[float, ...] = setting((0.5,), gt=0.0, le=1.0, nonempty=True)
    param: tuple[float, ...] = setting((0.5,), gt=0.0, le=1.0, nonempty=True)
    basis: str = setting("decomposed", choices=("decomposed", "network"))
    min_rank: int = setting(1, ge=1)
    # a third budget beside every pair: a fraction of the measured latency (coblax.app.budget_extras)
    latency: float | None = setting(None, gt=0.0, le=1.0)
    latency_batch: int = setting(64, ge=1)
    latency_checks: int = setting(2, ge=0)  # end-to-end measurements, re-allocating while slower
    rank_multiple: int = setting(1, ge=1)

    def validate(self, where: str) -> None:
        if len(self.mac) != len(self.param) and 1 not in (len(self.mac), len(self.param)):
            raise ConfigError(
                f"{where}.mac and {where}.param must have the same length (or one of them one value)"
            )
        pairs = self.pairs()
        if len(set(pairs)) != len(pairs):
            raise ConfigError(f"{where}: a budget pair (mac, param) is listed twice: {pairs}")

    def pairs(self) -> list[tuple[float, float]]:
        n = max(len(self.mac), len(self.param))
        mac = self.mac * n if len(self.mac) == 1 else self.mac
        param = self.param * n if len(self.param) == 1 else self.param
        return list(zip(mac, param))


@dataclasses.dataclass(frozen=True)
class CoblaConfig:
    """COBLA's relaxed solve and rounding."""

    objective_size: int = setting(1000, ge=1)
    validation_size: int = setting(500, ge=1)
    batch_size: int = setting(250, ge=1)
    max_iter: int = setting(100, ge=1)
    tol: float = setting(1e-4, gt=0, le=0.1)
    rtol: float = setting(3e-3, gt=0, le=0.1)
    atol: float = setting(1e-8, ge=0)
    roundings: int = setting(10, ge=1)
    warm_start: str = setting("pos_exact", choices=_warm_starts)
    extra_warm_starts: tuple[str, ...] = setting((), choices=_warm_starts, unique=True)
    saturation_rounds: int = setting(5, ge=0)
    monotone: bool = False
    continuation: tuple[float, ...] = setting((), ge=0)
    local_search: int = setting(60, ge=0)
    select: str = setting("accuracy", choices=("accuracy", "loss", "finetune"))
    mask_values: str = setting("best", choices=("relaxed", "ones", "plain", "best"))
    polish: int = setting(30, ge=0)
    solver: str = setting("structured", choices=("slsqp", "structured"))
    window: int | None = setting(None, ge=1)
    data_parallel: bool = False
    # issue 18 (BatchNorm statistics in E(m), fine-tuning-aware selection)
    bn_stats: str = setting("auto", choices=("auto", "running", "batch", "recalibrated"))
    finetune_candidates: int = setting(3, ge=1)
    finetune_steps: int = setting(50, ge=1)
    finetune_learning_rate: float = setting(1e-4, gt=0)
    # joint training of masks and factors after the relaxed solve (coblax.lowrank.joint)
    joint: int = setting(0, ge=0)
    joint_lr: float = setting(1e-4, gt=0)
    joint_mask_lr: float = setting(1e-3, gt=0)
    joint_hard: int = setting(0, ge=0)
    joint_schedule: str = setting("constant", choices=("constant", "cosine"))
    joint_average: int = setting(0, ge=0)

    def validate(self, where: str) -> None:
        if self.joint_average > self.joint_hard:
            raise ConfigError(f"{where}.joint_average = {self.joint_average} must be at most {where}.joint_hard = "
                              f"{self.joint_hard} (the last joint_average of the joint_hard steps are averaged)")
        if self.joint_hard and not self.joint_hard < self.joint:
            raise ConfigError(f"{where}.joint_hard = {self.joint_hard} must be below {where}.joint = {self.joint} "
                              "(the last joint_hard of the joint steps run at the rounded ranks)")
        if self.warm_start in self.extra_warm_starts:
            raise ConfigError(f"{where}.extra_warm_starts repeats {where}.warm_start = {self.warm_start!r}")
        if self.joint_hard and self.select == "finetune":
            raise ConfigError(f"{where}.joint_hard > 0 fixes the ranks before its steps; {where}.select = "
                              "'finetune' would pick others afterwards")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning of the factored network (all factors and other params trainable).

    ``recalibrate_bn = N`` re-estimates the BatchNorm statistics of the factored
    network on N training batches before each evaluation (:mod:`coblax.nn.bn`);
    ``"auto"`` (the default) is 20 batches for networks with BatchNorm, 0 otherwise.
    """

    epochs: int = setting(5, ge=0)
    batch_size: int = setting(64, ge=1)
    learning_rate: float = setting(1e-4, gt=0)
    optimizer: str = setting("adam", choices=_OPTIMIZERS)
    recalibrate_bn: int | Literal["auto"] = setting("auto", ge=0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole ``coblax run`` experiment.

    ``seeds`` repeats every record once per seed (base model, data subsets and
    objective/validation split, rounding, fine-tuning); absent, the run has the one
    seed ``seed``. :attr:`seed_list` is the seeds a run repeats over.
    """

    seed: int = setting(0, ge=0)
    seeds: tuple[int, ...] | None = setting(None, ge=0, nonempty=True, unique=True)
    methods: tuple[str, ...] = setting(("cobla", "uniform"), choices=_method_names, allowed="methods",
                                       nonempty=True, unique=True)
    models: tuple[ModelConfig, ...] = setting((ModelConfig("mlp"),), nonempty=True)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    budgets: BudgetConfig = BudgetConfig()
    cobla: CoblaConfig = CoblaConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    method_options: dict = setting(factory=dict)
    cache_dir: str | None = None
    name: str = ""

    @property
    def seed_list(self) -> tuple[int, ...]:
        """The seeds every record is repeated for: ``seeds``, else ``(seed,)``."""
        return (self.seed,) if self.seeds is None else tuple(self.seeds)


def _models_from(value, where: str, problems: Problems) -> list:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, dict):
            if "name" not in item:
                problems.add(where, f"{where}[{i}] needs a name (valid models: {', '.join(_model_names())})")
                continue
            rest = {k: v for k, v in item.items() if k != "name"}
            out.append({"name": item["name"], "options": rest})
        else:
            problems.add(where, f"{where}[{i}]: expected a model name or table, got {item!r}")
    return out


def parse_run_config(raw: dict, problems: Problems) -> RunConfig:
    """Validate a config dict into a :class:`RunConfig`, adding every problem to ``problems``.

    Bad values are replaced by their defaults in the returned config (which is
    only meant for further checks when ``problems`` is not empty).
    """
    raw = dict(raw)
    if "seed" in raw and "seeds" in raw:
        problems.add("seeds", "give either seed or seeds, not both (seeds lists every seed)")
        raw.pop("seed")
    if "models" in raw:
        raw["models"] = _models_from(raw["models"], "models", problems)
    dec = raw.get("decompose")
    if isinstance(dec, dict) and "scheme" in dec:  # singular spelling accepted
        dec = dict(dec)
        if "schemes" in dec:
            problems.add("decompose", "decompose: give either scheme or schemes, not both")
            dec.pop("scheme")
        else:
            dec["schemes"] = dec.pop("scheme")
        raw["decompose"] = dec
    cfg = parse_dataclass(RunConfig, raw, "", problems)
    if cfg is None:  # pragma: no cover - every RunConfig field has a default
        cfg = RunConfig()
    for i, mc in enumerate(cfg.models):
        for message in check_model_options(mc.name, mc.options, f"models[{i}]"):
            problems.add("models", message)
    labels = [mc.label for mc in cfg.models]
    for label in sorted({lb for lb in labels if labels.count(lb) > 1}):
        problems.add("models", f"models: {label} is listed twice")
    method_options = raw.get("method_options", {})
    if isinstance(method_options, dict):
        valid = _method_names()
        for method in sorted(method_options):
            where = f"method_options.{method}"
            if method not in valid:
                problems.add(where, f"{where}: unknown method; valid methods: {', '.join(valid)}")
                continue
            for message in check_method_options(method, method_options[method], where):
                problems.add(where, message)
    return cfg


def load_run_config(path: str | Path, problems: Problems | None = None) -> RunConfig:
    """Read and validate an experiment config.

    Every problem is reported together in one :class:`ConfigError` that names the
    file; with ``problems`` given they are added to it instead.
    """
    raw = load_toml(path)
    own = Problems() if problems is None else problems
    cfg = parse_run_config(raw, own)
    if problems is None and own:
        raise own.error(str(path))
    return cfg
