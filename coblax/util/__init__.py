"""Small shared tools: PyTree <-> flat-dict conversion and safe, atomic file output."""

from coblax.util.errors import CoblaxError, NumericalError, RunInterrupted
from coblax.util.io import jsonable, write_bytes_atomic, write_json_atomic, write_text_atomic
from coblax.util.tree import flatten_tree, to_numpy_tree, unflatten_tree

__all__ = [
    "CoblaxError",
    "NumericalError",
    "RunInterrupted",
    "flatten_tree",
    "unflatten_tree",
    "to_numpy_tree",
    "jsonable",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
]
