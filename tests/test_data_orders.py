"""Task orders (spec section 9) and per-task metrics (spec section 8)."""

import pytest

from aimm.data import BENCHMARK_FOLDERS, ORDERS, resolve_order, task_metric


def test_orders_shape():
    assert {b: sorted(o) for b, o in ORDERS.items()} == {
        "standard_cl": [1, 2, 3], "long_sequence": [4, 5, 6], "superni": [1, 2]}
    for benchmark, orders in ORDERS.items():
        sizes = {len(tasks) for tasks in orders.values()}
        assert sizes == ({4} if benchmark == "standard_cl" else {15})
        assert len({frozenset(tasks) for tasks in orders.values()}) == 1  # same tasks, permuted
    assert ORDERS["long_sequence"][4][:3] == ["mnli", "cb", "wic"]
    assert ORDERS["superni"][2][-1] == "task875"
    assert BENCHMARK_FOLDERS["superni"] == "data_superni"


def test_resolve_order():
    assert resolve_order("standard_cl", 3) == ["yahoo", "amazon", "agnews", "dbpedia"]
    got = resolve_order("long_sequence", 5)
    got.append("x")
    assert "x" not in ORDERS["long_sequence"][5]  # a copy
    assert resolve_order("long_sequence", tasks=["CB", "rte"]) == ["cb", "rte"]


@pytest.mark.parametrize("kwargs, message", [
    ({"benchmark": "glue", "order": 1}, "valid choices: long_sequence, standard_cl, superni"),
    ({"benchmark": "superni", "order": 4}, "valid orders: 1, 2"),
    ({"benchmark": "superni"}, "give an order number"),
    ({"benchmark": "superni", "order": 1, "tasks": ["task363"]}, "not both"),
    ({"benchmark": "superni", "tasks": []}, "non-empty list"),
    ({"benchmark": "superni", "tasks": ["a", "A"]}, "repeats task"),
])
def test_resolve_order_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_order(**kwargs)


def test_task_metric():
    assert task_metric("long_sequence", "dbpedia") == "accuracy"
    assert task_metric("standard_cl", "yahoo") == "accuracy"
    assert [task_metric("superni", t) for t in ("task363", "task875", "task1687", "task073", "task1290")] == [
        "accuracy", "accuracy", "accuracy", "rougeL", "rougeL"]
