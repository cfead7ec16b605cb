"""Evaluate a trained stage, then write its folder; compute and write the run's result set.

The stage folder ``stages/<k>_<name>/`` (see :mod:`aimm.runs` for the whole layout):
``predictions/<task>.jsonl`` (written while evaluating), ``adapter.safetensors``, ``adapter/``
(PEFT's format, :mod:`aimm.export`; none where the method's ``peft_adapter`` is False),
``steps.csv``, ``merges.csv``, ``memory.json``, ``stage.json`` (counts, timings, training and
evaluation truncation) and, for a method with cross-stage state, ``method_state.safetensors``
+ ``method_state.json`` (tensors in safetensors, the rest JSON; never pickle). The result set
(``scores.csv``, ``scores_matrix.csv``, ``metrics.json``) is computed first, from
:mod:`aimm.metrics` only, then written as one set.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aimm.faults import crash_point
from aimm.runs import (
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_jsonl,
)
from aimm.training.method_state import write_method_state

if TYPE_CHECKING:  # pragma: no cover
    from aimm.methods.base import Method
    from aimm.training.context import TrainContext
    from aimm.training.state import RunState


def evaluate_stage(ctx: "TrainContext", data: dict, stage_dir: Path) -> tuple[list[dict], dict[str, dict]]:
    """Score every task the stage evaluates and write its predictions (main process only).

    Returns the score rows and, per task, the evaluation's truncation counts."""
    from aimm.data import task_metric
    from aimm.evaluation import RELEASE_ANSWER_MAPS, evaluate_task

    cfg, stage = ctx.cfg, ctx.stage
    model = ctx.accelerator.unwrap_model(ctx.model)
    rows, truncation = [], {}
    started = time.perf_counter()
    # a compiled model evaluates eagerly: evaluation's ever-changing shapes would recompile
    stance = torch.compiler.set_stance("force_eager") if cfg.compile else contextlib.nullcontext()
    with stance:
        for task in stage.eval_tasks:
            td = data[task]
            metric = task_metric(cfg.benchmark, task)
            result = evaluate_task(model, ctx.tokenizer, td.test, is_seq2seq=ctx.is_seq2seq,
                                   metric=metric, labels=td.label_set, mode=cfg.eval_mode,
                                   batch_size=cfg.eval_batch_size,
                                   # release: no truncation at evaluation (generate_bwt.py)
                                   max_input_len=None if cfg.truncation == "release" else cfg.max_input_len,
                                   truncation=cfg.truncation,
                                   answer_map=RELEASE_ANSWER_MAPS.get(task) if cfg.release_answer_map else None,
                                   progress=f"eval {task} after {stage.name}" if cfg.progress else False)
            atomic_write_jsonl(stage_dir / "predictions" / f"{task}.jsonl", result.predictions)
            crash_point("eval")
            rows.append({"stage": stage.index, "after_task": stage.name, "eval_task": task,
                         "metric": metric, "score": result.score, "n": len(td.test),
                         "split": td.test_split})
            truncation[task] = result.truncation
    ctx.timers["eval"] = time.perf_counter() - started
    return rows, truncation


def write_stage(ctx: "TrainContext", method: "Method", stage_dir: Path,
                eval_truncation: dict[str, dict]) -> None:
    """Write the stage folder after :func:`evaluate_stage` (main process only)."""
    from safetensors.torch import save as safetensors_bytes

    from aimm.export import base_model_name, save_adapter
    from aimm.models import lora_state_dict

    cfg, stage, accelerator = ctx.cfg, ctx.stage, ctx.accelerator
    model = accelerator.unwrap_model(ctx.model)
    atomic_write_bytes(stage_dir / "adapter.safetensors", safetensors_bytes(lora_state_dict(model)))
    if method.peft_adapter:  # a full fine-tune's weights are its method state instead
        save_adapter(model, stage_dir / "adapter", base_model_name(cfg.model))  # PEFT's format
    atomic_write_csv(stage_dir / "steps.csv", ctx.steps)
    atomic_write_csv(stage_dir / "merges.csv", ctx.merges)
    atomic_write_json(stage_dir / "memory.json", ctx.memory_ids)
    write_method_state(stage_dir, method.stage_state())
    atomic_write_json(stage_dir / "stage.json", {
        "stage": stage.index, "name": stage.name, "train_tasks": list(stage.train_tasks),
        "inner_steps": ctx.total_steps, "optimizer_steps": ctx.optimizer_steps,
        "merges": len(ctx.merges), "memory_size": len(ctx.memory_examples),
        "seconds": {k: round(v, 3) for k, v in ctx.timers.items()},
        "processes": accelerator.num_processes,
        "lora_checksum_per_rank": ctx.rank_checksums,
        "resumed_within_stage": ctx.resumed_at,
        "truncation": ctx.counter.as_dict(),
        "eval_truncation": eval_truncation})


# ------------------------------------------------------------------------------ result set
def result_set(cfg, method: "Method", tasks: list[str], state: "RunState",
               run_dir: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """``(scores.csv rows, scores_matrix.csv rows, metrics.json)`` of the completed stages."""
    from aimm.metrics import run_metrics

    stage_names = [s.name for s in method.stages(tasks)]
    index = {name: j for j, name in enumerate(stage_names)}
    col = {t: i for i, t in enumerate(tasks)}
    matrix = [[float("nan")] * len(tasks) for _ in stage_names]
    for r in state.scores:
        matrix[index[r["after_task"]]][col[r["eval_task"]]] = r["score"]
    matrix_rows = [{"after_task": name, **{t: matrix[j][i] for i, t in enumerate(tasks)}}
                   for j, name in enumerate(stage_names)]
    complete = len(state.completed) == len(stage_names)
    metrics: dict[str, Any] = {"method": cfg.method, "complete": complete,
                               "stages_done": len(state.completed)}
    if complete:
        values = run_metrics(matrix, joint=method.joint, single_task=method.fresh_adapter_per_stage)
        if "single_task" in values:
            values["single_task"] = dict(zip(tasks, values["single_task"]))
        metrics.update(values)
    metrics["merges_per_stage"] = merges_per_stage(run_dir, state.completed)
    return state.scores, matrix_rows, metrics


def write_results(cfg, method: "Method", tasks: list[str], state: "RunState", run_dir: Path) -> None:
    """One consistent set: everything computed first, then written (``metrics.json`` last)."""
    rows, matrix_rows, metrics = result_set(cfg, method, tasks, state, run_dir)
    atomic_write_csv(run_dir / "scores.csv", rows)
    atomic_write_csv(run_dir / "scores_matrix.csv", matrix_rows)
    atomic_write_json(run_dir / "metrics.json", metrics)


def merges_per_stage(run_dir: Path, completed: list[str]) -> dict[str, int]:
    """Merges of each completed stage, from its ``stage.json`` (a folder of a stage not
    completed is an orphan the run redoes: not read). :class:`RunDirError` names a malformed one
    with the rewind that writes it again."""
    from aimm.integrity import read_stage_record
    from aimm.runs import RunStore

    out = {}
    for i, name in enumerate(completed):
        path = RunStore(Path(run_dir)).stage_dir(i, name) / "stage.json"
        if not path.is_file():  # a lost one is reported by verify_run (listed in state.json)
            continue
        out[name] = read_stage_record(path, i + 1, name).get("merges", 0)
    return out


__all__ = ["evaluate_stage", "merges_per_stage", "result_set", "write_results", "write_stage"]
