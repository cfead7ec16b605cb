"""The plug-in interface between the training engine and a continual-learning method.

The engine (:mod:`aimm.training.engine`) owns the loop (tasks -> inner optimiser steps ->
evaluation -> run store); a method only reacts to hooks and sees a
:class:`~aimm.training.context.TrainContext`. A new method is one file with a :class:`Method`
subclass (its facts as class attributes) plus its class in ``METHODS`` of
``aimm/methods/__init__.py``; it never edits the engine, and nothing else in the package names it.

Hooks, in the order the engine calls them (every one a no-op or today's LoRA behaviour by
default)::

    setup_model(bundle, cfg)           -> once: the model to train (default: attach LoRA)
    trainable_parameters(model)        -> once per stage: what the inner optimiser updates
    load_stage_state(state, model)     -> on resume only, before the next stage: what
                                          stage_state() returned at the last completed stage
    stages(tasks)                      -> which tasks each stage trains and evaluates
    training_examples(ctx, stage)      -> the examples of the stage's inner phase
    on_stage_start(ctx)                -> e.g. reset a controller, snapshot parameters
      inner_loss(ctx, batch)           -> one micro-batch's loss before / grad_accum and
                                          backward (default: lm_loss + extra_loss)
      extra_loss(ctx, batch)           -> a term added to it (None: nothing), e.g. a penalty
      before_optimizer_step(ctx)       -> gradients of the inner step are available
      after_optimizer_step(ctx)        -> clipped gradients still live, weights updated
      after_step(ctx, record)          -> after every inner optimiser step; may add fields to the
                                          step's trajectory record, run rehearsal, merge
    on_stage_end(ctx)                  -> after the last inner step, BEFORE the adapter check and
                                          evaluation: may change the model (continual merging)
    stage_state()                      -> after evaluation: cross-stage state saved in the stage
                                          folder (tensors + plain data; None: nothing)

``state_dict`` / ``load_state_dict`` are the within-stage counterpart (checkpoints).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from aimm.errors import ConfigError
from aimm.loss import lm_loss
from aimm.training.context import Stage
from aimm.typecheck import field_problems
from aimm.util import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from aimm.models import ModelBundle
    from aimm.training.context import TrainContext


@dataclass
class NoOptions:
    """A method without options."""


class Method:
    """Base class: plain sequential LoRA fine-tuning, no memory, no merging."""

    # the method's facts: the engine, plots, notebooks and reproduce read them from here
    name: ClassVar[str] = "base"  # registry key, config value, run-dir label
    display_name: ClassVar[str] = "Base"  # in figures and tables
    # one line for `aimm methods`; a subclass without one gets its docstring's first line
    # (the class's, else its module's)
    description: ClassVar[str] = "plain sequential LoRA fine-tuning, no memory, no merging"
    color: ClassVar[str] = "#7F7F7F"  # its colour in every figure (Okabe-Ito palette)
    Options: ClassVar[type] = NoOptions
    uses_memory: ClassVar[bool] = False  # build a memory buffer of earlier tasks
    adapter_is_model: ClassVar[bool] = True  # the stage's LoRA adapter is the evaluated model;
    #   False: it is not (continual merging), and evaluated_delta() gives the model for export
    joint: ClassVar[bool] = False  # one stage over all tasks (metrics: OP only)
    fresh_adapter_per_stage: ClassVar[bool] = False  # single-task reference
    merges: ClassVar[bool] = False  # fuses updates within a stage (merge events, intervals)
    merge_kinds: ClassVar[tuple[str, ...]] = ()  # the kinds its merge events can have (tables list each, 0s too)
    smoke_options: ClassVar[dict[str, Any]] = {}  # options of a tiny smoke run (a merge in 4 steps)
    # the stage folder holds a PEFT adapter (``adapter/``) and ``aimm export`` writes it; False: the
    # method trains the base weights, saved by its stage_state(), exported as a full model
    peft_adapter: ClassVar[bool] = True
    # the method whose first stage this one trains and evaluates bit for bit (no earlier task: no
    # memory, penalty, projection or merge), so a study may copy that run's first stage
    # (aimm.training.shared_stage); its options must act from the second task on. None: its own
    first_stage_as: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "description" not in cls.__dict__:
            module = sys.modules.get(cls.__module__)
            cls.description = (_first_line(cls.__doc__) or _first_line(getattr(module, "__doc__", None))
                               or cls.display_name)

    @classmethod
    def sequential(cls) -> bool:
        """Trains the tasks one after another into one adapter (has a task-1 curve, BWT, FWT)."""
        return not (cls.joint or cls.fresh_adapter_per_stage)

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    # ---------------------------------------------------------------- configuration
    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> Any:
        """Validate ``method_options``: unknown names raise with a suggestion; every value is
        checked against its ``Options`` field's annotation as strictly as a RunConfig field
        (:mod:`aimm.typecheck`: ``"False"`` is not a boolean, ``True`` not an integer, NaN and
        infinities are refused), then by the options' own ``validate()``."""
        names = [f.name for f in dataclasses.fields(cls.Options)]
        for key in values:
            if key not in names:
                raise ConfigError(
                    f"{cls.name}: unknown option '{key}'" + did_you_mean(key, names)
                    + (f"; options: {', '.join(names)}" if names else "; this method has no options")
                )
        for problem in field_problems(cls.Options, values).values():
            raise ConfigError(f"{cls.name}: option {problem}")
        opts = cls.Options(**values)
        check = getattr(opts, "validate", None)
        if check is not None:
            check()
        return opts

    # ---------------------------------------------------------------- model
    def setup_model(self, bundle: "ModelBundle", cfg: Any) -> "ModelBundle":
        """The model this method trains, from the loaded base ``bundle`` (once per run).

        Default: one LoRA adapter from the run's ``lora_*`` settings. A method may attach another
        PEFT config (prompt tuning) or unfreeze the base weights (full fine-tuning); what it
        returns is what the engine prepares, trains and evaluates."""
        from aimm.models import attach_lora

        return attach_lora(bundle, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=cfg.lora_targets)

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """What the inner optimiser updates (every stage). Default: every parameter with
        ``requires_grad`` (after :meth:`setup_model`: the LoRA weights), in model order. Torch
        parameter groups (dicts with ``params`` and e.g. the method's own ``lr``) are accepted too."""
        return [p for p in model.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- hooks
    def stages(self, tasks: list[str]) -> list[Stage]:
        return [Stage(i, t, (t,), tuple(tasks[: i + 1])) for i, t in enumerate(tasks)]

    def training_examples(self, ctx: "TrainContext", stage: Stage) -> list:
        return [ex for t in stage.train_tasks for ex in ctx.data[t].train]

    def on_stage_start(self, ctx: "TrainContext") -> None:
        pass

    def inner_loss(self, ctx: "TrainContext", batch: dict) -> torch.Tensor:
        """The loss of one inner micro-batch (before ``/ grad_accum`` and backward): the
        target-token cross-entropy plus :meth:`extra_loss`. Override to reuse the forward's
        outputs (e.g. distillation on the same logits)."""
        loss = lm_loss(ctx.model, batch, ctx.is_seq2seq)
        extra = self.extra_loss(ctx, batch)
        return loss if extra is None else loss + extra

    def extra_loss(self, ctx: "TrainContext", batch: dict) -> torch.Tensor | None:
        """A term added to every inner micro-batch loss before backward (a penalty, a
        regulariser); ``None`` adds nothing. Rehearsal steps do not add it."""
        return None

    def before_optimizer_step(self, ctx: "TrainContext") -> None:
        """Called after backward, before clipping and the inner optimiser step (grads live)."""

    def after_optimizer_step(self, ctx: "TrainContext") -> None:
        """Called after clipping, the inner optimiser step and the scheduler step, before the
        gradients are cleared: clipped gradients and updated weights (where the release updates
        its importance EMAs)."""

    def after_step(self, ctx: "TrainContext", record: dict[str, Any]) -> None:
        """Called after every inner optimiser step. Base: the forgetting signal recorded as an
        observation (``record_forgetting_signal``; it does not change training)."""
        if ctx.cfg.record_forgetting_signal and ctx.has_memory:
            record["forgetting_signal"] = ctx.recorded_forgetting_signal()

    def on_stage_end(self, ctx: "TrainContext") -> None:
        """After the stage's last inner step, before the finite-adapter check, evaluation and the
        stage folder: a change to the model here (e.g. merging the task's update into a running
        model) is what gets evaluated and saved."""

    # ---------------------------------------------------------------- state across stages
    def stage_state(self) -> dict[str, Any] | None:
        """State a later stage needs (Fisher information, old adapters, task vectors, ...),
        saved at every stage end in the stage folder as ``method_state.safetensors`` (tensors)
        + ``method_state.json`` (plain data: str/int/float/bool/None, lists, tuples, dicts),
        sha256-recorded like every stage file. ``None`` (default): nothing is saved. Called on
        the main process only, after evaluation."""
        return None

    def load_stage_state(self, state: dict[str, Any], model: torch.nn.Module) -> None:
        """On resume, before the next stage runs (its adapter already restored into ``model``):
        what :meth:`stage_state` returned at the last completed stage, so a resumed run continues
        as an uninterrupted one (a full fine-tune puts its saved weights back into ``model``)."""

    def evaluated_delta(self, state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """For ``adapter_is_model = False``: from a stage's :meth:`stage_state`, the ``ΔW`` per
        LoRA target module (PEFT module name -> out x in) that, added to the base weights, gives
        the model the stage evaluated (``aimm export`` writes it). ``None``: not exportable."""
        return None

    # ---------------------------------------------------------------- resume within a stage
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: "TrainContext") -> None:
        """Restore :meth:`state_dict` inside a stage (after ``on_stage_start``)."""


def _first_line(doc: str | None) -> str:
    """The first non-empty line of a docstring, stripped ("" for none)."""
    return next((line.strip() for line in (doc or "").splitlines() if line.strip()), "")
