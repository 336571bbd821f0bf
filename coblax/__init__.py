"""coblax: budget-constrained compression of deep networks in JAX.

Public surface: ``allocate`` (any Flax model, layer rules, budgets, any allocator)
with ``finetune`` and ``save_factored`` / ``load_factored``; the allocation
protocol and registry. Everything else is an implementation detail.
"""

__version__ = "0.1.0"

from coblax.lowrank.allocation import (  # noqa: E402
    Allocation,
    AllocationProblem,
    Allocator,
    BudgetError,
    LayerCost,
    LossOracle,
    greedy_repair,
    is_feasible,
    largest_feasible,
    ranks_cost,
)
from coblax.lowrank.api import Compressed, allocate, finetune  # noqa: E402
from coblax.lowrank.export import load_factored, save_factored  # noqa: E402
from coblax.lowrank.registry import allocator_names, get_allocator, register_allocator  # noqa: E402

__all__ = [
    "__version__",
    "Allocation",
    "AllocationProblem",
    "Allocator",
    "BudgetError",
    "LayerCost",
    "LossOracle",
    "greedy_repair",
    "is_feasible",
    "largest_feasible",
    "ranks_cost",
    "allocator_names",
    "get_allocator",
    "register_allocator",
    "allocate",
    "finetune",
    "Compressed",
    "save_factored",
    "load_factored",
]
