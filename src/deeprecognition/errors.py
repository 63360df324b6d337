"""Errors a user can act on: each names the file (and line or field) and says what to do.

They pickle with their fields (`__reduce__`), so an error raised in a Ray task reaches the driver
as itself, not as Ray's wrapper.
"""

from __future__ import annotations


class DeepRecError(Exception):
    """Base of every error the CLI reports as a one-line message instead of a traceback."""


class InputError(DeepRecError):
    """Bad input data: the message names the file, the line when there is one, and what is wrong."""

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        self.path = path
        self.message = message
        self.line = line
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        return (type(self), (self.path, self.message, self.line))


class CorruptShardError(DeepRecError):
    """A shard that does not match its manifest entry (checksum, size, sample count, content)."""

    def __init__(self, shard: str, problem: str) -> None:
        self.shard = shard
        self.problem = problem
        super().__init__(
            f"shard {shard}: {problem} (`deeprec verify DATA` lists every bad shard; to repair, remove "
            "DATA/manifest.json and run the same `deeprec pack` again)"
        )

    def __reduce__(self):
        return (type(self), (self.shard, self.problem))
