"""Benchmarks, their task orders (spec section 9) and per-task metrics (spec section 8)."""

from __future__ import annotations

from typing import Literal

Metric = Literal["accuracy", "rougeL"]

#: Task orders of the paper, by benchmark and order number. Task names are the
#: lower-case stems of the release files (``<task>_T5.json``).
ORDERS: dict[str, dict[int, list[str]]] = {
    "standard_cl": {
        1: ["dbpedia", "amazon", "yahoo", "agnews"],
        2: ["dbpedia", "amazon", "agnews", "yahoo"],
        3: ["yahoo", "amazon", "agnews", "dbpedia"],
    },
    "long_sequence": {
        4: ["mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb", "yelp", "amazon",
            "sst-2", "dbpedia", "agnews", "multirc", "yahoo"],
        5: ["multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2",
            "dbpedia", "agnews", "yelp", "amazon", "yahoo"],
        6: ["yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia",
            "agnews", "yahoo", "multirc", "boolqa", "wic"],
    },
    "superni": {
        1: ["task1572", "task363", "task1290", "task181", "task002", "task1510", "task639",
            "task1729", "task073", "task1590", "task748", "task511", "task591", "task1687",
            "task875"],
        2: ["task748", "task073", "task1590", "task639", "task1572", "task1687", "task591",
            "task363", "task1510", "task1729", "task181", "task511", "task002", "task1290",
            "task875"],
    },
}

#: Folder of each benchmark under the data directory (the release's layout).
BENCHMARK_FOLDERS: dict[str, str] = {
    "standard_cl": "data_longsequence",
    "long_sequence": "data_longsequence",
    "superni": "data_superni",
}

#: SuperNI tasks scored by accuracy instead of ROUGE-L (spec section 8).
SUPERNI_ACCURACY_TASKS: frozenset[str] = frozenset({"task363", "task875", "task1687"})


def _check_benchmark(benchmark: str) -> str:
    """Return ``benchmark`` if known, else raise a ValueError listing the choices."""
    if benchmark not in ORDERS:
        raise ValueError(
            f"unknown benchmark {benchmark!r}; valid choices: {', '.join(sorted(ORDERS))}"
        )
    return benchmark


def benchmark_folder(benchmark: str) -> str:
    """Folder name of ``benchmark`` (a key of :data:`BENCHMARK_FOLDERS` or a folder name itself)."""
    if benchmark in BENCHMARK_FOLDERS.values():
        return benchmark
    return BENCHMARK_FOLDERS[_check_benchmark(benchmark)]


def resolve_order(
    benchmark: str, order: int | None = None, tasks: list[str] | None = None
) -> list[str]:
    """The task sequence to train on.

    Args:
        benchmark: ``"standard_cl"``, ``"long_sequence"`` or ``"superni"``.
        order: a paper order number of that benchmark (1-3, 4-6, or 1-2).
        tasks: a custom order, a list of task names (lower-cased on return).
            Give ``order`` or ``tasks``, not both.

    Returns:
        A new list of task names.

    Raises:
        ValueError: unknown benchmark or order number (the message lists the valid
            choices), neither or both of ``order``/``tasks``, or a bad custom list.
    """
    orders = ORDERS[_check_benchmark(benchmark)]
    valid = ", ".join(str(k) for k in orders)
    if tasks is not None:
        if order is not None:
            raise ValueError("give either an order number or a custom task list, not both")
        if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"a custom order must be a non-empty list of task names, got {tasks!r}")
        names = [t.lower() for t in tasks]
        duplicates = sorted({t for t in names if names.count(t) > 1})
        if duplicates:
            raise ValueError(f"custom order repeats task(s): {', '.join(duplicates)}")
        return names
    if order is None:
        raise ValueError(f"give an order number ({benchmark}: {valid}) or a custom task list")
    try:
        key = int(order)
    except (TypeError, ValueError):
        key = None
    if key not in orders:
        raise ValueError(f"unknown order {order!r} for benchmark {benchmark!r}; valid orders: {valid}")
    return list(orders[key])



def task_sequence(benchmark: str, order: int | None, tasks: list[str] | None) -> list[str]:
    """The tasks of a configuration: the custom list ``tasks`` when given (``order`` is then
    ignored), else the benchmark's ``order`` (:func:`resolve_order`)."""
    return resolve_order(benchmark, None if tasks else order, tasks)

def task_metric(benchmark: str, task: str) -> Metric:
    """Per-task score of spec section 8: ``"accuracy"`` or ``"rougeL"``.

    Standard-CL and long-sequence tasks are classification (accuracy); SuperNI tasks
    use ROUGE-L except task363, task875 and task1687 (accuracy).
    """
    if benchmark_folder(benchmark) == BENCHMARK_FOLDERS["superni"]:
        return "accuracy" if task.lower() in SUPERNI_ACCURACY_TASKS else "rougeL"
    return "accuracy"
