"""Shared test set-up: quiet progress bars, a private model cache, data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Tests must never reuse a user's cached base models.
    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def shared_data_dir() -> Path | None:
    """The real datasets beside the checkout, or COBLAX_DATA; None when absent."""
    for candidate in (os.environ.get("COBLAX_DATA"), SHARED_DATA):
        if candidate and (Path(candidate) / "mnist").is_dir():
            return Path(candidate)
    return None
