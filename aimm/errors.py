"""The package's user-facing exceptions, at the bottom of the import graph (no package imports).

Each message names the file or parameter and the fix; the CLI prints it as one line, exit 2.
The old homes (``aimm.config``, ``aimm.data.errors``, ``aimm.models``, ``aimm.runs``) re-export
them.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A parameter that is unknown, mistyped or out of range. The message names it."""


class DataError(ValueError):
    """Bad benchmark data, with every problem found.

    Each problem is one line, ``<file>: <record index>: <problem>`` for a
    problem in one record (0-based index) or ``<file>: <problem>`` for a
    problem with the file as a whole (unreadable, malformed JSON, wrong
    top-level type, no records, missing split).

    Attributes:
        lines: the problem lines, in the order they were found.
    """

    def __init__(self, lines: str | Iterable[str]) -> None:
        self.lines: list[str] = [lines] if isinstance(lines, str) else list(lines)
        if not self.lines:
            raise ValueError("DataError needs at least one problem line")
        super().__init__("\n".join(self.lines))

    def __str__(self) -> str:
        return "\n".join(self.lines)


class ModelError(ValueError):
    """A model spec that cannot be resolved to a usable model."""


class RunDirError(OSError):
    """A run directory that cannot be used (not writable, or holds another run)."""


__all__ = ["ConfigError", "DataError", "ModelError", "RunDirError"]
