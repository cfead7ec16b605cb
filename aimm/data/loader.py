"""Loading a task's train and test examples from the release layout."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from .custom import TaskSpec, read_custom_task
from .errors import DataError
from .labels import label_set as _label_set
from .paths import find_task_file, resolve_data_dir, task_file_path
from .records import Example, read_records, validate_records
from .sampling import subsample

__all__ = [
    "Example", "TaskData", "validate_records", "find_task_file", "resolve_data_dir",
    "subsample", "load_task", "load_custom_task", "load_tasks", "unseen_label_warning",
]

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """One task's data, ready for training and evaluation.

    Attributes:
        name: task name (lower-case file stem).
        train: training examples (possibly subsampled).
        test: evaluation examples (possibly subsampled).
        test_split: ``"test"``, or ``"dev"`` when the task has no test split.
        warnings: human-readable notes (dev fallback, labels unseen in train).
        label_set: sorted distinct train outputs for a classification-like task
            (computed on the full train split), else empty.
        files: the split files read, ``{"train": path, test_split: path}`` (the run's data
            fingerprint hashes them).
    """

    name: str
    train: list[Example]
    test: list[Example]
    test_split: Literal["test", "dev"]
    warnings: list[str] = field(default_factory=list)
    label_set: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def is_classification(self) -> bool:
        """True when the task's outputs are class labels (see :func:`aimm.data.labels.is_classification_like`)."""
        return bool(self.label_set)


def unseen_label_warning(task: str, split: str, labels: list[str], examples: Iterable[Example]) -> str | None:
    """A warning if ``examples`` hold outputs outside ``labels`` (the train label set); None otherwise."""
    if not labels:
        return None
    known = set(labels)
    unseen = Counter(e.output for e in examples if e.output not in known)
    if not unseen:
        return None
    listed = ", ".join(f"{lab!r} ({n})" for lab, n in sorted(unseen.items()))
    return f"{task}: {split} split has label(s) never seen in train: {listed}"


def load_task(
    data_dir: str | os.PathLike[str] | None,
    benchmark: str,
    task: str,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 42,
) -> TaskData:
    """Load one task's train split and its test split (or dev when test is absent).

    Args:
        data_dir: data directory, or None for :func:`resolve_data_dir`.
        benchmark: benchmark key (``"long_sequence"``...) or folder name.
        task: task name (case-insensitive).
        max_train, max_test: subsample to at most this many (see :func:`subsample`).
        seed: subsampling seed.

    Raises:
        DataError: train split missing (naming the expected path), test and dev both
            missing, or bad records in either file (all problems of both files).
    """
    root = resolve_data_dir(data_dir)
    name = task.lower()
    warnings: list[str] = []
    problems: list[str] = []

    train_path = task_file_path(root, benchmark, "train", name)
    if not train_path.is_file():
        problems.append(f"{train_path}: missing train split for task {name!r}")
    try:
        test_path, test_split = find_task_file(root, benchmark, "test", name), "test"
    except FileNotFoundError:
        expected = task_file_path(root, benchmark, "test", name)
        dev_path = task_file_path(root, benchmark, "dev", name)
        if dev_path.is_file():
            test_path, test_split = dev_path, "dev"
            warnings.append(f"{name}: no test split at {expected}; evaluating on dev split {dev_path}")
        else:
            test_path, test_split = None, "test"
            problems.append(f"{expected}: missing test split for task {name!r}, and no dev split at {dev_path}")

    train: list[Example] = []
    test: list[Example] = []
    for path, is_train in ((train_path, True), (test_path, False)):
        if path is None or not path.is_file():
            continue
        try:
            examples = read_records(path)
        except DataError as err:
            problems.extend(err.lines)
            continue
        if is_train:
            train = examples
        else:
            test = examples
    if problems:
        raise DataError(problems)

    labels = _label_set(e.output for e in train)
    note = unseen_label_warning(name, test_split, labels, test)
    if note:
        warnings.append(note)
    for note in warnings:
        log.warning(note)
    return TaskData(
        name=name,
        train=subsample(train, max_train, seed),
        test=subsample(test, max_test, seed),
        test_split=test_split,
        warnings=warnings,
        label_set=labels,
        files={"train": str(train_path), test_split: str(test_path)},
    )


def load_custom_task(spec: TaskSpec, *, max_train: int | None = None,
                     max_test: int | None = None, seed: int = 42) -> TaskData:
    """A task from a local dataset (:mod:`aimm.data.custom`), like :func:`load_task`."""
    train, test, test_split, warnings = read_custom_task(spec)
    labels = _label_set(e.output for e in train)
    note = unseen_label_warning(spec.name, test_split, labels, test)
    warnings = warnings + ([note] if note else [])
    for note in warnings:
        log.warning(note)
    return TaskData(name=spec.name.lower(), train=subsample(train, max_train, seed),
                    test=subsample(test, max_test, seed),
                    test_split="test" if test_split == "test" else "dev",
                    warnings=warnings, label_set=labels)


def load_tasks(
    data_dir: str | os.PathLike[str] | None,
    benchmark: str,
    tasks: Iterable[str],
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 42,
    specs: dict[str, TaskSpec] | None = None,
) -> dict[str, TaskData]:
    """Load several tasks (see :func:`load_task`), keyed by lower-case name in the given order.

    ``specs``: tasks read from local datasets (:func:`load_custom_task`), by lower-case name;
    the data directory is only looked up when a task is not one of them.

    Raises:
        DataError: with the problems of every failing task, not only the first.
    """
    specs = {k.lower(): v for k, v in (specs or {}).items()}
    tasks = list(tasks)
    root = resolve_data_dir(data_dir) if any(t.lower() not in specs for t in tasks) else None
    loaded: dict[str, TaskData] = {}
    problems: list[str] = []
    for task in tasks:
        try:
            if task.lower() in specs:
                loaded[task.lower()] = load_custom_task(
                    specs[task.lower()], max_train=max_train, max_test=max_test, seed=seed)
                continue
            loaded[task.lower()] = load_task(
                root, benchmark, task, max_train=max_train, max_test=max_test, seed=seed
            )
        except DataError as err:
            problems.extend(err.lines)
    if problems:
        raise DataError(problems)
    return loaded
