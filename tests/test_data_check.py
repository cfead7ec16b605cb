"""check_benchmark / main_check on small synthetic folders."""

import json
from pathlib import Path

from aimm.data import check_benchmark, inspect_benchmark, main_check


def put(root, rel, obj):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def records(task, outputs):
    return [{"id": f"{task}_{i}", "input": "x", "output": o} for i, o in enumerate(outputs)]


def test_valid_folder_with_dev_fallback(tmp_path, capsys):
    put(tmp_path, "data_longsequence/train/cb_T5.json", records("cb", ["a", "b"] * 3))
    put(tmp_path, "data_longsequence/test/cb_T5.json", records("cb", ["a", "c"]))
    put(tmp_path, "data_longsequence/train/yahoo_T5.json", records("yahoo", ["a"] * 4))
    put(tmp_path, "data_longsequence/dev/yahoo_T5.json", records("yahoo", ["a"]))
    report = inspect_benchmark(tmp_path)
    assert report.errors == [] and (report.n_files, report.n_records) == (4, 13)
    assert any(w.startswith("yahoo: no test split at") for w in report.warnings)
    assert "cb: test split has label(s) never seen in train: 'c' (1)" in report.warnings
    assert any("task 'mnli' of long_sequence order 4 not found" in w for w in report.warnings)
    assert main_check(tmp_path) == 0
    assert capsys.readouterr().out == "OK: 4 files, 13 records\n"


def test_errors_are_all_reported(tmp_path, capsys):
    bad = put(tmp_path, "data_superni/train/task1_T5.json", "[{\"id\": 1}]")
    put(tmp_path, "data_superni/test/task1_T5.json", records("task1", ["a"]))
    put(tmp_path, "data_superni/test/task2_T5.json", records("task2", ["a"]))
    put(tmp_path, "data_superni/train/task3_T5.json", records("task3", ["a"]))
    (tmp_path / "data_superni" / "validation").mkdir()
    errors = check_benchmark(tmp_path)
    root = tmp_path / "data_superni"
    assert errors == [
        f"{root / 'validation'}: unexpected folder (expected only train, dev, test)",
        f"{bad}: 0: field 'id' must be a string, got number",
        f"{bad}: 0: missing field 'input'",
        f"{bad}: 0: missing field 'output'",
        f"{root / 'train' / 'task2_T5.json'}: missing train split for task 'task2'",
        f"{root / 'test' / 'task3_T5.json'}: missing test split for task 'task3', and no dev split",
    ]
    assert main_check(tmp_path) == 1
    assert "FAILED: 6 error(s)" in capsys.readouterr().err


def test_unknown_layout(tmp_path):
    put(tmp_path, "train/cb.json", [])
    assert check_benchmark(tmp_path) == [
        f"{tmp_path}: unknown layout: expected data_longsequence/ and/or data_superni/ "
        "(each with train, dev, test/ holding <task>_T5.json files)"
    ]
    assert check_benchmark(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a directory"]


def test_main_check_missing_dir(tmp_path, capsys):
    assert main_check(tmp_path / "nope") == 1
    assert "does not exist" in capsys.readouterr().err


def valid_task(root, task="cb"):
    put(root, f"data_longsequence/train/{task}_T5.json", records(task, ["a", "b"] * 3))
    put(root, f"data_longsequence/test/{task}_T5.json", records(task, ["a", "b"]))


def check_in_child(root, timeout=20):
    """``main_check(root)`` in a child process (a FIFO once blocked the reader for ever): its
    exit status, stdout and stderr."""
    import subprocess
    import sys

    code = "import sys; from aimm.data import main_check; sys.exit(main_check(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def test_a_fifo_is_reported_not_read(tmp_path):
    import os

    import pytest

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    valid_task(tmp_path)
    fifo = tmp_path / "data_longsequence" / "train" / "rte_T5.json"
    os.mkfifo(fifo)
    put(tmp_path, "data_longsequence/test/rte_T5.json", records("rte", ["a", "b"]))
    rc, out, err = check_in_child(tmp_path)
    assert rc == 1 and out == ""
    assert f"{fifo}: not a regular file but a FIFO (named pipe); not read" in err.splitlines()
    assert "FAILED: 1 error(s)" in err  # the FIFO only: rte's train split is not also "missing"


def test_links_to_special_or_missing_files_are_reported_not_read(tmp_path):
    import os

    import pytest

    special = "/dev/null"  # not /dev/zero: a check that read it would never end
    if not os.path.exists(special):
        pytest.skip("no /dev/null")
    valid_task(tmp_path)
    train = tmp_path / "data_longsequence" / "train"
    (train / "rte_T5.json").symlink_to(special)
    (train / "wic_T5.json").symlink_to(tmp_path / "nowhere.json")
    for task in ("rte", "wic"):
        put(tmp_path, f"data_longsequence/test/{task}_T5.json", records(task, ["a", "b"]))
    errors = check_benchmark(tmp_path)
    assert errors == [
        f"{train / 'rte_T5.json'}: not a regular file but a character device "
        f"(through a symbolic link to {Path(special).resolve()}); not read",
        f"{train / 'wic_T5.json'}: cannot be read (a symbolic link to {tmp_path / 'nowhere.json'}): "
        "No such file or directory",
    ]
    (train / "rte_T5.json").unlink()
    (train / "wic_T5.json").unlink()
    (tmp_path / "data_longsequence" / "test" / "wic_T5.json").unlink()
    (train / "rte_T5.json").symlink_to(train / "cb_T5.json")  # a link to a regular file: read
    put(tmp_path, "data_longsequence/test/rte_T5.json", records("cb", ["a", "b"]))
    assert check_benchmark(tmp_path) == []
