"""Recurrent-KIF (ACL 2025), the predecessor baseline: spec §3.

Same inner/outer loop as AIMMerging but merges at a FIXED interval and fuses with importance
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

from dataclasses import dataclass
from typing import Any

import torch

from aimm.errors import ConfigError
from aimm.merging import fusion
from aimm.methods.base import Method


@dataclass
class RecurrentKIFOptions:
    interval: int = 8
    outer_ratio: float = 1.0
    top_fraction: float = 0.2
    beta1: float = 0.85
    beta2: float = 0.85
    mask_scope: str = "global"  # global | per_tensor
    outer_optimizer: str = "shared"
    outer_lr: float = 1e-3
    empty_inner_score: bool = True  # release scripts: --empty_inner_score_flag=1
    empty_outer_score: bool = False  # release default: empty_outer_score_flag=0

    def validate(self) -> None:
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise ConfigError(f"interval={self.interval!r}: must be an integer >= 1")
        if not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction={self.top_fraction!r}: must be in (0, 1]")
        if self.mask_scope not in ("global", "per_tensor"):
            raise ConfigError(f"mask_scope={self.mask_scope!r}: choose global or per_tensor")
        if self.outer_optimizer not in ("shared", "separate"):
            raise ConfigError(f"outer_optimizer={self.outer_optimizer!r}: choose shared or separate")
        for name in ("empty_inner_score", "empty_outer_score"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be true or false")


class RecurrentKIF(Method):
    name = "recurrent_kif"
    display_name = "Recurrent-KIF"
    color = "#E69F00"  # orange
    Options = RecurrentKIFOptions
    uses_memory = True
    merges = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.active = False
        self.theta_t = None
        self.ipt_in = self.ipt_out = None
        self.outer_opt = None
        self.last_merge = 0

    def on_stage_start(self, ctx) -> None:
        self.active = ctx.has_memory
        if not self.active:
            return
        self.theta_t = fusion.snapshot(ctx.lora_params())
        self.ipt_in = self.ipt_out = None
        self.last_merge = 0
        self.outer_opt = None
        if self.options.outer_optimizer == "separate":
            self.outer_opt = torch.optim.AdamW(list(ctx.lora_params().values()),
                                               lr=self.options.outer_lr)

    def _update(self, state, ctx):
        params = ctx.lora_params()
        grads = {k: p.grad for k, p in params.items()}
        return fusion.update_importance(state, params, grads, self.options.beta1, self.options.beta2)

    def after_optimizer_step(self, ctx) -> None:
        if self.active:
            self.ipt_in = self._update(self.ipt_in, ctx)

    def after_step(self, ctx, record: dict) -> None:
        if not self.active:
            return super().after_step(ctx, record)
        if ctx.cfg.probe_history:
            record["history_loss"] = ctx.probe_loss()
        record["interval"] = self.options.interval
        if ctx.step - self.last_merge < self.options.interval:
            return
        o = self.options
        params = ctx.lora_params()
        theta_k = fusion.snapshot(params)
        delta_in = fusion.delta(theta_k, self.theta_t)
        outer = int(o.interval * o.outer_ratio)
        for _ in range(outer):
            ctx.rehearsal_step(self.outer_opt, on_grads=self._outer_grads)
        delta_out = fusion.delta(fusion.snapshot(params), theta_k)
        mask_in = fusion.top_mask(fusion.importance_scores(self.ipt_in), o.top_fraction, scope=o.mask_scope)
        if self.ipt_out is None:  # no rehearsal steps: nothing important on the outer side
            mask_out = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in mask_in.items()}
        else:
            mask_out = fusion.top_mask(fusion.importance_scores(self.ipt_out), o.top_fraction, scope=o.mask_scope)
        fused = fusion.mask_fusion(self.theta_t, delta_in, delta_out, mask_in, mask_out)
        fusion.apply_(params, fused)
        self.theta_t = fused
        if o.empty_inner_score:
            self.ipt_in = None
        if o.empty_outer_score:
            self.ipt_out = None
        ctx.log_merge({"step": ctx.step, "interval_before": o.interval, "interval_after": o.interval,
                       "outer_steps": outer, "l1": fusion.l1_norm(delta_in), "kind": "fixed",
                       "mask_in_share": _share(mask_in), "mask_out_share": _share(mask_out)})
        self.last_merge = ctx.step
        record["merged"] = 1

    def state_dict(self) -> dict:
        if not self.active:
            return {}
        return {"theta_t": self.theta_t, "ipt_in": self.ipt_in, "ipt_out": self.ipt_out,
                "last_merge": self.last_merge,
                "outer_opt": None if self.outer_opt is None else self.outer_opt.state_dict()}

    def load_state_dict(self, state: dict, ctx) -> None:
        if not state:
            return
        self.theta_t, self.ipt_in, self.ipt_out = state["theta_t"], state["ipt_in"], state["ipt_out"]
        self.last_merge = state["last_merge"]
        if self.outer_opt is not None and state["outer_opt"] is not None:
            self.outer_opt.load_state_dict(state["outer_opt"])

    def _outer_grads(self, ctx) -> None:
        self.ipt_out = self._update(self.ipt_out, ctx)


def _share(masks: dict) -> float:
    return fusion.mask_share(masks)  # over all shards under FSDP
