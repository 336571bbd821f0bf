"""coblax: budget-constrained compression of deep networks in JAX.

Public surface: ``allocate`` (any Flax model, layer rules, budgets, any allocator)
with ``finetune`` and ``save_factored`` / ``load_factored``; configured allocators
(``coblax.allocators.cobla(max_iter=50)``...); the constrained solver (``solve``); the
allocation protocol and registry; the error types. Everything else is an
implementation detail.
"""

__version__ = "0.1.0"

from coblax._cli_signals import install_early_exit as _install_early_exit  # noqa: E402 - stdlib only

_install_early_exit()  # the command line only: a signal while importing JAX exits 130/143 at once

from coblax import allocators  # noqa: E402
from coblax.lowrank.allocation import (  # noqa: E402
    Allocation,
    AllocationProblem,
    Allocator,
    BudgetError,
    LayerCost,
    LossOracle,
    greedy_repair,
    has_room,
    is_feasible,
    largest_feasible,
    ranks_cost,
)
from coblax.lowrank.api import Compressed, allocate, finetune  # noqa: E402
from coblax.lowrank.export import load_factored, save_factored  # noqa: E402
from coblax.lowrank.latency import LatencyCurve, NetworkLatency  # noqa: E402
from coblax.lowrank.latency_measure import LatencyError, measure_network  # noqa: E402
from coblax.lowrank.registry import allocator_names, get_allocator, register_allocator  # noqa: E402
from coblax.lowrank.solve import NonFiniteError, SolveResult, solve  # noqa: E402
from coblax.util.errors import CoblaxError, NumericalError  # noqa: E402
from coblax.util.size import SizeRecord  # noqa: E402

__all__ = [
    "__version__",
    "Allocation",
    "AllocationProblem",
    "Allocator",
    "BudgetError",
    "CoblaxError",
    "NumericalError",
    "LayerCost",
    "LossOracle",
    "greedy_repair",
    "has_room",
    "is_feasible",
    "largest_feasible",
    "ranks_cost",
    "allocator_names",
    "get_allocator",
    "register_allocator",
    "solve",
    "SolveResult",
    "NonFiniteError",
    "allocate",
    "allocators",
    "finetune",
    "Compressed",
    "save_factored",
    "load_factored",
    "SizeRecord",
    "LatencyCurve",
    "NetworkLatency",
    "LatencyError",
    "measure_network",
]
