"""Recurrent-KIF (ACL 2025), the predecessor baseline: spec §3.

Same inner/outer loop as AIMMerging (:class:`~aimm.methods.inner_outer.InnerOuterMerging`) but
merges at a FIXED interval and fuses with importance
masks: AdaLoRA-style importance EMAs of the inner (new-task) and outer (rehearsal) gradients,
top-20% masks, element-wise weights (both important -> (0.4, 0.6), neither -> (0.5, 0.5),
only one -> that update kept whole: our reading of the release, see ``aimm.merging.fusion``).

As the release's trainer: both EMAs are updated after clipping and the optimiser step, from the
clipped gradients and the updated weights (inner: every inner step; outer: every rehearsal step).
``empty_inner_score`` (default on, as the shipped scripts' ``--empty_inner_score_flag=1``) clears
the inner EMA after every merge; ``empty_outer_score`` (default off, the release's default)
clears the outer one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from aimm.errors import ConfigError
from aimm.merging import fusion
from aimm.methods.inner_outer import InnerOuterMerging, OuterOptions
from aimm.util import is_num


@dataclass
class RecurrentKIFOptions(OuterOptions):
    interval: int = 8
    outer_ratio: float = 1.0
    top_fraction: float = 0.2
    beta1: float = 0.85
    beta2: float = 0.85
    mask_scope: str = "global"  # global | per_tensor
    empty_inner_score: bool = True  # release scripts: --empty_inner_score_flag=1
    empty_outer_score: bool = False  # release default: empty_outer_score_flag=0

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise ConfigError(f"interval={self.interval!r}: must be an integer >= 1")
        if not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction={self.top_fraction!r}: must be in (0, 1]")
        for name in ("beta1", "beta2"):  # the importance EMAs' factors (the release asserts it)
            value = getattr(self, name)
            if not (is_num(value) and 0 < value < 1):
                raise ConfigError(f"{name}={value!r}: must be a number in (0, 1), e.g. 0.85 "
                                  "(the release's)")
        if not (is_num(self.outer_ratio) and math.isfinite(self.outer_ratio) and self.outer_ratio >= 0):
            raise ConfigError(f"outer_ratio={self.outer_ratio!r}: must be a finite number >= 0 "
                              "(rehearsal steps per merge = int(interval * outer_ratio); 0: none)")
        if self.mask_scope not in ("global", "per_tensor"):
            raise ConfigError(f"mask_scope={self.mask_scope!r}: choose global or per_tensor")
        for name in ("empty_inner_score", "empty_outer_score"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be true or false")


class RecurrentKIF(InnerOuterMerging):
    name = "recurrent_kif"
    display_name = "Recurrent-KIF"
    color = "#E69F00"  # orange
    first_stage_as = "seq_lora"  # no buffer, rehearsal or fusion before the second task
    Options = RecurrentKIFOptions
    merge_kinds = ("fixed",)  # one merge every `interval` steps

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.ipt_in = self.ipt_out = None
        self.last_merge = 0

    def start_task(self, ctx) -> None:
        self.ipt_in = self.ipt_out = None
        self.last_merge = 0

    def _update(self, state, ctx):
        params = ctx.lora_params()
        grads = {k: p.grad for k, p in params.items()}
        return fusion.update_importance(state, params, grads, self.options.beta1, self.options.beta2)

    def after_optimizer_step(self, ctx) -> None:
        if self.active:
            self.ipt_in = self._update(self.ipt_in, ctx)

    def after_rehearsal_step(self, ctx) -> None:
        self.ipt_out = self._update(self.ipt_out, ctx)

    def should_merge(self, ctx, record: dict) -> bool:
        if ctx.cfg.record_forgetting_signal:
            record["forgetting_signal"] = ctx.recorded_forgetting_signal()
        record["interval"] = self.options.interval
        return ctx.step - self.last_merge >= self.options.interval

    def outer_steps(self) -> int:
        return int(self.options.interval * self.options.outer_ratio)

    def fuse(self, ctx, delta_in, delta_out):
        """Top-``top_fraction`` importance masks of both sides, then the element-wise weights."""
        o = self.options
        mask_in = fusion.top_mask(fusion.importance_scores(self.ipt_in), o.top_fraction, scope=o.mask_scope)
        if self.ipt_out is None:  # no rehearsal steps: nothing important on the outer side
            mask_out = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in mask_in.items()}
        else:
            mask_out = fusion.top_mask(fusion.importance_scores(self.ipt_out), o.top_fraction, scope=o.mask_scope)
        fused = fusion.mask_fusion(self.theta_t, delta_in, delta_out, mask_in, mask_out)
        if o.empty_inner_score:
            self.ipt_in = None
        if o.empty_outer_score:
            self.ipt_out = None
        self.last_merge = ctx.step
        return fused, {"step": ctx.step, "interval_before": o.interval, "interval_after": o.interval,
                       "outer_steps": self.outer_steps(), "l1": fusion.l1_norm(delta_in),
                       "kind": "fixed", "mask_in_share": _share(mask_in),
                       "mask_out_share": _share(mask_out)}

    def task_state(self) -> dict:
        return {"ipt_in": self.ipt_in, "ipt_out": self.ipt_out, "last_merge": self.last_merge}

    def load_task_state(self, state: dict) -> None:
        self.ipt_in, self.ipt_out = state["ipt_in"], state["ipt_out"]
        self.last_merge = state["last_merge"]


def _share(masks: dict) -> float:
    return fusion.mask_share(masks)  # over all shards under FSDP
