"""The in-memory dataset every loader returns, and the checks the loaders share.

Images are NHWC ``float32`` in [0, 1], labels ``int32``; every missing or malformed
file raises :class:`DataError` naming the file and what was expected.
"""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from pathlib import Path

import numpy as np

from coblax.util.errors import CoblaxError

NUM_CLASSES = 10

__all__ = [
    "NUM_CLASSES",
    "DataError",
    "Dataset",
    "read_file_bytes",
    "check_labels",
]


class DataError(CoblaxError, ValueError):
    """A dataset that cannot be found or read; the message names the file and why."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of an image classification dataset.

    ``eq=False`` because fields are arrays: equality and hashing are by identity.

    Attributes:
      name: dataset name (one of :data:`DATASET_NAMES`).
      x_train, x_test: images, shape (N, H, W, C), float32 in [0, 1].
      y_train, y_test: labels, shape (N,), int32 in [0, num_classes).
      num_classes: number of classes.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(
                    f"Dataset {self.name!r}: x_{split} must be (N, H, W, C) and y_{split} (N,),"
                    f" got {x.shape} and {y.shape}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset {self.name!r}: train images {self.x_train.shape[1:]} and test images"
                f" {self.x_test.shape[1:]} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, (H, W, C)."""
        return tuple(self.x_train.shape[1:])


def read_file_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # A truncated .gz ends before its end-of-stream marker (EOFError).
        raise DataError(f"{path}: not a complete gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def check_labels(path: Path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``labels`` as int32 once every one is in [0, num_classes); else DataError naming ``path``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: expected labels in [0, {num_classes}), found range"
            f" [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int32)

