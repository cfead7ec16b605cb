"""Small helpers shared across the package (no imports from the package)."""

from __future__ import annotations

import difflib
from typing import Any, Iterable


def did_you_mean(name: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``name``, else ``""``."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def is_int(value: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_num(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["did_you_mean", "is_int", "is_num"]
