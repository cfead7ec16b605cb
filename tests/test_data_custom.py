"""Tasks from local datasets (JSONL, Parquet, save_to_disk) through ``datasets``: strict
validation, a run on them, and conversion to the release layout."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from aimm.cli import main
from aimm.config import ConfigError, RunConfig
from aimm.data import DataError, load_task
from aimm.data.custom import parse_task_spec, read_custom_task

PROMPT = "Classify the sentiment. Option: positive, negative.\n{input}\nAnswer:"


def _rows(n: int, offset: int = 0) -> list[dict]:
    words = ["good", "bad", "great", "awful"]
    return [{"text": f"review {offset + i}: {words[i % 4]}",
             "label": "positive" if i % 2 == 0 else "negative"} for i in range(n)]


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("custom")
    jsonl = root / "sent_jsonl"
    jsonl.mkdir()
    for split, rows in (("train", _rows(12)), ("validation", _rows(4, 100))):
        (jsonl / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = root / "sent_parquet"
    parquet.mkdir()
    pd.DataFrame(_rows(12, 200)).to_parquet(parquet / "train.parquet")
    pd.DataFrame(_rows(4, 300)).to_parquet(parquet / "test.parquet")
    return root


def test_jsonl_and_parquet_tasks_read_with_prompt_ids_and_dev_fallback(datasets_dir):
    spec = parse_task_spec({"name": "sent", "path": str(datasets_dir / "sent_jsonl"),
                            "input": "text", "output": "label", "prompt": PROMPT})
    train, test, split, warnings = read_custom_task(spec)
    assert len(train) == 12 and len(test) == 4 and split == "validation"
    assert warnings == [f"sent: no test split in {datasets_dir / 'sent_jsonl'}; evaluating on validation"]
    assert train[0].input == PROMPT.replace("{input}", "review 0: good") and train[0].output == "positive"
    assert train[1].id == "train-1"
    spec = parse_task_spec({"name": "pq", "path": str(datasets_dir / "sent_parquet"),
                            "input": "text", "output": "label"})
    train, test, split, warnings = read_custom_task(spec)
    assert (len(train), len(test), split, warnings) == (12, 4, "test", [])
    assert test[0].input == "review 300: good"


def test_save_to_disk_folder_with_class_labels_gives_label_names(tmp_path):
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    data = {"sentence": ["a", "b", "c"], "label": [0, 1, 1]}
    ds = datasets.DatasetDict({s: datasets.Dataset.from_dict(data, features=features)
                               for s in ("train", "test")})
    ds.save_to_disk(str(tmp_path / "disk"))
    spec = parse_task_spec({"name": "d", "path": str(tmp_path / "disk"), "input": "sentence",
                            "output": "label"})
    train, test, _, _ = read_custom_task(spec)
    assert [e.output for e in train] == ["neg", "pos", "pos"]


def test_bad_rows_are_named_by_path_split_and_row(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    rows = [{"id": "a", "text": "x", "label": "pos"}, {"id": "b", "text": "y", "label": 1},
            {"id": "a", "text": "z", "label": "neg"}, {"id": "c", "text": None, "label": "neg"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text(json.dumps({"id": "t", "txt": "q", "label": "pos"}) + "\n")
    spec = parse_task_spec({"name": "bad", "path": str(folder), "input": "text", "output": "label"})
    with pytest.raises(DataError) as err:
        read_custom_task(spec)
    assert err.value.lines == [
        f"{folder} (train): 1: column 'label' must be a string, got int 1",
        f"{folder} (train): 2: duplicate id 'a' (first used by row 0)",
        f"{folder} (train): 3: column 'text' is missing (null)",
        f"{folder} (test): missing column 'text' (columns: id, txt, label)",
    ]
    with pytest.raises(DataError, match=r"no split .val. \(splits: test, train\)"):
        read_custom_task(parse_task_spec({"name": "bad", "path": str(folder), "input": "text",
                                          "output": "label", "splits": {"test": "val"}}))
    with pytest.raises(DataError, match="no such file or folder"):
        read_custom_task(parse_task_spec({"name": "x", "path": str(tmp_path / "nope")}))


@pytest.mark.parametrize("spec, message", [
    ({"name": "s", "path": "p", "ouput": "label"}, "unknown key 'ouput' (did you mean 'output'?)"),
    ({"name": "../evil", "path": "p"}, "name='../evil': must be letters"),
    ({"name": "s", "path": "p", "prompt": "no placeholder"}, "must be a string containing {input}"),
    ({"name": "s", "path": "p", "splits": {"dev": "x"}}, "must map train / test to split names"),
    ({"name": "s"}, "path=None: must be a non-empty string"),
])
def test_spec_problems_fail_in_the_config(spec, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"tasks": ["sst-2", spec], "run_dir": str(tmp_path / "r")})
    assert message in str(err.value)


@pytest.mark.slow
def test_a_run_on_two_local_datasets(datasets_dir, tmp_path):
    from aimm.training.engine import run
    from aimm.runs import load_metrics

    tasks = [{"name": "sent", "path": str(datasets_dir / "sent_jsonl"), "input": "text",
              "output": "label", "prompt": PROMPT},
             {"name": "pq", "path": str(datasets_dir / "sent_parquet"), "input": "text",
              "output": "label", "splits": {"train": "train", "test": "test"}}]
    cfg = RunConfig.from_dict(dict(tasks=tasks, model="tiny-causal", method="replay", max_train=8,
                                   max_test=4, batch_size=4, max_input_len=64, eval_batch_size=8,
                                   data_dir=str(tmp_path / "no-release-data-needed"),
                                   run_dir=str(tmp_path / "run"), progress=False))
    assert cfg.task_names() == ["sent", "pq"]
    run_dir = run(cfg)
    assert load_metrics(run_dir)["complete"] is True
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["01_sent", "02_pq"]
    preds = (run_dir / "stages" / "02_pq" / "predictions" / "sent.jsonl").read_text().splitlines()
    assert len(preds) == 4
    assert any("evaluating on validation" in w for w in json.loads((run_dir / "warnings.json").read_text()))


def test_convert_writes_the_release_layout(datasets_dir, tmp_path, capsys):
    src = datasets_dir / "sent_parquet"
    assert main(["data", "convert", str(src), str(tmp_path / "out"), "--name", "pq", "--input",
                 "text", "--output", "label", "--prompt", PROMPT]) == 0
    task = load_task(tmp_path / "out", "long_sequence", "pq")
    assert len(task.train) == 12 and len(task.test) == 4 and task.label_set == ["negative", "positive"]
    assert task.test[0].input == PROMPT.replace("{input}", "review 300: good")
    assert main(["data", "convert", str(src), str(tmp_path / "out"), "--name", "pq", "--input", "txt"]) == 2
    assert "missing column 'txt'" in capsys.readouterr().err


def _convert(src, dst, *extra) -> int:
    return main(["data", "convert", str(src), str(dst), "--name", "pq", "--input", "text",
                 "--output", "label", *extra])


def test_convert_checks_every_target_before_writing_anything(datasets_dir, tmp_path, capsys):
    test_file = tmp_path / "out" / "data_longsequence" / "test" / "pq_T5.json"
    test_file.parent.mkdir(parents=True)
    test_file.write_text("[]")
    assert _convert(datasets_dir / "sent_parquet", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"aimm data: error: {test_file}: exists with different content (pass "
                   "--overwrite, or overwrite=True, to replace it)")
    assert not (tmp_path / "out" / "data_longsequence" / "train").exists()  # no partial output
    assert test_file.read_text() == "[]"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data_longsequence"]


def test_convert_overwrite_replaces_different_files_and_identical_ones_are_fine(
        datasets_dir, tmp_path, capsys):
    src, out = datasets_dir / "sent_parquet", tmp_path / "out"
    assert _convert(src, out) == 0
    assert _convert(src, out) == 0  # identical content: nothing to refuse
    train_file = out / "data_longsequence" / "train" / "pq_T5.json"
    good = train_file.read_text()
    other = out / "data_longsequence" / "train" / "other_T5.json"
    other.write_text("kept")
    train_file.write_text("[]")
    assert _convert(src, out) == 2 and train_file.read_text() == "[]"
    assert _convert(src, out, "--overwrite") == 0
    assert train_file.read_text() == good and other.read_text() == "kept"
    assert len(load_task(out, "long_sequence", "pq").train) == 12


def test_convert_refuses_a_name_with_a_newline(datasets_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"name='abc\\n': must be letters"):
        parse_task_spec({"name": "abc\n", "path": "p"})
    assert main(["data", "convert", str(datasets_dir / "sent_parquet"), str(tmp_path / "out"),
                 "--name", "abc\n", "--input", "text", "--output", "label"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name='abc\\n'" in err and "letters, digits" in err
    assert not (tmp_path / "out").exists()
