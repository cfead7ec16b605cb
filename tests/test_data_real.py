"""The real benchmark data (../shared/benchmarks/aimm): every task of every order loads.

Fails (not skips) when the data is missing and the CI environment variable is set.
"""

import os
from collections import Counter
from pathlib import Path

import pytest

from aimm.data import (
    ORDERS,
    build_memory,
    check_benchmark,
    inspect_benchmark,
    load_task,
    load_tasks,
    main_check,
    memory_buffers,
    split_prompt,
    task_metric,
)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    from aimm.data import resolve_data_dir
    try:
        return resolve_data_dir()
    except FileNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(f"real benchmark data is required when CI is set: {err}")
        pytest.skip(f"real benchmark data not available: {err}")


@pytest.fixture(scope="module")
def loaded(data_dir):
    tasks = {}
    for benchmark, orders in ORDERS.items():
        names = sorted({t for order in orders.values() for t in order})
        tasks[benchmark] = load_tasks(data_dir, benchmark, names)
    return tasks


def test_every_task_of_every_order_loads_with_sane_counts(loaded):
    assert {b: len(t) for b, t in loaded.items()} == {"standard_cl": 4, "long_sequence": 15, "superni": 15}
    for benchmark, tasks in loaded.items():
        for name, task in tasks.items():
            assert 100 <= len(task.train) <= 1000, name
            assert len(task.test) >= 16, name
            assert len({e.id for e in task.train}) == len(task.train)
            if benchmark != "superni":
                assert task.is_classification and task.label_set, name
                assert {e.output for e in task.test} <= set(task.label_set), name
                assert task_metric(benchmark, name) == "accuracy"
    ls = loaded["long_sequence"]
    assert [len(ls[t].test) for t in ("dbpedia", "agnews", "amazon", "yelp", "cb", "rte")] == [
        7000, 2000, 2500, 2500, 56, 277]
    assert len(ls["dbpedia"].label_set) == 14 and len(ls["yahoo"].label_set) == 10
    assert len(loaded["superni"]["task073"].train) == 975


def test_yahoo_falls_back_to_dev_with_a_warning(loaded):
    for benchmark in ("standard_cl", "long_sequence"):
        yahoo = loaded[benchmark]["yahoo"]
        assert yahoo.test_split == "dev" and len(yahoo.test) == 500
        assert len(yahoo.warnings) == 1 and yahoo.warnings[0].startswith("yahoo: no test split at ")
        others = [t for n, t in loaded[benchmark].items() if n != "yahoo"]
        assert all(t.test_split == "test" and not t.warnings for t in others)


def test_superni_labels_and_metrics(loaded):
    sn = loaded["superni"]
    classification = sorted(n for n, t in sn.items() if t.is_classification)
    assert classification == ["task073", "task1687", "task363", "task875"]
    assert sorted(n for n in sn if task_metric("superni", n) == "accuracy") == ["task1687", "task363", "task875"]


def test_subsampling_64_100_keeps_every_dbpedia_label(data_dir):
    task = load_task(data_dir, "standard_cl", "dbpedia", max_train=64, max_test=100)
    assert len(task.train) == 64 and len(task.test) == 100
    assert {e.output for e in task.train} == set(task.label_set)
    assert {e.output for e in task.test} == set(task.label_set)
    assert Counter(e.output for e in task.test) == Counter({lab: (8 if i < 2 else 7) for i, lab in enumerate(task.label_set)})
    assert task.train == load_task(data_dir, "standard_cl", "dbpedia", max_train=64).train


def test_prompts_follow_the_spec(loaded):
    for name, task in loaded["long_sequence"].items():
        instruction, labels, _ = split_prompt(task.train[0].input)
        assert instruction.endswith("Choose one from the option. "), name
        assert set(labels) >= set(task.label_set) - {"-"}, name


def test_memory_on_order_4_official_vs_capped(loaded):
    order = ORDERS["long_sequence"][4]
    train = {t: loaded["long_sequence"][t].train for t in order[:-1]}
    official = memory_buffers(train)
    assert official["cb"] and len(official["cb"]) == 5 and len(official["copa"]) == 8
    assert all(len(v) == 20 for k, v in official.items() if k not in ("cb", "copa"))
    assert build_memory(train, mode="capped") == build_memory(train)  # classification only: no difference


def test_memory_on_superni_official_is_uncapped(loaded):
    order = ORDERS["superni"][1]
    train = {t: loaded["superni"][t].train for t in order}
    official = memory_buffers(train)
    capped = memory_buffers(train, mode="capped")
    assert len(official["task748"]) == 1000 and len(capped["task748"]) == 20  # all-unique outputs
    assert len(official["task363"]) == len(capped["task363"]) == 20
    assert sum(map(len, official.values())) > 7000 > 300 > sum(map(len, capped.values()))


def test_check_benchmark_real_data(data_dir, capsys):
    assert check_benchmark(data_dir) == []
    report = inspect_benchmark(data_dir)
    assert report.n_files == 89
    assert any(w.startswith("yahoo: no test split") for w in report.warnings)
    assert main_check(data_dir) == 0
    assert capsys.readouterr().out.startswith("OK: 89 files, ")
