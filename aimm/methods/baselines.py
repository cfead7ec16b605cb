"""Baselines of the paper: sequential LoRA, experience replay, multi-task and single-task LoRA."""

from __future__ import annotations

from aimm.methods.base import Method, Stage


class SeqLoRA(Method):
    """One LoRA adapter trained through the tasks in order (the "vanilla" lower bound)."""

    name = "seq_lora"
    display_name = "SeqLoRA"
    color = "#0072B2"  # blue


class Replay(Method):
    """Experience replay: the memory buffer of earlier tasks is mixed into the training set."""

    name = "replay"
    display_name = "Replay"
    color = "#009E73"  # green
    uses_memory = True
    first_stage_as = "seq_lora"  # no buffer before the second task

    def training_examples(self, ctx, stage: Stage) -> list:
        return super().training_examples(ctx, stage) + list(ctx.memory_examples)


class MultiTask(Method):
    """Joint training on all tasks at once: the upper bound. One stage; metrics: OP only."""

    name = "mtl"
    display_name = "Multi-task"
    color = "#000000"  # black
    joint = True

    def stages(self, tasks: list[str]) -> list[Stage]:
        return [Stage(0, "all", tuple(tasks), tuple(tasks))]


class SingleTask(Method):
    """A fresh LoRA per task, evaluated on that task only: single_i of the FWT metric."""

    name = "single_task"
    display_name = "Single-task"
    color = "#CC79A7"  # pink
    fresh_adapter_per_stage = True
    first_stage_as = "seq_lora"  # its first fresh adapter starts where seq_lora's does

    def stages(self, tasks: list[str]) -> list[Stage]:
        return [Stage(i, t, (t,), (t,)) for i, t in enumerate(tasks)]
