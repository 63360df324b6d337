"""What storage does to shards in the wild, done on purpose: bit rot and files cut short."""

from __future__ import annotations


def flip_byte(path: str, offset: int) -> None:
    """Invert one byte of a file in place (a size-preserving corruption: only a checksum sees it)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: str, size: int) -> None:
    """Cut a file to `size` bytes, as an interrupted copy leaves it."""
    with open(path, "r+b") as f:
        f.truncate(size)
