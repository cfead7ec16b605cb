"""The plug-in interface between the training engine and a continual-learning method.

The engine owns the loop (tasks -> inner optimiser steps -> evaluation -> run store); a method
only reacts to hooks. A new method is one file with a :class:`Method` subclass (its facts as
class attributes) plus its class in ``METHODS`` of ``aimm/methods/__init__.py``; it never edits
the engine, and nothing else in the package names it.

Hooks, in the order the engine calls them::

    stages(tasks)                      -> which tasks each stage trains and evaluates
    training_examples(ctx, stage)      -> the examples of the stage's inner phase
    on_stage_start(ctx)                -> e.g. reset a controller, snapshot parameters
    before_optimizer_step(ctx)         -> gradients of the inner step are available
    after_optimizer_step(ctx)          -> clipped gradients still live, weights updated
    after_step(ctx, record)            -> after every inner optimiser step; may add fields to the
                                          step's trajectory record, run rehearsal, merge
    on_stage_end(ctx)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from aimm.errors import ConfigError
from aimm.util import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from aimm.engine import TrainContext


@dataclass(frozen=True)
class Stage:
    """One training phase: train on ``train_tasks``, then evaluate ``eval_tasks``."""

    index: int
    name: str
    train_tasks: tuple[str, ...]
    eval_tasks: tuple[str, ...]


@dataclass
class NoOptions:
    """A method without options."""


class Method:
    """Base class: plain sequential LoRA fine-tuning, no memory, no merging."""

    # the method's facts: the engine, plots, notebooks and reproduce read them from here
    name: ClassVar[str] = "base"  # registry key, config value, run-dir label
    display_name: ClassVar[str] = "Base"  # in figures and tables
    color: ClassVar[str] = "#7F7F7F"  # its colour in every figure (Okabe-Ito palette)
    Options: ClassVar[type] = NoOptions
    uses_memory: ClassVar[bool] = False  # build a memory buffer of earlier tasks
    joint: ClassVar[bool] = False  # one stage over all tasks (metrics: OP only)
    fresh_adapter_per_stage: ClassVar[bool] = False  # single-task reference
    merges: ClassVar[bool] = False  # fuses updates within a stage (merge events, intervals)
    smoke_options: ClassVar[dict[str, Any]] = {}  # options of a tiny smoke run (a merge in 4 steps)

    @classmethod
    def sequential(cls) -> bool:
        """Trains the tasks one after another into one adapter (has a task-1 curve, BWT, FWT)."""
        return not (cls.joint or cls.fresh_adapter_per_stage)

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    # ---------------------------------------------------------------- configuration
    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> Any:
        """Validate ``method_options``; unknown names raise with a suggestion."""
        names = [f.name for f in dataclasses.fields(cls.Options)]
        for key in values:
            if key not in names:
                raise ConfigError(
                    f"{cls.name}: unknown option '{key}'" + did_you_mean(key, names)
                    + (f"; options: {', '.join(names)}" if names else "; this method has no options")
                )
        opts = cls.Options(**values)
        check = getattr(opts, "validate", None)
        if check is not None:
            check()
        return opts

    # ---------------------------------------------------------------- hooks
    def stages(self, tasks: list[str]) -> list[Stage]:
        return [Stage(i, t, (t,), tuple(tasks[: i + 1])) for i, t in enumerate(tasks)]

    def training_examples(self, ctx: "TrainContext", stage: Stage) -> list:
        return [ex for t in stage.train_tasks for ex in ctx.data[t].train]

    def on_stage_start(self, ctx: "TrainContext") -> None:
        pass

    def before_optimizer_step(self, ctx: "TrainContext") -> None:
        """Called after backward, before clipping and the inner optimiser step (grads live)."""

    def after_optimizer_step(self, ctx: "TrainContext") -> None:
        """Called after clipping, the inner optimiser step and the scheduler step, before the
        gradients are cleared: clipped gradients and updated weights (where the release updates
        its importance EMAs)."""

    def after_step(self, ctx: "TrainContext", record: dict[str, Any]) -> None:
        """Called after every inner optimiser step. Base: optional forgetting-signal probe."""
        if ctx.cfg.probe_history and ctx.has_memory:
            record["history_loss"] = ctx.probe_loss()

    def on_stage_end(self, ctx: "TrainContext") -> None:
        pass

    # ---------------------------------------------------------------- resume within a stage
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: "TrainContext") -> None:
        """Restore :meth:`state_dict` inside a stage (after ``on_stage_start``)."""
