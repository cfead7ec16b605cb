"""Notebook 01: find (or convert) the benchmark, check it, and describe its tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

def tokenizer_for(model: str):
    """The tokenizer of a model spec without loading the model's weights."""
    from aimm.models import SMOLLM2_ALIAS, TINY_SPECS, load_tokenizer, resolve_model_path, \
        smollm2_tokenizer_dir

    if model in TINY_SPECS or model == SMOLLM2_ALIAS:
        return load_tokenizer(smollm2_tokenizer_dir())
    return load_tokenizer(resolve_model_path(model))


def find_or_convert_data(data_dir: str | None = None, raw_data_dir: str | None = None,
                         target: str | Path = Path("data") / "aimm") -> Path:
    """The benchmark folder: :func:`aimm.data.resolve_data_dir`, or ``raw_data_dir`` converted
    into ``target`` (release layout) when none is found."""
    from aimm.data import convert_benchmark, resolve_data_dir

    try:
        return resolve_data_dir(data_dir)
    except FileNotFoundError:
        if raw_data_dir is None:
            raise
    convert_benchmark(raw_data_dir, target)
    return Path(target)


def read_splits(data_dir: str | Path, benchmark: str, tasks: list[str]) -> dict[str, dict[str, list]]:
    """task -> split -> examples (every split file that exists; validated records)."""
    from aimm.data import SPLITS, read_records, task_file_path

    out: dict[str, dict[str, list]] = {}
    for task in tasks:
        out[task] = {}
        for split in SPLITS:
            path = task_file_path(data_dir, benchmark, split, task)
            if path.is_file():
                out[task][split] = read_records(path)
    return out


GENERATION_LABEL = "(free text)"


def check_data(data_root: str | Path, tasks: Iterable[str] = (), show: int = 20):
    """:func:`aimm.data.inspect_benchmark` with a printed summary: the warnings about ``tasks``
    (those trained) first, at most ``show`` lines. Raises :class:`aimm.data.DataError` with every
    error line when the folder is invalid."""
    import re

    from aimm.data import DataError, inspect_benchmark

    report = inspect_benchmark(data_root)
    print(f"{data_root}: {report.n_files} files, {report.n_records} records, "
          f"{len(report.warnings)} warning(s), {len(report.errors)} error(s)")
    names = [re.escape(t) for t in tasks]
    pattern = re.compile(r"(^|[/'\s])(" + "|".join(names) + r")([_:'\s]|$)") if names else None
    ours = [w for w in report.warnings if pattern and pattern.search(w)]
    rest = [w for w in report.warnings if w not in ours]
    for line in (ours + rest)[:show]:
        print(f"  warning: {line}")
    if len(report.warnings) > show:
        print(f"  ... and {len(report.warnings) - show} more warning(s) "
              f"({len(ours)} about the tasks of this run)")
    if report.errors:
        raise DataError(report.errors)
    return report


def data_statistics(tasks_data: dict[str, Any], tokenizer, max_tokenized: int | None = 1000,
                    seed: int = 0):
    """Label counts and token lengths of a benchmark's tasks.

    ``tasks_data``: task -> {split: [Example]} (see :func:`read_splits`) or task ->
    :class:`aimm.data.TaskData` (its train and test lists). Returns ``(stats_df, lengths_df)``:
    ``stats_df[task, split, label, count]`` (label = the output string; all outputs of a
    generation task count as one label, ``"(free text)"``) and
    ``lengths_df[task, split, tokens, target_tokens]`` (prompt and target lengths with
    ``tokenizer``, on at most ``max_tokenized`` examples per split).
    """
    import random
    from collections import Counter

    import pandas as pd

    from aimm.data import is_classification_like

    stats, lengths = [], []
    for task, data in tasks_data.items():
        splits = data if isinstance(data, dict) else {"train": data.train, data.test_split: data.test}
        generation = not is_classification_like(
            e.output for examples in splits.values() for e in examples)
        for split, examples in splits.items():
            outputs = (GENERATION_LABEL if generation else e.output for e in examples)
            for label, count in sorted(Counter(outputs).items()):
                stats.append({"task": task, "split": split, "label": label, "count": count})
            sample = list(examples)
            if max_tokenized is not None and len(sample) > max_tokenized:
                sample = random.Random(seed).sample(sample, max_tokenized)
            if not sample:
                continue
            prompts = tokenizer([e.input for e in sample], add_special_tokens=False)["input_ids"]
            targets = tokenizer([e.output for e in sample], add_special_tokens=False)["input_ids"]
            lengths.extend({"task": task, "split": split, "tokens": len(a), "target_tokens": len(b)}
                           for a, b in zip(prompts, targets))
    stats_df = pd.DataFrame(stats, columns=["task", "split", "label", "count"])
    lengths_df = pd.DataFrame(lengths, columns=["task", "split", "tokens", "target_tokens"])
    return stats_df, lengths_df


def summary_table(stats_df, lengths_df, max_input_len: int | None = None):
    """One row per task x split: examples, distinct labels, token length mean / p95 / max
    (and the share of prompts longer than ``max_input_len``, which training truncates)."""
    import pandas as pd

    sizes = stats_df.groupby(["task", "split"], sort=False)["count"].agg(
        examples="sum", labels="count")
    tok = lengths_df.groupby(["task", "split"], sort=False)["tokens"]
    table = sizes.join(pd.DataFrame({
        "tokens_mean": tok.mean().round(1), "tokens_p95": tok.quantile(0.95).round(0),
        "tokens_max": tok.max(),
        "target_tokens_max": lengths_df.groupby(["task", "split"], sort=False)["target_tokens"].max(),
    }))
    if max_input_len:
        table[f"over_{max_input_len}"] = (lengths_df.assign(over=lengths_df["tokens"] > max_input_len)
                                          .groupby(["task", "split"], sort=False)["over"].mean()
                                          .round(3))
    return table.reset_index()


__all__ = ["GENERATION_LABEL", "check_data", "data_statistics", "find_or_convert_data",
           "read_splits", "summary_table", "tokenizer_for"]
