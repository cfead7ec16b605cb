"""The release record format: a JSON list of ``{"id", "input", "output"}`` strings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .jsonio import json_type, read_json

#: Fields every record must have, each a string. Other fields (SuperNI files
#: carry an integer ``data_id``) are allowed and ignored.
REQUIRED_FIELDS: tuple[str, ...] = ("id", "input", "output")


@dataclass(frozen=True)
class Example:
    """One example: a prompt (``input``) and its target text (``output``)."""

    id: str
    input: str
    output: str


def validate_records(obj: Any, path: str | os.PathLike[str]) -> list[Example]:
    """Check a decoded release file and turn it into examples.

    Every problem is collected before raising, one line each:
    ``<path>: <problem>`` when the value is not a list or holds no records, and
    ``<path>: <i>: <problem>`` (``i`` the 0-based record index) for a record that is
    not an object, lacks ``id``/``input``/``output``, has a non-string one, or
    repeats an earlier record's id. Empty strings are allowed.

    Args:
        obj: the decoded JSON value.
        path: the file it came from (only used in messages).

    Raises:
        DataError: with all problem lines.
    """
    if not isinstance(obj, list):
        raise DataError(
            f"{path}: top-level value must be a JSON list of records, got {json_type(obj)}"
        )
    if not obj:
        raise DataError(f"{path}: no records (empty list)")
    problems: list[str] = []
    examples: list[Example] = []
    first_index: dict[str, int] = {}
    for index, record in enumerate(obj):
        if not isinstance(record, dict):
            problems.append(f"{path}: {index}: record must be a JSON object, got {json_type(record)}")
            continue
        bad = False
        for field in REQUIRED_FIELDS:
            if field not in record:
                problems.append(f"{path}: {index}: missing field {field!r}")
                bad = True
            elif not isinstance(record[field], str):
                problems.append(
                    f"{path}: {index}: field {field!r} must be a string, "
                    f"got {json_type(record[field])}"
                )
                bad = True
        record_id = record.get("id")
        if isinstance(record_id, str):
            if record_id in first_index:
                problems.append(
                    f"{path}: {index}: duplicate id {record_id!r} "
                    f"(first used by record {first_index[record_id]})"
                )
                bad = True
            else:
                first_index[record_id] = index
        if not bad:
            examples.append(Example(record["id"], record["input"], record["output"]))
    if problems:
        raise DataError(problems)
    return examples


def read_records(path: str | os.PathLike[str]) -> list[Example]:
    """Read and validate one release file (see :func:`validate_records`)."""
    return validate_records(read_json(path), path)
