"""Conversion of raw CL_Benchmark / Instances folders into the release layout."""

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from aimm.data import (
    DataError,
    build_prompt,
    convert_benchmark,
    main_convert,
    read_records,
    resolve_data_dir,
    split_prompt,
)

TC = "What is the topic of the following paragraph? Choose one from the option. "
NLI = 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option. '


def real_data_dir() -> Path:
    """The real benchmark folder; fails under CI when absent, skips otherwise."""
    try:
        return resolve_data_dir()
    except FileNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(f"real benchmark data is required when CI is set: {err}")
        pytest.skip(f"real benchmark data not available: {err}")


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def make_cl_task(root: Path, group: str, task: str, labels, splits) -> Path:
    folder = root / group / task
    dump(folder / "labels.json", labels)
    for split, rows in splits.items():
        dump(folder / f"{split}.json", [{"sentence": s, "label": lab} for s, lab in rows])
    return folder


def test_cl_benchmark_prompts_ids_and_selection(tmp_path):
    train = [(f"Title: t{i}\nText: body {i}\n", ["World", "Sports"][i % 2]) for i in range(30)]
    dev = [(f"dev {i}", "World") for i in range(12)]
    test = [(f"test {i}", "Sports") for i in range(7)]
    make_cl_task(tmp_path / "raw", "TC", "AGNews", ["World", "Sports", "Business"],
                 {"train": train, "dev": dev, "test": test})
    paths = convert_benchmark(tmp_path / "raw", tmp_path / "out", max_train=10, max_dev=5)
    base = tmp_path / "out" / "data_longsequence"
    assert paths == [base / s / "agnews_T5.json" for s in ("train", "dev", "test")]

    got = read_records(base / "train" / "agnews_T5.json")
    expected = list(train)
    random.Random(42).shuffle(expected)
    assert [(e.id, e.input, e.output) for e in got] == [
        (f"AGNews_{i}", f"{TC}Option: World, Sports, Business.\n{s}\nAnswer:", lab)
        for i, (s, lab) in enumerate(expected[:10])
    ]
    assert got[0].input.endswith("\n\nAnswer:")  # sentence ends with a newline, as agnews in the release
    assert len(read_records(base / "dev" / "agnews_T5.json")) == 5
    test_got = read_records(base / "test" / "agnews_T5.json")
    assert [e.input for e in test_got] == [f"{TC}Option: World, Sports, Business.\n{s}\nAnswer:" for s, _ in test]

    text = (base / "test" / "agnews_T5.json").read_text(encoding="utf-8")
    assert text == json.dumps([{"id": e.id, "input": e.input, "output": e.output} for e in test_got],
                              indent=4, ensure_ascii=False)


def test_default_limits_are_1000_train_500_dev(tmp_path):
    rows = [(f"s{i}", "entailment") for i in range(1200)]
    make_cl_task(tmp_path / "raw", "NLI", "CB", ["entailment", "contradiction", "neutral"],
                 {"train": rows, "dev": rows[:600], "test": rows[:600]})
    convert_benchmark(tmp_path / "raw" / "NLI" / "CB", tmp_path / "out")  # one task folder as src
    base = tmp_path / "out" / "data_longsequence"
    assert [len(read_records(base / s / "cb_T5.json")) for s in ("train", "dev", "test")] == [1000, 500, 600]
    first = read_records(base / "train" / "cb_T5.json")[0]
    assert first.input.startswith(NLI + "Option: entailment, contradiction, neutral.\ns")


def test_instances_variant_keeps_input_and_takes_first_output(tmp_path):
    folder = tmp_path / "raw" / "SuperNI" / "task999"
    instances = [{"id": f"task999-{i}", "input": f"[INS] do\n [IN] {i}\n [OUT] ", "output": [f"o{i}", "alt"]}
                 for i in range(4)]
    dump(folder / "test.json", {"Definition": ["x"], "Instances": instances})
    dump(folder / "train.json", {"Instances": [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}]})
    convert_benchmark(tmp_path / "raw", tmp_path / "out", "data_superni")
    base = tmp_path / "out" / "data_superni"
    test = read_records(base / "test" / "task999_T5.json")
    assert [(e.id, e.input, e.output) for e in test] == [
        (f"task999-{i}", f"[INS] do\n [IN] {i}\n [OUT] ", f"o{i}") for i in range(4)
    ]
    train = read_records(base / "train" / "task999_T5.json")
    assert sorted(e.id for e in train) == ["task999_0", "task999_1"]  # no own ids: generated
    assert not (base / "dev").exists()


def test_instances_of_a_long_sequence_task_with_labels_are_prompted(tmp_path):
    folder = tmp_path / "raw" / "Long_Sequence" / "yelp"
    dump(folder / "labels.json", ["bad", "good"])
    dump(folder / "test.json", {"Instances": [{"input": "Text: fine", "output": "good"}]})
    convert_benchmark(tmp_path / "raw", tmp_path / "out")
    (example,) = read_records(tmp_path / "out" / "data_longsequence" / "test" / "yelp_T5.json")
    assert example.input == build_prompt("yelp", ["bad", "good"], "Text: fine")
    assert example.input.startswith("What is the sentiment of the following paragraph?")


def test_bad_raw_data_reports_every_problem_and_writes_nothing(tmp_path):
    folder = tmp_path / "raw" / "TC" / "dbpedia"
    dump(folder / "labels.json", ["A", "B"])
    dump(folder / "train.json", [{"sentence": "s", "label": 1}, {"label": "A"}])
    dump(tmp_path / "raw" / "X" / "unknowntask" / "test.json", [{"sentence": "s", "label": "A"}])
    dump(tmp_path / "raw" / "Y" / "mnli" / "test.json", {"Instances": [{"input": "x", "output": []}]})
    with pytest.raises(DataError) as info:
        convert_benchmark(tmp_path / "raw", tmp_path / "out")
    train = folder / "train.json"
    assert info.value.lines == [
        f"{train}: 0: field 'label' must be a string, got number",
        f"{train}: 1: missing field 'sentence'",
        f"{tmp_path / 'raw' / 'X' / 'unknowntask' / 'labels.json'}: missing "
        f"(needed to prompt {tmp_path / 'raw' / 'X' / 'unknowntask' / 'test.json'})",
        f"{tmp_path / 'raw' / 'Y' / 'mnli' / 'test.json'}: 0: field 'output' must be a string "
        "or a non-empty list of strings",
    ]
    assert not (tmp_path / "out").exists()


def test_unknown_task_type_is_an_error(tmp_path):
    make_cl_task(tmp_path / "raw", "G", "newtask", ["a"], {"test": [("s", "a")]})
    with pytest.raises(DataError, match=r"newtask: no instruction for task 'newtask'; known tasks: agnews"):
        convert_benchmark(tmp_path / "raw", tmp_path / "out")


def test_no_task_folders(tmp_path):
    (tmp_path / "raw" / "empty").mkdir(parents=True)
    with pytest.raises(DataError, match="no task folders found"):
        convert_benchmark(tmp_path / "raw", tmp_path / "out")


def test_never_overwrites_a_different_file_silently(tmp_path, capsys):
    make_cl_task(tmp_path / "raw", "SC", "imdb", ["Good", "Bad"], {"test": [("nice", "Good")]})
    (path,) = convert_benchmark(tmp_path / "raw", tmp_path / "out")
    original = path.read_bytes()
    assert convert_benchmark(tmp_path / "raw", tmp_path / "out") == [path]  # identical: fine
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(FileExistsError, match="exists with different content"):
        convert_benchmark(tmp_path / "raw", tmp_path / "out")
    assert path.read_text(encoding="utf-8") == "[]"
    assert main_convert(tmp_path / "raw", tmp_path / "out") == 2
    assert "exists with different content" in capsys.readouterr().err
    convert_benchmark(tmp_path / "raw", tmp_path / "out", overwrite=True)
    assert path.read_bytes() == original
    assert [p.name for p in path.parent.iterdir()] == ["imdb_T5.json"]  # no temp files left


def test_main_convert_success(tmp_path, capsys):
    make_cl_task(tmp_path / "raw", "SC", "imdb", ["Good", "Bad"], {"test": [("nice", "Good")]})
    assert main_convert(tmp_path / "raw", tmp_path / "out") == 0
    assert "imdb_T5.json" in capsys.readouterr().out


def test_split_prompt_inverts_build_prompt():
    prompt = build_prompt("dbpedia", ["Company", "Natural Place"], "Title: x\nText: y.\n")
    assert split_prompt(prompt) == (TC, ["Company", "Natural Place"], "Title: x\nText: y.\n")
    with pytest.raises(ValueError):
        split_prompt("no prompt here")


def test_release_test_files_are_reproduced(tmp_path):
    """Rebuild raw CL_Benchmark test files from the release's test files, convert them
    back, and compare: same (input, output) multiset, and here even the same bytes."""
    folder = real_data_dir() / "data_longsequence" / "test"
    releases = sorted(folder.glob("*_T5.json"))
    assert releases, f"no test files in {folder}"
    for release in releases:
        records = read_records(release)
        task = records[0].id.rpartition("_")[0]  # e.g. "MNLI": the release ids keep the raw folder name
        instruction, labels, _ = split_prompt(records[0].input)
        rows = []
        for r in records:
            ins, labs, sentence = split_prompt(r.input)
            assert (ins, labs) == (instruction, labels), f"{release}: {r.id}: prompt header differs"
            rows.append((sentence, r.output))
        make_cl_task(tmp_path / "raw", "G", task, labels, {"test": rows})
    paths = convert_benchmark(tmp_path / "raw", tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(p.name for p in releases)
    for path in paths:
        release = folder / path.name
        got, want = read_records(path), read_records(release)
        assert Counter((e.input, e.output) for e in got) == Counter((e.input, e.output) for e in want)
        assert path.read_bytes() == release.read_bytes()
