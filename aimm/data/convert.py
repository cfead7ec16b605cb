"""Converting raw benchmark folders into the release layout (spec section 9).

Raw layout: ``<root>/<group>/<Task>/{train,dev,test}.json`` (any nesting; a task
folder is one holding at least one of those files), in one of two formats:

- O-LoRA CL_Benchmark: a JSON list of ``{"sentence", "label"}`` plus ``labels.json``
  (a JSON list of label strings) in the task folder. Input = :func:`build_prompt`
  of the sentence with the labels in ``labels.json`` order; output = label.
- "Instances" (SAPT style): a JSON object whose ``"Instances"`` list holds
  ``{"input", "output"}`` (output may be a list of strings: the first is used).
  The input is kept as-is (SuperNI inputs already carry their prompt), except
  when the folder has a ``labels.json`` and the task has an instruction type
  (a long-sequence task in Instances form, as the release's own preprocessing
  reads it): then the input is treated as the sentence and prompted.

Selection: train = first ``max_train`` (1000) and dev = first ``max_dev`` (500) of a
copy shuffled with ``random.Random(seed).shuffle`` (seed 42, a fresh generator per
split); test = all records, raw order. Ids: ``<TaskFolder>_<index>`` (folder name
as spelled, e.g. ``MNLI_0`` as in the release), except that Instances records
keep their own ``"id"`` when every selected record has a distinct string id.
Files: ``<dst>/<benchmark_folder>/<split>/<task lower-case>_T5.json``, in the release's JSON
style. All or nothing: the new ``<benchmark_folder>`` is staged in a temporary folder next to
it (in ``<dst>``; files already there are hard-linked or copied in) and renamed into place, so a
failure or a kill leaves the old folder (or none) and never a half-converted one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError
from .jsonio import dump_json, json_type, read_json, write_text_atomic
from .orders import BENCHMARK_FOLDERS
from .paths import FILE_SUFFIX, SPLITS
from .prompts import TASK_TYPES, build_prompt, instruction_for
from .records import Example

DEFAULT_MAX_TRAIN = 1000
DEFAULT_MAX_DEV = 500


@dataclass(frozen=True)
class RawRecord:
    """One raw record: its text (sentence or input), target, and own id if any."""

    text: str
    output: str
    id: str | None = None


def is_task_folder(path: Path) -> bool:
    """True when ``path`` holds a ``train.json``, ``dev.json`` or ``test.json``."""
    return any((path / f"{split}.json").is_file() for split in SPLITS)


def find_task_folders(src: str | os.PathLike[str]) -> list[Path]:
    """``src`` itself if it is a task folder, else every task folder below it (sorted).

    Raises:
        FileNotFoundError: ``src`` is not a directory.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: source folder does not exist")
    if is_task_folder(root):
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_dir() and is_task_folder(p))


def read_labels(folder: Path) -> list[str] | None:
    """The task's ``labels.json`` (a non-empty list of strings), or None if absent.

    Raises:
        DataError: the file exists but is malformed.
    """
    path = folder / "labels.json"
    if not path.is_file():
        return None
    labels = read_json(path)
    if not isinstance(labels, list) or not labels:
        raise DataError(f"{path}: must be a non-empty JSON list of label strings, got {json_type(labels)}")
    bad = [f"{path}: {i}: label must be a string, got {json_type(lab)}"
           for i, lab in enumerate(labels) if not isinstance(lab, str)]
    if bad:
        raise DataError(bad)
    return labels


def _sentence_record(index: int, item: Any, path: Path, problems: list[str]) -> RawRecord | None:
    if not isinstance(item, dict):
        problems.append(f"{path}: {index}: record must be a JSON object, got {json_type(item)}")
        return None
    ok = True
    for field in ("sentence", "label"):
        if field not in item:
            problems.append(f"{path}: {index}: missing field {field!r}")
            ok = False
        elif not isinstance(item[field], str):
            problems.append(f"{path}: {index}: field {field!r} must be a string, got {json_type(item[field])}")
            ok = False
    return RawRecord(item["sentence"], item["label"]) if ok else None


def _instance_record(index: int, item: Any, path: Path, problems: list[str]) -> RawRecord | None:
    if not isinstance(item, dict):
        problems.append(f"{path}: {index}: instance must be a JSON object, got {json_type(item)}")
        return None
    ok = True
    if "input" not in item:
        problems.append(f"{path}: {index}: missing field 'input'")
        ok = False
    elif not isinstance(item["input"], str):
        problems.append(f"{path}: {index}: field 'input' must be a string, got {json_type(item['input'])}")
        ok = False
    output = item.get("output")
    if "output" not in item:
        problems.append(f"{path}: {index}: missing field 'output'")
        ok = False
    elif isinstance(output, list):
        if not output or not isinstance(output[0], str):
            problems.append(f"{path}: {index}: field 'output' must be a string or a non-empty list of strings")
            ok = False
        else:
            output = output[0]
    elif not isinstance(output, str):
        problems.append(f"{path}: {index}: field 'output' must be a string, got {json_type(output)}")
        ok = False
    own_id = item.get("id")
    return RawRecord(item["input"], output, own_id if isinstance(own_id, str) else None) if ok else None


def parse_raw_split(obj: Any, path: Path) -> tuple[str, list[RawRecord]]:
    """Validate one raw split file's decoded content.

    Returns:
        ``("sentence", records)`` for the CL_Benchmark list format or
        ``("instances", records)`` for the Instances format.

    Raises:
        DataError: every problem found, ``<file>: <index>: <problem>``.
    """
    if isinstance(obj, list):
        kind, items, parse = "sentence", obj, _sentence_record
    elif isinstance(obj, dict) and "Instances" in obj:
        kind, items, parse = "instances", obj["Instances"], _instance_record
        if not isinstance(items, list):
            raise DataError(f"{path}: 'Instances' must be a JSON list, got {json_type(items)}")
    else:
        raise DataError(
            f"{path}: expected a JSON list of {{\"sentence\", \"label\"}} records or an object "
            f"with an 'Instances' list, got {json_type(obj)}"
        )
    if not items:
        raise DataError(f"{path}: no records (empty list)")
    problems: list[str] = []
    records = [parse(i, item, path, problems) for i, item in enumerate(items)]
    if problems:
        raise DataError(problems)
    return kind, [r for r in records if r is not None]


def select_split(records: Sequence[RawRecord], split: str, *, seed: int = 42,
                 max_train: int | None = DEFAULT_MAX_TRAIN,
                 max_dev: int | None = DEFAULT_MAX_DEV) -> list[RawRecord]:
    """The release's selection: shuffled-copy prefix for train/dev, everything (raw order) for test."""
    if split == "test":
        return list(records)
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    limit = max_train if split == "train" else max_dev
    return shuffled if limit is None else shuffled[:limit]


def convert_task(folder: str | os.PathLike[str], *, seed: int = 42,
                 max_train: int | None = DEFAULT_MAX_TRAIN,
                 max_dev: int | None = DEFAULT_MAX_DEV) -> dict[str, list[Example]]:
    """Convert one raw task folder into release examples, per split present (see module docstring).

    Raises:
        DataError: all problems of the folder (bad records, missing or bad
            ``labels.json``, a task with no instruction type).
    """
    folder = Path(folder)
    name = folder.name
    problems: list[str] = []
    try:
        labels = read_labels(folder)
    except DataError as err:
        problems.extend(err.lines)
        labels = None
    prompted_instances = labels is not None and name.lower() in TASK_TYPES
    result: dict[str, list[Example]] = {}
    for split in SPLITS:
        path = folder / f"{split}.json"
        if not path.is_file():
            continue
        try:
            kind, records = parse_raw_split(read_json(path), path)
        except DataError as err:
            problems.extend(err.lines)
            continue
        if kind == "sentence" or prompted_instances:
            if labels is None:
                if not (folder / "labels.json").is_file():
                    problems.append(f"{folder / 'labels.json'}: missing (needed to prompt {path})")
                continue
            try:
                instruction_for(name)
            except KeyError as err:
                problems.append(f"{folder}: {err.args[0]}")
                continue
        chosen = select_split(records, split, seed=seed, max_train=max_train, max_dev=max_dev)
        own_ids = [r.id for r in chosen]
        keep_ids = kind == "instances" and None not in own_ids and len(set(own_ids)) == len(own_ids)
        result[split] = [
            Example(
                id=r.id if keep_ids else f"{name}_{i}",
                input=build_prompt(name, labels, r.text) if (kind == "sentence" or prompted_instances) else r.text,
                output=r.output,
            )
            for i, r in enumerate(chosen)
        ]
    if problems:
        raise DataError(problems)
    return result


def release_text(examples: Sequence[Example]) -> str:
    """A release file's text for ``examples``."""
    return dump_json([{"id": e.id, "input": e.input, "output": e.output} for e in examples])


def convert_benchmark(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    benchmark_folder: str = "data_longsequence",
    *,
    overwrite: bool = False,
    seed: int = 42,
    max_train: int | None = DEFAULT_MAX_TRAIN,
    max_dev: int | None = DEFAULT_MAX_DEV,
) -> list[Path]:
    """Convert a raw benchmark (or one task folder) into ``dst/<benchmark_folder>/<split>/<task>_T5.json``.

    Everything is read and validated before anything is written, and the writing is all or
    nothing (:func:`write_all_or_nothing`). A target that already exists with identical content
    is left alone; one with different content is an error unless ``overwrite``.

    Returns:
        The target paths (written or already identical), task by task, in
        split order train, dev, test.

    Raises:
        ValueError: unknown ``benchmark_folder``.
        FileNotFoundError: ``src`` does not exist.
        DataError: no task folders, duplicate task names, or bad raw data (all problems).
        FileExistsError: targets with different content exist and ``overwrite`` is False.
    """
    folders_valid = sorted(set(BENCHMARK_FOLDERS.values()))
    if benchmark_folder not in folders_valid:
        raise ValueError(f"unknown benchmark folder {benchmark_folder!r}; valid: {', '.join(folders_valid)}")
    task_folders = find_task_folders(src)
    if not task_folders:
        raise DataError(f"{src}: no task folders found (folders holding train.json, dev.json or test.json)")
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for folder in task_folders:
        key = folder.name.lower()
        if key in seen:
            problems.append(f"{folder}: task name {key!r} also used by {seen[key]}")
        seen.setdefault(key, folder)
    targets: dict[Path, str] = {}
    for folder in task_folders:
        try:
            converted = convert_task(folder, seed=seed, max_train=max_train, max_dev=max_dev)
        except DataError as err:
            problems.extend(err.lines)
            continue
        for split, examples in converted.items():
            path = Path(dst) / benchmark_folder / split / f"{folder.name.lower()}{FILE_SUFFIX}"
            targets[path] = release_text(examples)
    if problems:
        raise DataError(problems)
    return write_targets(Path(dst) / benchmark_folder, targets, overwrite)


def write_targets(folder: Path, targets: dict[Path, str], overwrite: bool = False) -> list[Path]:
    """Write ``targets`` (paths under ``folder``: their text) all or nothing
    (:func:`write_all_or_nothing`); returns their paths. A target that exists with identical
    content is left alone; one with different content is a ``FileExistsError`` (one line per
    file), checked before anything is written, unless ``overwrite``."""
    unchanged = {p for p, text in targets.items() if p.is_file() and p.read_bytes() == text.encode("utf-8")}
    conflicts = [p for p in targets if p.exists() and p not in unchanged]
    if conflicts and not overwrite:
        raise FileExistsError(
            "\n".join(f"{p}: exists with different content (pass --overwrite, or overwrite=True, "
                      "to replace it)" for p in conflicts)
        )
    changed = {p: text for p, text in targets.items() if p not in unchanged}
    if changed:
        write_all_or_nothing(folder, changed)
    return list(targets)


def write_all_or_nothing(folder: Path, files: dict[Path, str]) -> None:
    """Write ``files`` (paths under ``folder``) so that ``folder`` changes in one step.

    The new folder is built in a temporary sibling (the existing files hard-linked, or copied,
    in), then renamed into place; the old one is moved aside first and removed after. On any
    failure the temporary folder goes and ``folder`` (and any parent this call created) is as
    before.
    """
    folder = Path(folder)
    created = [p for p in [folder.parent, *folder.parent.parents] if not p.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old = None
    try:
        if folder.is_dir():
            shutil.copytree(folder, staging, dirs_exist_ok=True, copy_function=_link_or_copy)
        for path, text in files.items():
            write_text_atomic(staging / path.relative_to(folder), text)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
        try:
            os.replace(staging, folder)
        except BaseException:
            if old is not None:
                os.replace(old / folder.name, folder)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for parent in created:  # deepest first; only empty ones
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # safe: every write into the staging folder replaces, never edits
    except OSError:
        shutil.copy2(src, dst)
