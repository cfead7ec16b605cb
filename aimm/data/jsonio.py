"""Reading and writing JSON files with precise errors and atomic writes."""

from __future__ import annotations

import json
import os
from typing import Any

from aimm.util import atomic_write_text
from aimm.util import read_json as _read_json

from .errors import DataError


def json_type(value: Any) -> str:
    """JSON name of the type of a decoded value (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def read_json(path: str | os.PathLike[str]) -> Any:
    """Decode a UTF-8 JSON file (:func:`aimm.util.read_json`); a leading byte-order mark is
    accepted.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: ``<file>: ...`` for bytes that are not UTF-8 (with the byte
            offset), an empty file, or malformed JSON (with line and column).
    """
    return _read_json(path, DataError, empty="no JSON content, no records")


def dump_json(obj: Any) -> str:
    """Serialise like the release files: 4-space indent, non-ASCII kept, no final newline."""
    return json.dumps(obj, indent=4, ensure_ascii=False)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) atomically (:func:`aimm.util.atomic_write_text`)."""
    atomic_write_text(path, text)
