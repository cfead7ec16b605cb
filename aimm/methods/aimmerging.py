"""AIMMerging (Feng et al., EMNLP 2025) on the engine: spec §2-§4.

Task 1 is plain LoRA. From task 2 on, after every inner step a forgetting-signal probe (loss on a
memory batch) feeds the :class:`~aimm.merging.MergeController`; when it says "merge", the
method runs ``outer_steps`` rehearsal steps on memory batches and fuses the inner and outer
parameter changes with the controller's weights. The math lives in ``aimm.merging``; this file
is the thin stateful wrapper.

Options for the release's defects (spec §7), each defaulting to the release's behaviour:

* ``outer_optimizer``: ``shared`` (release: rehearsal steps use the inner AdamW and its lr,
  because the separate optimiser is never stepped) or ``separate`` (its own AdamW, ``outer_lr``).
* ``probe_mode``: ``train`` (release: dropout on while probing) or ``eval``.
* ``normalize_by``: ``planned`` (release: Lambda divides by the planned interval S) or
  ``actual`` (by the steps actually taken since the last merge).
* the buffer (``buffer_mode`` of the run config): ``official`` (uncapped) or ``capped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from aimm.errors import ConfigError
from aimm.faults import crash_point
from aimm.merging import ControllerConfig, MergeController
from aimm.merging import fusion
from aimm.methods.base import Method


@dataclass
class AIMMergingOptions:
    initial_interval: int = 8
    min_interval: int = 2
    max_interval: int = 128
    cold_start: int = 3
    threshold_factor: float = 2.0
    outer_ratio: float = 1.0
    adaptive: bool = True
    variant: str = "official"  # official | paper
    normalize_by: str = "planned"  # planned (release) | actual
    outer_optimizer: str = "shared"  # shared (release) | separate
    outer_lr: float = 1e-3  # for outer_optimizer="separate"
    probe_mode: str = "train"  # train (release) | eval
    probe_every: int = 1  # probe (and observe) every k-th inner step (release: 1)
    probe_batch_size: int | None = None  # None: the run's memory_batch_size (release: 32)
    rehearsal_batch_size: int | None = None  # None: the run's memory_batch_size (release: 32)
    fast: bool = False  # cheap signals: probe_every=2, probe batch = batch_size // 2,
    #                     rehearsal batch = batch_size (see README, "fast")
    controller: dict = field(default_factory=dict)  # further ControllerConfig fields

    def validate(self) -> None:
        if self.outer_optimizer not in ("shared", "separate"):
            raise ConfigError(f"outer_optimizer={self.outer_optimizer!r}: choose shared or separate")
        if self.probe_mode not in ("train", "eval"):
            raise ConfigError(f"probe_mode={self.probe_mode!r}: choose train or eval")
        if not (isinstance(self.probe_every, int) and self.probe_every >= 1):
            raise ConfigError(f"probe_every={self.probe_every!r}: must be an integer >= 1")
        if not (isinstance(self.outer_lr, (int, float)) and self.outer_lr > 0):
            raise ConfigError(f"outer_lr={self.outer_lr!r}: must be > 0")
        try:
            self.make_controller()
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc

    def resolved(self, batch_size: int) -> "AIMMergingOptions":
        """Apply the ``fast`` preset (explicit values win)."""
        if not self.fast:
            return self
        from dataclasses import replace

        return replace(self, fast=False,
                       probe_every=self.probe_every if self.probe_every != 1 else 2,
                       probe_batch_size=self.probe_batch_size or max(1, batch_size // 2),
                       rehearsal_batch_size=self.rehearsal_batch_size or batch_size)

    def make_controller(self) -> MergeController:
        return MergeController(ControllerConfig(
            initial_interval=self.initial_interval, min_interval=self.min_interval,
            max_interval=self.max_interval, cold_start=self.cold_start,
            threshold_factor=self.threshold_factor, outer_ratio=self.outer_ratio,
            adaptive=self.adaptive, variant=self.variant, normalize_by=self.normalize_by,
            **self.controller))


class AIMMerging(Method):
    name = "aimmerging"
    display_name = "AIMMerging"
    color = "#D55E00"  # vermillion
    Options = AIMMergingOptions
    uses_memory = True
    merges = True
    smoke_options = {"initial_interval": 2}

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.controller: MergeController | None = None
        self.theta_t: dict[str, torch.Tensor] | None = None
        self.outer_opt = None

    # one controller per task (spec §4b), fresh at every stage
    def on_stage_start(self, ctx) -> None:
        self.controller = None
        if not ctx.has_memory:  # task 1: plain LoRA
            return
        self.options = self.options.resolved(ctx.cfg.batch_size)
        self.controller = self.options.make_controller()
        self.theta_t = fusion.snapshot(ctx.lora_params())
        self.outer_opt = None
        if self.options.outer_optimizer == "separate":
            params = list(ctx.lora_params().values())
            self.outer_opt = torch.optim.AdamW(params, lr=self.options.outer_lr)

    def after_step(self, ctx, record: dict) -> None:
        c = self.controller
        if c is None:
            return super().after_step(ctx, record)
        if ctx.step % self.options.probe_every:
            return
        loss = ctx.probe_loss(self.options.probe_mode, self.options.probe_batch_size)
        merge_now = c.observe(ctx.step, loss)
        record.update(history_loss=loss, threshold=c.threshold, activations=c.activations,
                      interval=c.interval, planned_step=c.planned_step)
        if merge_now:
            self.merge(ctx)
            record["merged"] = 1

    def merge(self, ctx) -> None:
        """Outer phase + fusion (spec §3), then the controller's interval update (§4)."""
        c = self.controller
        params = ctx.lora_params()
        w_in, w_out = c.fusion_weights()
        theta_k = fusion.snapshot(params)
        delta_in = fusion.delta(theta_k, self.theta_t)
        for _ in range(c.outer_steps):
            ctx.rehearsal_step(self.outer_opt, batch_size=self.options.rehearsal_batch_size)
            crash_point("merge")
        delta_out = fusion.delta(fusion.snapshot(params), theta_k)
        fused = fusion.weighted_fusion(self.theta_t, delta_in, delta_out, w_in, w_out)
        fusion.apply_(params, fused)
        self.theta_t = fused
        c.next_interval_after_merge(ctx.step, fusion.l1_norm(delta_in), weights=(w_in, w_out))
        event = c.events[-1].as_dict()
        event.pop("extra", None)
        ctx.log_merge(event)

    def state_dict(self) -> dict:
        if self.controller is None:
            return {}
        return {"controller": self.controller.state_dict(), "theta_t": self.theta_t,
                "outer_opt": None if self.outer_opt is None else self.outer_opt.state_dict()}

    def load_state_dict(self, state: dict, ctx) -> None:
        if not state:
            return
        self.controller = MergeController.from_state_dict(state["controller"])
        self.theta_t = state["theta_t"]
        if self.outer_opt is not None and state["outer_opt"] is not None:
            self.outer_opt.load_state_dict(state["outer_opt"])
