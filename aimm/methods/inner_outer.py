"""Inner/outer merging: the sequence AIMMerging and Recurrent-KIF share (spec §3).

From the second task on (when there is a memory buffer), the method keeps θ_t, the parameters at
the last merge (or task start). When :meth:`InnerOuterMerging.should_merge` says so after an inner
step, :meth:`InnerOuterMerging.merge` runs::

    snapshot θ_k -> Δ_in = θ_k - θ_t -> rehearse (outer_steps rehearsal steps on memory batches)
    -> Δ_out = θ_after - θ_k -> fuse(Δ_in, Δ_out) -> apply to the model, θ_t = fused -> log

This class owns θ_t, the outer optimiser (option ``outer_optimizer``: ``shared`` uses the inner
AdamW at its current lr, the release's behaviour; ``separate`` its own AdamW at ``outer_lr``) and
its state, the sequence above, the merge log and the within-stage ``state_dict``. A merging
method supplies :meth:`should_merge`, :meth:`outer_steps` and :meth:`fuse`, plus its own
bookkeeping (:meth:`start_task`, :meth:`after_rehearsal_step`, :meth:`task_state` /
:meth:`load_task_state`). Task 1 (no memory) is plain LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aimm.errors import ConfigError
from aimm.faults import crash_point
from aimm.merging import fusion
from aimm.methods.base import Method


@dataclass
class OuterOptions:
    """The outer optimiser options every inner/outer merging method has."""

    outer_optimizer: str = "shared"  # shared (release) | separate
    outer_lr: float = 1e-3  # for outer_optimizer="separate"

    def validate(self) -> None:
        if self.outer_optimizer not in ("shared", "separate"):
            raise ConfigError(f"outer_optimizer={self.outer_optimizer!r}: choose shared or separate")
        if not (isinstance(self.outer_lr, (int, float)) and self.outer_lr > 0):
            raise ConfigError(f"outer_lr={self.outer_lr!r}: must be > 0")


class InnerOuterMerging(Method):
    """Base of the merging methods: see the module docstring."""

    Options = OuterOptions
    uses_memory = True
    merges = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.active = False  # this task merges (it has a memory buffer)
        self.theta_t: dict[str, torch.Tensor] | None = None
        self.outer_opt: torch.optim.Optimizer | None = None

    # ---------------------------------------------------------------- what a method supplies
    def start_task(self, ctx) -> None:
        """Per-task bookkeeping at the start of a merging task (a fresh controller, ...)."""

    def should_merge(self, ctx, record: dict[str, Any]) -> bool:
        """After inner step ``ctx.step``: merge now? May add fields to the step's ``record``."""
        raise NotImplementedError

    def outer_steps(self) -> int:
        """Rehearsal steps of the merge about to run."""
        raise NotImplementedError

    def fuse(self, ctx, delta_in: dict[str, torch.Tensor],
             delta_out: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(fused parameters, merge-event fields)`` from θ_t (``self.theta_t``) and the two
        updates; the fields go to ``merges.csv`` (``task`` and ``stage`` are added)."""
        raise NotImplementedError

    def after_rehearsal_step(self, ctx) -> None:
        """After each rehearsal step's optimiser step, before its gradients are cleared."""

    def task_state(self) -> dict[str, Any]:
        """The method's own within-stage state (for checkpoints)."""
        return {}

    def load_task_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`task_state`."""

    rehearsal_batch_size: int | None = None  # None: the run's memory_batch_size

    # ---------------------------------------------------------------- the shared sequence
    def on_stage_start(self, ctx) -> None:
        self.active = ctx.has_memory
        if not self.active:  # task 1: plain LoRA
            return
        self.start_task(ctx)
        self.theta_t = fusion.snapshot(ctx.lora_params())
        self.outer_opt = None
        if self.options.outer_optimizer == "separate":
            self.outer_opt = torch.optim.AdamW(list(ctx.lora_params().values()),
                                               lr=self.options.outer_lr)

    def after_step(self, ctx, record: dict[str, Any]) -> None:
        if not self.active:
            return super().after_step(ctx, record)
        if self.should_merge(ctx, record):
            self.merge(ctx)
            record["merged"] = 1

    def merge(self, ctx) -> None:
        """snapshot -> rehearse -> fuse -> apply -> log (the module docstring)."""
        params = ctx.lora_params()
        theta_k = fusion.snapshot(params)
        delta_in = fusion.delta(theta_k, self.theta_t)
        for _ in range(self.outer_steps()):
            ctx.rehearsal_step(self.outer_opt, on_grads=self.after_rehearsal_step,
                               batch_size=self.rehearsal_batch_size)
            crash_point("merge")
        delta_out = fusion.delta(fusion.snapshot(params), theta_k)
        fused, event = self.fuse(ctx, delta_in, delta_out)
        fusion.apply_(params, fused)
        self.theta_t = fused
        ctx.log_merge(event)

    # ---------------------------------------------------------------- resume within a stage
    def state_dict(self) -> dict[str, Any]:
        if not self.active:
            return {}
        return {"theta_t": self.theta_t,
                "outer_opt": None if self.outer_opt is None else self.outer_opt.state_dict(),
                **self.task_state()}

    def load_state_dict(self, state: dict[str, Any], ctx) -> None:
        if not state:
            return
        # a checkpoint's tensors come on the CPU: θ_t and the per-parameter task state (e.g.
        # importance EMAs) go where the LoRA weights train
        live = ctx.lora_params()
        state = {k: beside(v, live) if isinstance(v, dict) else v for k, v in state.items()}
        self.theta_t = state["theta_t"]
        if self.outer_opt is not None and state["outer_opt"] is not None:
            self.outer_opt.load_state_dict(state["outer_opt"])
        self.load_task_state(state)


def beside(tensors: dict, live: dict[str, torch.Tensor]) -> dict:
    """``tensors`` with each tensor named like a parameter of ``live`` on that parameter's
    device (anything else unchanged)."""
    return {k: v.to(live[k].device) if k in live and isinstance(v, torch.Tensor) else v
            for k, v in tensors.items()}


__all__ = ["InnerOuterMerging", "OuterOptions", "beside"]
