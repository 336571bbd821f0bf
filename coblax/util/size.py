"""What a saver wrote: one size record for every file format of coblax.

``save_factored`` (``.npz``) and ``save_factored_cbx`` (``.cbx``) both describe the file
they wrote with a :class:`SizeRecord`; ``total_bytes`` is the file's size on disk, and
``breakdown`` carries the format's own account of those bytes where it has one (the
``.cbx`` writer's section and per-leaf sizes).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

__all__ = ["SizeRecord"]


@dataclasses.dataclass(frozen=True)
class SizeRecord:
    """A written file: where, in which format, how many bytes.

    Attributes:
      path: the file written.
      format: the format tag stored in the file's header (``coblax-factored-1``...).
      total_bytes: the file's size in bytes, ``os.stat(path).st_size``.
      breakdown: the format's own size breakdown (a ``CbxSizeInfo`` for ``.cbx``),
        or None where the format has none (``.npz``).
    """

    path: Path
    format: str
    total_bytes: int
    breakdown: Any = None

    @classmethod
    def of(cls, path: str | os.PathLike, format: str, breakdown: Any = None) -> SizeRecord:
        """The record of the file now at ``path``."""
        p = Path(path)
        return cls(p, format, p.stat().st_size, breakdown)
