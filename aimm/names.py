"""Names that become one path component: task names, run ids, stage names, figure names.

One rule everywhere: ``[A-Za-z0-9][A-Za-z0-9._+-]*`` (so never ``.``, ``..``, a separator, a
leading dot or dash, whitespace or a control character). A name that breaks it is refused before
anything is written. Data with its own location (a dataset spec) carries its path separately;
only its ``name`` is checked here. No imports from the package: anything may use this module.
"""

from __future__ import annotations

import re
from typing import Any

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
NAME_RULE = ("one path component of letters, digits and . _ + - that starts with a letter or "
             "digit (no '/', '..', spaces)")


def is_valid_name(value: Any) -> bool:
    """True when ``value`` is a string that is one safe path component."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def name_problem(value: Any, what: str) -> str | None:
    """``None`` for a valid name, else one line ``<what>=<value>: not a valid name: <rule>``."""
    if is_valid_name(value):
        return None
    return f"{what}={value!r}: not a valid name: use {NAME_RULE}"


def require_name(value: Any, what: str) -> str:
    """``value`` if it is a valid name, else ``ValueError`` with :func:`name_problem`'s line."""
    problem = name_problem(value, what)
    if problem:
        raise ValueError(problem)
    return value


__all__ = ["NAME_PATTERN", "NAME_RULE", "is_valid_name", "name_problem", "require_name"]
