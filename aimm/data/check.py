"""Checking a benchmark data folder, and the entry points of ``aimm data check|convert``."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .convert import convert_benchmark
from .errors import DataError
from .labels import label_set
from .loader import unseen_label_warning
from .orders import BENCHMARK_FOLDERS, ORDERS, task_metric
from .paths import FILE_SUFFIX, SPLITS, resolve_data_dir
from .records import Example, read_records

FOLDER_NAMES: tuple[str, ...] = tuple(sorted(set(BENCHMARK_FOLDERS.values())))


@dataclass
class CheckReport:
    """Outcome of :func:`inspect_benchmark`: error and warning lines, and what was read."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_files: int = 0
    n_records: int = 0


def _benchmark_roots(root: Path) -> list[Path]:
    """Benchmark folders to check: ``root`` itself if it is one, else its known children."""
    if root.name in FOLDER_NAMES:
        return [root]
    return [root / name for name in FOLDER_NAMES if (root / name).is_dir()]


def _expected_tasks(folder_name: str) -> dict[str, str]:
    """Task -> "benchmark order N" for every paper order stored in ``folder_name``."""
    where: dict[str, str] = {}
    for benchmark, orders in ORDERS.items():
        if BENCHMARK_FOLDERS[benchmark] != folder_name:
            continue
        for number, tasks in orders.items():
            for task in tasks:
                where.setdefault(task, f"{benchmark} order {number}")
    return where


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` (its target, for a symbolic link) is no regular file that can be read to
    its end: ``"<path>: ..."``; None for a regular file. Such a file is never opened (a FIFO
    blocks a reader, ``/dev/zero`` never ends); :func:`aimm.data.loader.load_task` likewise
    reads only what ``Path.is_file`` accepts."""
    try:
        mode = path.stat().st_mode  # follows symbolic links
    except OSError as err:  # a broken or looping symbolic link, no permission, ...
        try:
            target = f" (a symbolic link to {os.readlink(path)})"
        except OSError:
            target = ""
        return f"{path}: cannot be read{target}: {err.strerror or err}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    link = f" (through a symbolic link to {path.resolve()})" if path.is_symlink() else ""
    return f"{path}: not a regular file but {kind}{link}; not read"


def _check_folder(folder: Path, report: CheckReport) -> None:
    """Validate every split file of one benchmark folder and apply the split rules per task."""
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.name not in SPLITS:
            report.errors.append(f"{entry}: unexpected folder (expected only {', '.join(SPLITS)})")
    files: dict[str, dict[str, list[Example] | None]] = {}
    for split in SPLITS:
        split_dir = folder / split
        if not split_dir.is_dir():
            report.warnings.append(f"{split_dir}: no {split} folder")
            continue
        for entry in sorted(split_dir.iterdir()):
            if entry.is_dir():
                report.errors.append(f"{entry}: unexpected folder inside {split}/")
                continue
            if not entry.name.endswith(FILE_SUFFIX):
                if entry.suffix == ".json":
                    report.warnings.append(f"{entry}: ignored (not a *{FILE_SUFFIX} file)")
                continue
            task = entry.name[: -len(FILE_SUFFIX)]
            report.n_files += 1
            problem = _not_a_regular_file(entry)
            try:
                if problem:
                    raise DataError(problem)
                examples: list[Example] | None = read_records(entry)
            except DataError as err:
                report.errors.extend(err.lines)
                examples = None
            except OSError as err:  # e.g. no permission to read
                report.errors.append(f"{entry}: cannot be read: {err.strerror or err}")
                examples = None
            else:
                report.n_records += len(examples)
                empty = [i for i, e in enumerate(examples) if not e.output.strip()]
                if empty:
                    report.warnings.append(
                        f"{entry}: {len(empty)} record(s) with an empty output (first: record {empty[0]})"
                    )
            files.setdefault(task, {})[split] = examples
    for task, splits in sorted(files.items()):
        where = folder / "{split}" / f"{task}{FILE_SUFFIX}"
        if "train" not in splits:
            report.errors.append(f"{str(where).format(split='train')}: missing train split for task {task!r}")
        if "test" not in splits:
            if "dev" in splits:
                report.warnings.append(
                    f"{task}: no test split at {str(where).format(split='test')}; "
                    f"evaluation falls back to dev split {str(where).format(split='dev')}"
                )
            else:
                report.errors.append(
                    f"{str(where).format(split='test')}: missing test split for task {task!r}, and no dev split"
                )
        elif "dev" not in splits:
            report.warnings.append(f"{task}: no dev split at {str(where).format(split='dev')}")
        train = splits.get("train")
        if train is not None:
            problem = train_split_problem(task, task_metric(folder.name, task), len(train),
                                          len({e.output for e in train}),
                                          len(label_set(e.output for e in train)),
                                          where=str(where).format(split="train"))
            if problem:
                report.warnings.append(f"{problem}: a run on this task fails before training")
        evaluated = "test" if "test" in splits else "dev"
        if train and splits.get(evaluated):
            note = unseen_label_warning(task, evaluated, label_set(e.output for e in train), splits[evaluated])
            if note:
                report.warnings.append(note)
        dev, test = splits.get("dev"), splits.get("test")
        if dev and test and sorted((e.input, e.output) for e in dev) == sorted((e.input, e.output) for e in test):
            report.warnings.append(f"{task}: dev and test splits hold the same records")
    for task, where in _expected_tasks(folder.name).items():
        if task not in files:
            report.warnings.append(f"{folder}: task {task!r} of {where} not found")


#: Fewest training records a task may have.
MIN_TRAIN_RECORDS = 2


def train_split_problem(task: str, metric: str, n_records: int, n_distinct: int,
                        label_set_size: int, where: str = "") -> str | None:
    """Why a task cannot be trained and scored on its train split (``None``: it can).

    Fewer than :data:`MIN_TRAIN_RECORDS` records, or an accuracy task whose outputs give no
    label set (:func:`aimm.data.labels.label_set`: each label must repeat on average).
    """
    place = f"{where}: " if where else ""
    if n_records < MIN_TRAIN_RECORDS:
        return (f"{place}task {task!r} has {n_records} training record(s); it needs at least "
                f"{MIN_TRAIN_RECORDS}: add records or drop the task")
    if metric == "accuracy" and label_set_size == 0:
        return (f"{place}task {task!r} is scored by accuracy but its {n_records} training records "
                f"give no label set ({n_distinct} distinct outputs; each label must appear on "
                "average twice): add records or drop the task")
    return None


def training_data_problems(benchmark: str, data: dict, max_train: int | None = None) -> list[str]:
    """:func:`train_split_problem` for every loaded task (``TaskData``) of a run, before training.

    A task subsampled to ``max_train`` records has at least that many: the size rule then only
    applies to what the file holds, not to the user's choice of ``max_train``.
    """
    problems = []
    for name, td in data.items():
        n = len(td.train)
        capped = max_train is not None and n >= max_train
        problem = train_split_problem(name, task_metric(benchmark, name),
                                      max(n, MIN_TRAIN_RECORDS) if capped else n,
                                      len({e.output for e in td.train}), len(td.label_set),
                                      where=td.files.get("train", ""))
        if problem:
            problems.append(problem)
    return problems


def inspect_benchmark(root: str | os.PathLike[str]) -> CheckReport:
    """Check a data directory (holding ``data_longsequence/``, ``data_superni/``) or one benchmark folder.

    Errors: unreadable or invalid ``*_T5.json`` files (every problem), entries named like
    one that are no regular file (FIFO, device, socket, broken link: never opened), an unknown
    layout, unexpected folders, a task without train split, a task with neither
    test nor dev split. Warnings: dev fallback for a missing test split, missing
    dev split, labels in the evaluated split never seen in train, empty outputs,
    dev identical to test, tasks of the paper orders not found, ignored files.
    """
    path = Path(root)
    report = CheckReport()
    if not path.is_dir():
        report.errors.append(f"{path}: not a directory")
        return report
    folders = _benchmark_roots(path)
    if not folders:
        report.errors.append(
            f"{path}: unknown layout: expected {' and/or '.join(n + '/' for n in FOLDER_NAMES)} "
            f"(each with {', '.join(SPLITS)}/ holding <task>{FILE_SUFFIX} files)"
        )
    for folder in folders:
        _check_folder(folder, report)
    return report


def check_benchmark(root: str | os.PathLike[str]) -> list[str]:
    """All error lines for a benchmark data folder (empty when it is valid); see :func:`inspect_benchmark`."""
    return inspect_benchmark(root).errors


def main_check(root: str | os.PathLike[str] | None = None) -> int:
    """``aimm data check``: print warnings and errors (stderr) or ``OK: N files, M records`` (stdout).

    ``root`` None means :func:`resolve_data_dir`. Returns 0 when there are no errors, else 1.
    """
    try:
        path = resolve_data_dir(root)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report = inspect_benchmark(path)
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in report.errors:
        print(line, file=sys.stderr)
    if report.errors:
        print(f"FAILED: {len(report.errors)} error(s) in {path}", file=sys.stderr)
        return 1
    print(f"OK: {report.n_files} files, {report.n_records} records")
    return 0


def main_convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    benchmark_folder: str = "data_longsequence",
    *,
    overwrite: bool = False,
) -> int:
    """``aimm data convert``: convert ``src`` into ``dst`` (see :func:`convert_benchmark`).

    Prints each target file (stdout) or the problems (stderr). Returns 0, or 2 when nothing
    was written (bad source data, differing targets without ``overwrite``, a write error).
    """
    try:
        paths = convert_benchmark(src, dst, benchmark_folder, overwrite=overwrite)
    except (DataError, OSError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    print(f"OK: {len(paths)} files under {Path(dst) / benchmark_folder}")
    return 0
