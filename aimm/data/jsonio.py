"""Reading and writing JSON files with precise errors and atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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
    """Decode a UTF-8 JSON file.

    A leading UTF-8 byte-order mark is accepted.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: ``<file>: ...`` for bytes that are not UTF-8 (with the byte
            offset), an empty file, or malformed JSON (with line and column).
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not valid UTF-8: byte 0x{raw[err.start]:02x} at byte offset {err.start} "
            f"({err.reason})"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"{path}: empty file (no JSON content, no records)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None


def dump_json(obj: Any) -> str:
    """Serialise like the release files: 4-space indent, non-ASCII kept, no final newline."""
    return json.dumps(obj, indent=4, ensure_ascii=False)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder and ``os.replace``.

    Readers never see a half-written file; on failure the temporary file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
