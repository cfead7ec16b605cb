"""Small helpers shared across the package: name hints, type checks, atomic writes, JSON reads,
the launcher's rank.

Imports only :mod:`aimm.faults` (fault injection for the crash-safety tests) from the package.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from aimm.faults import crash_point


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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *,
                       fault_point: str | None = None) -> None:
    """Temporary file in the same folder, fsync, then ``os.replace``; usual permissions.

    A reader sees the old or the new file, never half of one; on failure the temporary file is
    removed. ``fault_point``: a :func:`aimm.faults.crash_point` reached between the fsync and
    the rename (the crash-safety tests kill the process there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        if fault_point:
            crash_point(fault_point)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8 (newlines as given)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike[str], error: type[Exception] = ValueError,
              empty: str = "no JSON content") -> Any:
    """Decode a UTF-8 JSON file (a leading byte-order mark is accepted).

    Raises ``FileNotFoundError`` for a missing file and ``error("<file>: ...")`` for bytes that
    are not UTF-8 (with the byte offset), an empty file (``empty`` says what is missing) or
    malformed JSON (with line and column)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not valid UTF-8: byte 0x{raw[err.start]:02x} at byte offset "
                    f"{err.start} ({err.reason})") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise error(f"{path}: empty file ({empty})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: "
                    f"{err.msg}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read (arrays or objects nested "
                    f"thousands deep); replace the file") from None


def error_summary(exc: BaseException, limit: int = 200) -> str:
    """``<ExceptionType>: <its first line>`` (two when the first ends in ':'), for a one-line
    message about an error raised by another library."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else "".join(lines[:1])
    return f"{type(exc).__name__}: {text[:limit]}"


def launch_rank() -> int:
    """This process's rank as a launcher (``accelerate launch``, torchrun) set it in ``RANK``; 0
    for a process started alone. For the steps before an accelerator exists: locking the run dir
    and the resume checks, which only rank 0 does."""
    return _launch_number("RANK", 0)


def launch_world_size() -> int:
    """How many processes a launcher started (``WORLD_SIZE``); 1 for a process started alone."""
    return _launch_number("WORLD_SIZE", 1)


def check_launch_variables() -> None:
    """One line naming a launcher variable (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) that is not
    a count, before accelerate parses it into a traceback."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        _launch_number(name, 0)


def _launch_number(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"environment variable {name}={value!r} is not a process count or rank; "
                         "unset it, or start the run with `accelerate launch` or torchrun, which "
                         "set it")
    return number


__all__ = ["atomic_write_bytes", "atomic_write_text", "did_you_mean", "error_summary", "is_int",
           "is_num", "check_launch_variables", "launch_rank", "launch_world_size", "read_json"]
