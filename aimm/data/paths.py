"""Where benchmark data lives and where each task's split file is."""

from __future__ import annotations

import os
from pathlib import Path

from .orders import benchmark_folder

SPLITS: tuple[str, ...] = ("train", "dev", "test")
#: Suffix of the release's T5 files: ``<task>_T5.json``.
FILE_SUFFIX = "_T5.json"
#: Environment variable naming the data directory.
DATA_ENV = "AIMM_DATA"

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_dirs() -> list[Path]:
    """Fallback data directories, in the order tried: ``./data/aimm`` then ``<repo>/../shared/benchmarks/aimm``."""
    return [Path("data") / "aimm", _REPO_ROOT.parent / "shared" / "benchmarks" / "aimm"]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The benchmark data directory (the folder holding ``data_longsequence/`` etc.).

    Tried in order: the ``data_dir`` argument, the ``AIMM_DATA`` environment
    variable, ``./data/aimm`` (relative to the working directory) and
    ``../shared/benchmarks/aimm`` relative to the repository root. An explicit
    argument or environment value must exist; it is never silently skipped.

    Raises:
        FileNotFoundError: listing what was tried.
    """
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"data directory {path} (given explicitly) does not exist")
        return path
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"data directory {path} (from ${DATA_ENV}) does not exist")
        return path
    tried = default_data_dirs()
    for path in tried:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        "no benchmark data directory found; tried: argument (none given), "
        f"${DATA_ENV} (unset), " + ", ".join(str(p) for p in tried)
        + f". Pass data_dir or set ${DATA_ENV}."
    )


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def task_file_path(
    data_dir: str | os.PathLike[str], benchmark: str, split: str, task: str
) -> Path:
    """Expected path ``<data_dir>/<benchmark folder>/<split>/<task>_T5.json`` (task lower-cased); not checked."""
    return Path(data_dir) / benchmark_folder(benchmark) / _check_split(split) / f"{task.lower()}{FILE_SUFFIX}"


def find_task_file(
    data_dir: str | os.PathLike[str], benchmark: str, split: str, task: str
) -> Path:
    """Path of an existing split file of ``task``.

    Raises:
        FileNotFoundError: naming the expected path.
    """
    path = task_file_path(data_dir, benchmark, split, task)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {split} split for task {task!r}")
    return path
