"""Finished pieces of a study seed: computed once, saved at once, skipped on resume.

A study's work for one seed splits into pieces that each yield records: a part of
``prune_quant`` (magnitude pruning, fixed point, codebooks, DNS, saliency, binary,
k-means histogram), a network of ``small_arch``, a layer of ``svd_fc``, the teacher,
the student alone and each temperature of ``kd``. A runner asks
:meth:`Pieces.run` for each piece in order; a piece finished by an earlier, interrupted
run of the same config returns its saved records without being computed, and a new
one is handed to ``save`` (the study runner writes ``results.partial.json``) before
the next starts. A seed's records are the concatenation of its pieces' records in
order, so a resumed run's records equal an uninterrupted run's (timings aside).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["Pieces"]


@dataclasses.dataclass
class Pieces:
    """The pieces of one seed.

    Attributes:
      done: piece key -> records of the pieces an earlier run finished.
      save: called with (key, records) when a piece has been computed (None: not saved).
      computed: keys computed by this process, in order (what a resumed run did).
    """

    done: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    save: Callable[[str, list[dict]], None] | None = None
    computed: list[str] = dataclasses.field(default_factory=list)

    def run(self, key: str, compute: Callable[[], list[dict]]) -> list[dict]:
        """The records of piece ``key``: saved ones if it is done, else ``compute()``'s, saved."""
        if key in self.done:
            return list(self.done[key])
        records = list(compute())
        self.computed.append(key)
        if self.save is not None:
            self.save(key, records)
        return list(records)  # a copy: the caller may extend it; the saved list stays the piece's
