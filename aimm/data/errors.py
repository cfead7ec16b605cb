"""The one exception type of the data layer: :class:`DataError`."""

from __future__ import annotations

from collections.abc import Iterable


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
