"""Baselines of the paper: sequential LoRA, experience replay, multi-task and single-task LoRA."""

from __future__ import annotations

from aimm.methods.base import Method, Stage


class SeqLoRA(Method):
    """One LoRA adapter trained through the tasks in order (the "vanilla" lower bound)."""

    name = "seq_lora"


class Replay(Method):
    """Experience replay: the memory buffer of earlier tasks is mixed into the training set."""

    name = "replay"
    uses_memory = True

    def training_examples(self, ctx, stage: Stage) -> list:
        return super().training_examples(ctx, stage) + list(ctx.memory_examples)


class MultiTask(Method):
    """Joint training on all tasks at once: the upper bound. One stage; metrics: OP only."""

    name = "mtl"
    joint = True

    def stages(self, tasks: list[str]) -> list[Stage]:
        return [Stage(0, "all", tuple(tasks), tuple(tasks))]


class SingleTask(Method):
    """A fresh LoRA per task, evaluated on that task only: single_i of the FWT metric."""

    name = "single_task"
    fresh_adapter_per_stage = True

    def stages(self, tasks: list[str]) -> list[Stage]:
        return [Stage(i, t, (t,), (t,)) for i, t in enumerate(tasks)]
