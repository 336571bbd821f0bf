"""scikit-learn's bundled 8x8 digits (no files needed)."""

from __future__ import annotations

import numpy as np

from coblax.nn.dataset import (
    NUM_CLASSES,
    Dataset,
)

__all__ = [
    "load_digits",
]


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits with a fixed stratified 80/20 split (1,437 / 360)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # pixel values are 0..16
    y = digits.target.astype(np.int32)
    # random_state is fixed (not the caller's seed) so every run sees the same split.
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, NUM_CLASSES)

