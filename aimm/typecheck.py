"""Strict checks of configuration values against their declared types (no coercion).

Used by :meth:`aimm.config.RunConfig.validate`, which reads the annotations of its own fields,
and by :meth:`aimm.methods.base.Method.parse_options` (the ``Options`` fields of a method):
``"false"`` is not a boolean, ``"q_proj"`` is not a list, ``True`` is not an integer, NaN and
infinities are no numbers. Every problem is one line naming the field and how to write it.
No imports from the package.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any


def task_entry_name(entry: Any) -> Any:
    """The name of a ``tasks`` entry: the string itself, or a dataset spec's ``name``."""
    return entry.get("name") if isinstance(entry, dict) else entry


def nonfinite_problem(value: Any, name: str) -> str | None:
    """``<name>=<value>: must be a finite number`` for the first NaN/inf found (nested too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}={value!r}: must be a finite number"
    if isinstance(value, dict):
        items = ((f"{name}.{k}", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{name}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        problem = nonfinite_problem(v, sub)
        if problem:
            return problem
    return None


def _union_args(hint: Any) -> tuple | None:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (typing.Union, types.UnionType) else None


def matches_type(value: Any, hint: Any) -> bool:
    """``value`` is of the annotated type, strictly: a bool is not an int, a string is not a
    bool or a list; an int is a valid float."""
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    args = _union_args(hint)
    if args is not None:
        return any(matches_type(value, a) for a in args)
    origin = typing.get_origin(hint)
    if origin is list:
        (elem,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(matches_type(v, elem) for v in value)
    if origin is dict:
        key, val = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(matches_type(k, key) and matches_type(v, val)
                                               for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def describe_type(hint: Any, plural: bool = False) -> str:
    """Words for an annotation: ``int | None`` -> ``an integer or null``."""
    if hint is Any:
        return "values" if plural else "anything"
    if hint is type(None) or hint is None:
        return "null"
    args = _union_args(hint)
    if args is not None:
        return " or ".join(describe_type(a, plural) for a in args)
    origin = typing.get_origin(hint) or hint  # bare ``list`` / ``dict`` too
    if origin is list:
        (elem,) = typing.get_args(hint) or (Any,)
        return f"a list of {describe_type(elem, plural=True)}"
    if origin is dict:
        return "mappings" if plural else "a mapping (key: value)"
    words = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
             float: ("a number", "numbers"), str: ("a string", "strings")}
    if hint in words:
        return words[hint][plural]
    return getattr(hint, "__name__", str(hint))


def _json_kind(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "a list"), (dict, "a mapping")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def type_problem(value: Any, hint: Any, name: str) -> str | None:
    """``None`` if ``value`` matches ``hint``, else one line naming the field, the expected
    type and how to write it."""
    if matches_type(value, hint):
        return None
    expected = describe_type(hint)
    fix = ""
    if isinstance(value, str):
        if matches_type(True, hint):
            fix = " (write true or false: lowercase, without quotes)"
        elif matches_type(1.5, hint):
            try:
                finite = math.isfinite(float(value))
            except ValueError:
                finite = False
            if finite:
                fix = (f" (YAML reads {value} as text: write it with a dot and a signed "
                       "exponent, e.g. 3.0e-4)")
        elif matches_type([value], hint):
            fix = f" (write a list: [{value}])"
    return f"{name}={value!r}: must be {expected}, not {_json_kind(value)}{fix}"


def field_problems(cls: type, values: dict[str, Any]) -> dict[str, str]:
    """``{field: problem line}`` for each of ``values`` that is not finite
    (:func:`nonfinite_problem`) or not of its field's declared type in the dataclass ``cls``
    (:func:`type_problem`); ``RunConfig``, a method's ``Options`` and ``ControllerConfig`` use it."""
    hints = typing.get_type_hints(cls)
    problems = {}
    for name, value in values.items():
        problem = nonfinite_problem(value, name) or type_problem(value, hints.get(name, Any), name)
        if problem:
            problems[name] = problem
    return problems


__all__ = ["describe_type", "field_problems", "matches_type", "nonfinite_problem",
           "task_entry_name", "type_problem"]
