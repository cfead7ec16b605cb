"""AIMMerging (Feng et al., EMNLP 2025) on the engine: spec §2-§4.

Task 1 is plain LoRA. From task 2 on, after every inner step a forgetting-signal probe (loss on a
memory batch) feeds the :class:`~aimm.merging.MergeController`; when it says "merge", the
shared sequence of :class:`~aimm.methods.inner_outer.InnerOuterMerging` runs ``outer_steps``
rehearsal steps on memory batches and this method fuses the inner and outer parameter changes
with the controller's weights. The math lives in ``aimm.merging``; this file supplies only
``should_merge`` and ``fuse``.

Options for the release's defects (spec §7), each defaulting to the release's behaviour:

* ``outer_optimizer``: ``shared`` (release: rehearsal steps use the inner AdamW and its lr,
  because the separate optimiser is never stepped) or ``separate`` (its own AdamW, ``outer_lr``).
* ``probe_mode``: ``train`` (release: dropout on while probing) or ``eval``.
* ``normalize_by``: ``planned`` (release: Lambda divides by the planned interval S) or
  ``actual`` (by the steps actually taken since the last merge).
* the buffer (``buffer_mode`` of the run config): ``official`` (uncapped) or ``capped``.

The controller parameters in :data:`CONTROLLER_OPTIONS` are top-level options with
:class:`~aimm.merging.ControllerConfig`'s defaults; its other fields go in ``controller``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from aimm.errors import ConfigError
from aimm.merging import ControllerConfig, MergeController
from aimm.merging.controller import MERGE_KINDS
from aimm.merging import fusion
from aimm.methods.inner_outer import InnerOuterMerging, OuterOptions
from aimm.util import did_you_mean, is_int

#: ControllerConfig fields that are top-level options (type and default from ControllerConfig)
CONTROLLER_OPTIONS = ("initial_interval", "min_interval", "max_interval", "cold_start",
                      "threshold_factor", "outer_ratio", "adaptive", "variant", "normalize_by")

ControllerOptions = make_dataclass(
    "ControllerOptions",
    [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(ControllerConfig)
     if f.name in CONTROLLER_OPTIONS])


@dataclass
class AIMMergingOptions(ControllerOptions, OuterOptions):
    probe_mode: str = "train"  # train (release) | eval
    probe_every: int = 1  # probe (and observe) every k-th inner step (release: 1)
    probe_batch_size: int | None = None  # None: the run's memory_batch_size (release: 32)
    rehearsal_batch_size: int | None = None  # None: the run's memory_batch_size (release: 32)
    fast: bool = False  # cheap signals: probe_every=2, probe batch = batch_size // 2,
    #                     rehearsal batch = batch_size (see README, "fast")
    controller: dict = field(default_factory=dict)  # further ControllerConfig fields

    def validate(self) -> None:
        super().validate()
        if self.probe_mode not in ("train", "eval"):
            raise ConfigError(f"probe_mode={self.probe_mode!r}: choose train or eval")
        if not (is_int(self.probe_every) and self.probe_every >= 1):
            raise ConfigError(f"probe_every={self.probe_every!r}: must be an integer >= 1")
        for name in ("probe_batch_size", "rehearsal_batch_size"):
            value = getattr(self, name)  # 0 is no "default": refused, not read as null
            if value is not None and not (is_int(value) and value >= 1):
                raise ConfigError(f"{name}={value!r}: must be an integer >= 1 (or null: the "
                                  "run's memory_batch_size)")
        try:
            self.make_controller()
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc

    def resolved(self, batch_size: int) -> "AIMMergingOptions":
        """Apply the ``fast`` preset (explicit values win)."""
        if not self.fast:
            return self
        return dataclasses.replace(self, fast=False,
                                   probe_every=self.probe_every if self.probe_every != 1 else 2,
                                   probe_batch_size=(max(1, batch_size // 2) if self.probe_batch_size
                                                     is None else self.probe_batch_size),
                                   rehearsal_batch_size=(batch_size if self.rehearsal_batch_size
                                                         is None else self.rehearsal_batch_size))

    def make_controller(self) -> MergeController:
        top = [name for name in self.controller if name in CONTROLLER_OPTIONS]
        if top:
            raise ConfigError(f"controller: {top[0]} is an option of its own; set it as "
                              f"{top[0]}=... (-o {top[0]}=...), not inside controller")
        names = [f.name for f in dataclasses.fields(ControllerConfig) if f.name not in CONTROLLER_OPTIONS]
        for key in self.controller:
            if key not in names:
                raise ConfigError(f"controller: unknown option '{key}'" + did_you_mean(key, names)
                                  + f"; controller options: {', '.join(names)}")
        return MergeController(ControllerConfig(
            **{name: getattr(self, name) for name in CONTROLLER_OPTIONS}, **self.controller))


class AIMMerging(InnerOuterMerging):
    name = "aimmerging"
    display_name = "AIMMerging"
    color = "#D55E00"  # vermillion
    first_stage_as = "seq_lora"  # no buffer, probe, rehearsal or merge before the second task
    Options = AIMMergingOptions
    smoke_options = {"initial_interval": 2}
    merge_kinds = MERGE_KINDS

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.controller: MergeController | None = None

    @property
    def rehearsal_batch_size(self) -> int | None:
        return self.options.rehearsal_batch_size

    # one controller per task (spec §4b), fresh at every stage
    def on_stage_start(self, ctx) -> None:
        self.controller = None
        super().on_stage_start(ctx)

    def start_task(self, ctx) -> None:
        self.options = self.options.resolved(ctx.cfg.batch_size)
        self.controller = self.options.make_controller()

    def should_merge(self, ctx, record: dict) -> bool:
        c = self.controller
        if ctx.step % self.options.probe_every:
            return False
        loss = ctx.forgetting_signal(self.options.probe_mode, self.options.probe_batch_size)
        merge_now = c.observe(ctx.step, loss)
        record.update(forgetting_signal=loss, threshold=c.threshold, activations=c.activations,
                      interval=c.interval, planned_step=c.planned_step)
        return merge_now

    def outer_steps(self) -> int:
        return self.controller.outer_steps

    def fuse(self, ctx, delta_in, delta_out):
        """The controller's weights (spec §3), then its interval update (§4) and event."""
        c = self.controller
        w_in, w_out = c.fusion_weights()
        fused = fusion.weighted_fusion(self.theta_t, delta_in, delta_out, w_in, w_out)
        c.next_interval_after_merge(ctx.step, fusion.l1_norm(delta_in), weights=(w_in, w_out))
        event = c.events[-1].as_dict()
        event.pop("extra", None)
        return fused, event

    def task_state(self) -> dict:
        return {"controller": self.controller.state_dict()}

    def load_task_state(self, state: dict) -> None:
        self.controller = MergeController.from_state_dict(state["controller"])
