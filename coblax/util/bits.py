"""Bit and byte counting shared by the file format and its accounting."""

from __future__ import annotations

__all__ = ["ceil_bytes"]


def ceil_bytes(bits: int) -> int:
    """Bytes that hold ``bits`` bits: ⌈bits / 8⌉ (a stream is padded to whole bytes)."""
    return (bits + 7) // 8
