"""Tasks from any local dataset, read with Hugging Face ``datasets``.

A ``tasks`` entry of a run config may be a spec instead of a release task name::

    - name: my_sentiment
      path: data/my_sentiment      # JSONL / JSON / CSV / Parquet file or folder, or save_to_disk
      input: text                  # column names (default: input / output)
      output: label
      prompt: "Classify the sentiment. Option: positive, negative.\\n{input}\\nAnswer:"  # optional
      splits: {train: train, test: validation}                                        # optional

``path`` (relative to the working directory) is read with ``datasets.load_from_disk`` when it
is a ``save_to_disk`` folder, else ``datasets.load_dataset`` (a folder's files name their
splits: ``train.jsonl``, ``test.parquet``...; a single file is the ``train`` split). Without
``splits`` the test split is ``test``, else ``validation`` / ``dev`` with a warning, as for
release tasks. Validation is as strict as for release files: every problem is one line
``<path> (<split>): <row>: <problem>`` (missing or non-string values, duplicate ids, empty
splits). ``ClassLabel`` columns give their label names. An ``id`` column is used when present,
else ids are ``<split>-<row>``. ``prompt`` wraps each input (``{input}`` is replaced).

:func:`write_release_layout` (``aimm data convert SRC DST --name ... --input ... --output ...``)
writes such a task in the release layout.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .records import Example

SPEC_KEYS = ("name", "path", "input", "output", "prompt", "splits")
SPLIT_ROLES = ("train", "test")
TEST_FALLBACKS = ("validation", "dev")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # use with fullmatch (a "$" lets "abc\n" in)
NAME_RULE = "letters, digits, '_', '-' or '.', starting with a letter or digit"
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class TaskSpec:
    """One task read from a local dataset (see the module docstring)."""

    name: str
    path: str
    input: str = "input"
    output: str = "output"
    prompt: str | None = None
    splits: dict[str, str] = field(default_factory=dict)


def parse_task_spec(value: Any, where: str = "tasks") -> TaskSpec:
    """A validated :class:`TaskSpec` from a config mapping; ``ValueError`` naming each problem."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a task must be a name or a mapping with {', '.join(SPEC_KEYS)}")
    problems = []
    for key in value:
        if key not in SPEC_KEYS:
            hint = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            problems.append(f"{where}: unknown key {key!r}" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                            + f"; allowed: {', '.join(SPEC_KEYS)}")
    name = value.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        problems.append(f"{where}: name={name!r}: must be {NAME_RULE} (it names files of the run)")
    where = f"{where} {name}" if isinstance(name, str) else where
    for key in ("path", "input", "output"):
        if key in value or key == "path":
            v = value.get(key)
            if not isinstance(v, str) or not v:
                problems.append(f"{where}: {key}={v!r}: must be a non-empty string")
    prompt = value.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or "{input}" not in prompt):
        problems.append(f"{where}: prompt={prompt!r}: must be a string containing {{input}}")
    splits = value.get("splits", {})
    if not isinstance(splits, dict) or not all(
            k in SPLIT_ROLES and isinstance(v, str) and v for k, v in splits.items()):
        problems.append(f"{where}: splits={splits!r}: must map train / test to split names")
    if problems:
        raise ValueError("\n".join(problems))
    return TaskSpec(name=name, path=value["path"], input=value.get("input", "input"),
                    output=value.get("output", "output"), prompt=prompt, splits=dict(splits))


def read_dataset(path: str | Path):
    """A ``DatasetDict`` from a file, a folder of split files, or a ``save_to_disk`` folder."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir() and any((p / f).is_file() for f in ("dataset_dict.json", "dataset_info.json",
                                                    "state.json")):
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as exc:  # noqa: BLE001 datasets raises many types; name the folder
            raise DataError(f"{p}: cannot be read by datasets: {_root_cause(exc)}") from exc
        return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
    files = {"train": [p]} if p.is_file() else {}
    for f in sorted(p.iterdir()) if p.is_dir() else []:
        if f.suffix.lower() in BUILDERS:  # train.jsonl, test.parquet, train-00000-of-00002.parquet
            files.setdefault(f.name.split(".")[0].split("-")[0], []).append(f)
    if not files:
        raise DataError(f"{p}: no {', '.join(BUILDERS)} files (or a save_to_disk folder)")
    out = {}
    for split, paths in files.items():  # one split at a time: a bad split names its own file
        builder = BUILDERS.get(paths[0].suffix.lower())
        if builder is None:
            raise DataError(f"{p}: unknown file type; use {', '.join(BUILDERS)} or a save_to_disk folder")
        try:
            out[split] = datasets.load_dataset(builder, data_files={split: [str(f) for f in paths]},
                                               split=split)
        except Exception as exc:  # noqa: BLE001 datasets raises many types; name the file
            raise DataError(f"{', '.join(map(str, paths))}: cannot be read by datasets: "
                            f"{_root_cause(exc)}") from exc
    return datasets.DatasetDict(out)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}"


def _pick_splits(spec: TaskSpec, available: list[str]) -> tuple[str, str, list[str]]:
    warnings = []
    train = spec.splits.get("train", "train")
    test = spec.splits.get("test")
    if test is None:
        test = "test"
        if test not in available:
            fallback = next((s for s in TEST_FALLBACKS if s in available), None)
            if fallback:
                warnings.append(f"{spec.name}: no test split in {spec.path}; evaluating on "
                                f"{fallback}")
                test = fallback
    missing = [s for s in (train, test) if s not in available]
    if missing:
        raise DataError(f"{spec.path}: no split {', '.join(map(repr, missing))} (splits: "
                        f"{', '.join(available)}); name them with splits: {{train: ..., test: ...}}")
    return train, test, warnings


def _examples(spec: TaskSpec, ds, split: str) -> list[Example]:
    where = f"{spec.path} ({split})"
    problems = [f"{where}: missing column {c!r} (columns: {', '.join(ds.column_names)})"
                for c in (spec.input, spec.output) if c not in ds.column_names]
    if problems:
        raise DataError(problems)
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    names = {c: getattr(ds.features[c], "names", None) for c in (spec.input, spec.output)}
    has_id = "id" in ds.column_names
    examples, seen = [], {}
    for row, record in enumerate(ds):
        values = {}
        for column in (spec.input, spec.output) + (("id",) if has_id else ()):
            v = record[column]
            if names.get(column) and isinstance(v, int) and 0 <= v < len(names[column]):
                v = names[column][v]  # ClassLabel: its label name
            if v is None:
                problems.append(f"{where}: {row}: column {column!r} is missing (null)")
            elif not isinstance(v, str):
                problems.append(f"{where}: {row}: column {column!r} must be a string, got "
                                f"{type(v).__name__} {v!r}")
            values[column] = v
        ident = values.get("id") if has_id else f"{split}-{row}"
        if isinstance(ident, str):
            if ident in seen:
                problems.append(f"{where}: {row}: duplicate id {ident!r} (first used by row {seen[ident]})")
            seen.setdefault(ident, row)
        if all(isinstance(v, str) for v in values.values()) and ident is not None:
            text = values[spec.input]
            prompt = spec.prompt.replace("{input}", text) if spec.prompt else text
            examples.append(Example(ident, prompt, values[spec.output]))
    if problems:
        raise DataError(problems)
    return examples


def read_custom_task(spec: TaskSpec) -> tuple[list[Example], list[Example], str, list[str]]:
    """``(train, test, test split name, warnings)`` of a spec, validated (all problems at once)."""
    ds = read_dataset(spec.path)
    train_split, test_split, warnings = _pick_splits(spec, list(ds))
    problems, out = [], {}
    for split in dict.fromkeys((train_split, test_split)):
        try:
            out[split] = _examples(spec, ds[split], split)
        except DataError as err:
            problems.extend(err.lines)
    if problems:
        raise DataError(problems)
    return out[train_split], out[test_split], test_split, warnings


def write_release_layout(spec: TaskSpec, dst: str | Path, benchmark_folder: str = "data_longsequence",
                         overwrite: bool = False) -> list[Path]:
    """The spec's train and test splits as ``<dst>/<benchmark folder>/<split>/<name>_T5.json``.

    Written as :func:`aimm.data.convert.convert_benchmark` writes: all or nothing, identical files
    left alone, different ones refused unless ``overwrite`` (:func:`aimm.data.convert.write_targets`).
    """
    import json

    from .convert import write_targets
    from .paths import FILE_SUFFIX

    train, test, _, _ = read_custom_task(spec)
    folder = Path(dst) / benchmark_folder
    targets: dict[Path, str] = {}
    for split, examples in (("train", train), ("test", test)):
        records = [{"id": e.id, "input": e.input, "output": e.output} for e in examples]
        targets[folder / split / f"{spec.name.lower()}{FILE_SUFFIX}"] = json.dumps(
            records, ensure_ascii=False, indent=1)
    return write_targets(folder, targets, overwrite)


__all__ = ["TaskSpec", "parse_task_spec", "read_custom_task", "read_dataset", "write_release_layout"]
