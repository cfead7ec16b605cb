"""What the JSON files of a run dir must hold: pure checks, each problem one phrase
(``None``: the value is one this version wrote). :mod:`aimm.runs` reads the files and raises
``RunDirError`` naming the file with the problem."""

from __future__ import annotations

import math
from typing import Any

from aimm.names import is_valid_name
from aimm.util import is_int, is_num

_STATE_LISTS = {"completed": str, "scores": dict, "stage_steps": int}


def object_problem(value: Any) -> str | None:
    """Why ``value`` is not a JSON object (``None``: it is)."""
    return None if isinstance(value, dict) else f"a JSON object expected, found a {type(value).__name__}"


def state_problem(state: Any) -> str | None:
    """Why ``state`` is not a ``state.json`` this version wrote (``None``: it is)."""
    if not isinstance(state, dict):
        return f"expected a JSON object, got {type(state).__name__}"
    for key, kind in _STATE_LISTS.items():
        if key not in state and key == "stage_steps":
            continue
        value = state.get(key)
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                  for v in value):
            return f"'{key}' must be a list of {kind.__name__} values"
    bad = [n for n in state["completed"] if not is_valid_name(n)]
    if bad:
        return f"'completed' holds {bad[0]!r}, not a stage name"
    if "stage_steps" in state and len(state["stage_steps"]) != len(state["completed"]):
        return "'stage_steps' and 'completed' differ in length"
    if any(n < 0 for n in state.get("stage_steps", [])):
        return "'stage_steps' holds a negative count"
    need = {"stage", "after_task", "eval_task", "score"}
    for row in state["scores"]:
        if not need <= set(row):
            return f"a 'scores' row lacks {', '.join(sorted(need - set(row)))}"
        if row["after_task"] not in state["completed"]:
            return f"a 'scores' row is of stage {row['after_task']!r}, which is not completed"
        if not (is_num(row["score"]) or row["score"] is None):
            return f"a 'scores' row has score {row['score']!r}, not a number"
        problem = _score_row_problem(row)
        if problem:
            return f"a 'scores' row has {problem}"
    if "sha256" in state and not (isinstance(state["sha256"], dict) and all(
            isinstance(k, str) and all(is_valid_name(part) for part in k.split("/"))
            and isinstance(v, str) for k, v in state["sha256"].items())):
        return "'sha256' must map run-dir-relative file paths to hex digests"
    return None


def _score_row_problem(row: dict) -> str | None:
    """What is wrong with the fields of one ``scores`` row besides ``after_task`` and ``score``."""
    if not is_valid_name(row["eval_task"]):
        return f"eval_task {row['eval_task']!r}, not a task name"
    if not _is_count(row["stage"]):
        return f"stage {row['stage']!r}, not a stage index (an integer >= 0)"
    if "metric" in row and not isinstance(row["metric"], str):
        return f"metric {row['metric']!r}, not a metric name"
    if "n" in row and not _is_count(row["n"]):
        return f"n {row['n']!r}, not a count (an integer >= 0)"
    return None


def _is_count(value: Any) -> bool:
    return is_int(value) and value >= 0


_STAGE_COUNTS = ("stage", "inner_steps", "optimizer_steps", "merges", "memory_size", "processes")


def stage_problem(info: Any, name: str | None = None) -> str | None:
    """Why ``info`` is not a ``stage.json`` a run wrote (``None``: it is). The fields its readers
    use are type-checked where present (``name``, the counts, ``train_tasks``, ``seconds``,
    ``first_stage_from``); fields this version does not know are left alone. ``name``: the stage
    the folder holds (its ``name`` field, if any, must be that)."""
    if object_problem(info):
        return object_problem(info)
    if "name" in info and not is_valid_name(info["name"]):
        return f"name={info['name']!r}: a stage name expected"
    if name is not None and info.get("name", name) != name:
        return f"name={info['name']!r}, but the folder holds stage {name!r}"
    for key in _STAGE_COUNTS:
        if key in info and not _is_count(info[key]):
            return f"{key}={info[key]!r}: a count (an integer >= 0) expected"
    tasks = info.get("train_tasks", [])
    if not (isinstance(tasks, list) and all(is_valid_name(t) for t in tasks)):
        return "train_tasks: a list of task names expected"
    seconds = info.get("seconds", {})
    if not (isinstance(seconds, dict) and all(is_num(v) and math.isfinite(v) and v >= 0
                                              for v in seconds.values())):
        return "seconds: a mapping of timer name to seconds (a number >= 0) expected"
    if "first_stage_from" in info and not isinstance(info["first_stage_from"], str):
        return f"first_stage_from={info['first_stage_from']!r}: a run name expected"
    return None


_METRIC_NUMBERS = ("OP", "BWT", "FWT", "forgetting")


def metrics_problem(metrics: Any) -> str | None:
    """Why ``metrics`` is not a ``metrics.json`` a run wrote (``None``: it is); fields this
    version does not know are left alone."""
    if object_problem(metrics):
        return object_problem(metrics)
    if "complete" in metrics and not isinstance(metrics["complete"], bool):
        return f"complete={metrics['complete']!r}: true or false expected"
    if "stages_done" in metrics and not is_int(metrics["stages_done"]):
        return f"stages_done={metrics['stages_done']!r}: an integer expected"
    for name in _METRIC_NUMBERS:
        if metrics.get(name) is not None and not is_num(metrics[name]):
            return f"{name}={metrics[name]!r}: a number or null expected"
    for name in ("merges_per_stage", "single_task"):
        if name in metrics and not (isinstance(metrics[name], dict) and all(
                is_num(v) or v is None for v in metrics[name].values())):
            return f"{name}: a mapping of task to number expected"
    return None


def scores_matrix_problem(rows: dict[str, dict[str, Any]], scores: list[dict]) -> str | None:
    """Why a ``scores_matrix.csv`` (``rows``: after task -> evaluated task -> score) disagrees
    with the ``scores`` of ``state.json`` (``None``: it holds every one of them).

    Only this direction is checked: the engine writes the result files before ``state.json``
    (the resume point), so for a moment the matrix may hold a stage the state does not yet."""
    for row in scores:
        after, task, score = row["after_task"], row["eval_task"], row["score"]
        if after not in rows:
            return f"no row {after!r}, a stage state.json records as completed"
        if task not in rows[after]:
            return f"no column {task!r}, a task state.json records a score for"
        value = rows[after][task]
        if score is None:
            agree = not is_num(value) or math.isnan(value)
        else:
            agree = is_num(value) and math.isclose(value, score, rel_tol=1e-9, abs_tol=1e-12)
        if not agree:
            return f"scores[{after}][{task}] is {value!r}, state.json records {score!r}"
    return None


__all__ = ["metrics_problem", "object_problem", "scores_matrix_problem", "stage_problem",
           "state_problem"]
