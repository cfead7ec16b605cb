"""Validation of release files: every bad input gives `<file>: <record index>: <problem>` lines."""

import json

import pytest

from aimm.data import DataError, Example, read_records, validate_records


def write(tmp_path, content, name="task_T5.json"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


def problems(path):
    with pytest.raises(DataError) as info:
        read_records(path)
    err = info.value
    assert str(err) == "\n".join(err.lines)
    assert isinstance(err, ValueError)
    return err.lines


GOOD = {"id": "a_0", "input": "x", "output": "y"}


def test_valid_file_gives_examples_and_ignores_extra_fields(tmp_path):
    path = write(tmp_path, [GOOD, {"id": "a_1", "input": "", "output": "", "data_id": 1}])
    assert read_records(path) == [Example("a_0", "x", "y"), Example("a_1", "", "")]


def test_malformed_json_names_line_and_column(tmp_path):
    path = write(tmp_path, '[\n  {"id": "a", "input": "x",\n  "output": }\n]')
    assert problems(path) == [f"{path}: malformed JSON at line 3, column 13: Expecting value"]


def test_wrong_top_level_type(tmp_path):
    path = write(tmp_path, {"Instances": []})
    assert problems(path) == [f"{path}: top-level value must be a JSON list of records, got object"]


def test_missing_id(tmp_path):
    path = write(tmp_path, [GOOD, {"input": "x", "output": "y"}])
    assert problems(path) == [f"{path}: 1: missing field 'id'"]


def test_non_string_output(tmp_path):
    path = write(tmp_path, [GOOD, {"id": "a_1", "input": "x", "output": 3}])
    assert problems(path) == [f"{path}: 1: field 'output' must be a string, got number"]


def test_record_not_an_object(tmp_path):
    path = write(tmp_path, [GOOD, ["a_1", "x", "y"]])
    assert problems(path) == [f"{path}: 1: record must be a JSON object, got list"]


def test_empty_list(tmp_path):
    path = write(tmp_path, [])
    assert problems(path) == [f"{path}: no records (empty list)"]


def test_empty_file(tmp_path):
    path = write(tmp_path, b"")
    assert problems(path) == [f"{path}: empty file (no JSON content, no records)"]


def test_duplicate_ids(tmp_path):
    path = write(tmp_path, [GOOD, {**GOOD, "id": "a_1"}, GOOD])
    assert problems(path) == [f"{path}: 2: duplicate id 'a_0' (first used by record 0)"]


def test_non_utf8_bytes_name_byte_offset(tmp_path):
    raw = b'[{"id": "a", "input": "caf\xe9", "output": "y"}]'
    path = write(tmp_path, raw)
    (line,) = problems(path)
    assert raw.index(b"\xe9") == 26
    assert line == f"{path}: not valid UTF-8: byte 0xe9 at byte offset 26 (invalid continuation byte)"


def test_bom_is_accepted(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert read_records(path) == [Example("a_0", "x", "y")]


def test_all_problems_are_reported_not_only_the_first(tmp_path):
    records = [
        {"id": 1, "input": "x", "output": "y"},
        {"id": "b", "output": None},
        "oops",
        {"id": "b", "input": "x", "output": "y"},
    ]
    lines = problems(write(tmp_path, records))
    path = tmp_path / "task_T5.json"
    assert lines == [
        f"{path}: 0: field 'id' must be a string, got number",
        f"{path}: 1: missing field 'input'",
        f"{path}: 1: field 'output' must be a string, got null",
        f"{path}: 2: record must be a JSON object, got string",
        f"{path}: 3: duplicate id 'b' (first used by record 1)",
    ]


def test_validate_records_uses_given_path_in_messages():
    with pytest.raises(DataError, match=r"^memory\.json: 0: missing field 'output'$"):
        validate_records([{"id": "a", "input": "x"}], "memory.json")


def test_data_error_needs_lines():
    with pytest.raises(ValueError):
        DataError([])
    assert DataError("f: problem").lines == ["f: problem"]
