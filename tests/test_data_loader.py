"""Loading tasks from a small synthetic release layout; subsampling; data-dir resolution."""

import json
from collections import Counter
from pathlib import Path

import pytest

import aimm.data.paths as paths_module
from aimm.data import (
    DataError,
    Example,
    allocate,
    find_task_file,
    load_task,
    load_tasks,
    resolve_data_dir,
    subsample,
)


def put(root: Path, split: str, task: str, outputs, folder="data_longsequence"):
    path = root / folder / split / f"{task}_T5.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"id": f"{task}_{i}", "input": f"q{i}", "output": o}
                                for i, o in enumerate(outputs)]), encoding="utf-8")
    return path


def test_load_task_with_test_split(tmp_path):
    put(tmp_path, "train", "cb", ["e", "c", "n", "e"] * 10)
    put(tmp_path, "test", "cb", ["e", "c"])
    task = load_task(tmp_path, "long_sequence", "CB")
    assert (task.name, task.test_split, task.warnings) == ("cb", "test", [])
    assert task.label_set == ["c", "e", "n"] and task.is_classification
    assert len(task.train) == 40 and task.test[0] == Example("cb_0", "q0", "e")


def test_missing_test_falls_back_to_dev_with_warning(tmp_path):
    put(tmp_path, "train", "yahoo", ["a", "b"] * 5)
    dev = put(tmp_path, "dev", "yahoo", ["a"])
    task = load_task(tmp_path, "standard_cl", "yahoo")
    expected = tmp_path / "data_longsequence" / "test" / "yahoo_T5.json"
    assert task.test_split == "dev"
    assert task.warnings == [f"yahoo: no test split at {expected}; evaluating on dev split {dev}"]


def test_missing_train_names_the_expected_path(tmp_path):
    put(tmp_path, "test", "cb", ["e"])
    with pytest.raises(DataError) as info:
        load_task(tmp_path, "long_sequence", "cb")
    assert info.value.lines == [f"{tmp_path / 'data_longsequence' / 'train' / 'cb_T5.json'}: missing train split for task 'cb'"]


def test_missing_test_and_dev(tmp_path):
    put(tmp_path, "train", "cb", ["e"])
    with pytest.raises(DataError, match="missing test split for task 'cb', and no dev split at"):
        load_task(tmp_path, "long_sequence", "cb")


def test_labels_unseen_in_train_warn(tmp_path):
    put(tmp_path, "train", "mnli", ["e", "n"] * 5)
    put(tmp_path, "test", "mnli", ["e", "-", "-"])
    assert load_task(tmp_path, "long_sequence", "mnli").warnings == [
        "mnli: test split has label(s) never seen in train: '-' (2)"
    ]


def test_generation_task_has_no_label_set_and_no_label_warning(tmp_path):
    put(tmp_path, "train", "task1290", [f"summary {i}" for i in range(20)], "data_superni")
    put(tmp_path, "test", "task1290", ["new summary"], "data_superni")
    task = load_task(tmp_path, "superni", "task1290")
    assert task.label_set == [] and task.warnings == [] and not task.is_classification


def test_load_tasks_reports_problems_of_every_task(tmp_path):
    put(tmp_path, "train", "cb", ["e"])
    put(tmp_path, "test", "cb", ["e"])
    bad = tmp_path / "data_longsequence" / "train" / "rte_T5.json"
    bad.write_text("[", encoding="utf-8")
    put(tmp_path, "test", "rte", ["e"])
    with pytest.raises(DataError) as info:
        load_tasks(tmp_path, "long_sequence", ["cb", "rte", "wic"])
    assert [line.split(": ")[0] for line in info.value.lines] == [
        str(bad), str(tmp_path / "data_longsequence" / "train" / "wic_T5.json"),
        str(tmp_path / "data_longsequence" / "test" / "wic_T5.json"),
    ]
    assert list(load_tasks(tmp_path, "long_sequence", ["cb"], max_train=1)) == ["cb"]


def test_find_task_file(tmp_path):
    path = put(tmp_path, "dev", "boolqa", ["True"])
    assert find_task_file(tmp_path, "long_sequence", "dev", "BoolQA") == path
    with pytest.raises(FileNotFoundError, match="boolqa_T5.json: no test split"):
        find_task_file(tmp_path, "long_sequence", "test", "boolqa")
    with pytest.raises(ValueError, match="valid splits: train, dev, test"):
        find_task_file(tmp_path, "long_sequence", "validation", "boolqa")


def examples(outputs):
    return [Example(str(i), str(i), o) for i, o in enumerate(outputs)]


def test_allocate_is_proportional_with_a_floor_of_one():
    assert allocate({"a": 98, "b": 1, "c": 1}, 3) == {"a": 1, "b": 1, "c": 1}
    assert allocate({"a": 50, "b": 30, "c": 20}, 10) == {"a": 5, "b": 3, "c": 2}
    assert allocate({"a": 60, "b": 20, "c": 20}, 2) == {"a": 1, "b": 1, "c": 0}  # remainders .2 .4 .4
    assert sum(allocate({"a": 7, "b": 5, "c": 3}, 7).values()) == 7


def test_subsample_stratified_keeps_labels_order_and_is_deterministic():
    data = examples(["big"] * 90 + ["mid"] * 8 + ["rare"] * 2)
    picked = subsample(data, 10, seed=3)
    assert Counter(e.output for e in picked) == {"big": 8, "mid": 1, "rare": 1}
    assert picked == sorted(picked, key=lambda e: int(e.id))
    assert picked == subsample(data, 10, seed=3) and picked != subsample(data, 10, seed=4)


def test_subsample_all_and_generation():
    data = examples([f"o{i}" for i in range(50)])
    assert subsample(data, None) == data and subsample(data, 80) == data
    picked = subsample(data, 5, seed=1)
    assert len(picked) == 5 and picked == sorted(picked, key=lambda e: int(e.id))
    with pytest.raises(ValueError):
        subsample(data, -1)


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv("AIMM_DATA", raising=False)
    assert resolve_data_dir(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="given explicitly"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("AIMM_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    monkeypatch.setenv("AIMM_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"\$AIMM_DATA"):
        resolve_data_dir()
    monkeypatch.delenv("AIMM_DATA")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "aimm").mkdir(parents=True)
    assert resolve_data_dir() == Path("data") / "aimm"
    monkeypatch.setattr(paths_module, "_REPO_ROOT", tmp_path / "repo")
    (tmp_path / "data" / "aimm").rmdir()
    with pytest.raises(FileNotFoundError, match="tried: .*data/aimm.*shared/benchmarks/aimm"):
        resolve_data_dir()
