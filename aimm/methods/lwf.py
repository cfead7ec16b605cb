"""LwF: distil the previous stage's adapter on the current task's inputs.

Learning without forgetting (Li & Hoiem 2016, arXiv 1606.09282). From the second task on, every
inner micro-batch loss is (their Eq. for the total loss, ``λ_o`` the loss balance weight)::

    L = CE(y, ŷ) + λ_o · T² · KL( softmax(z_old / T) ‖ softmax(z / T) )

over the target positions of the current task's batch (the tokens the LM loss is taken on):
``z`` the current model's logits, ``z_old`` those of the teacher, the adapter as it was at the
end of the previous stage (:func:`~aimm.methods.functional.lwf_loss`; the KL has the same gradient
as the paper's cross-entropy to the soft targets, Hinton et al.'s ``T²`` keeps its scale free of
T). Defaults: ``temperature`` T = 2 (the paper; EasyCL's ``lwf_temperature``), ``weight``
λ_o = 1 (the paper: "λ_o ... set to 1 for most our experiments"; EasyCL's convex
``(1 − α)·CE + α·KD`` with α = 0.5 is the same 1:1 balance, halved).

The teacher is the same model with the previous stage's LoRA tensors copied into the adapter for
one no-grad forward (dropout off) and the student's copied back: no second copy of the base
model. Extra cost: one forward per micro-batch (no backward) and two copies of the LoRA weights.

Differences from the paper: one shared LM head instead of task-specific heads (the "old task
outputs" are the old model's next-token distributions on the new task's target positions);
the teacher's outputs are computed on the fly from its stored adapter instead of recorded once
before training (the same values: the teacher is frozen and runs without dropout); no warm-up
phase that trains the new head alone. Cross-stage state: the teacher's LoRA tensors.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from aimm.encoding import IGNORE_INDEX
from aimm.errors import ConfigError
from aimm.loss import target_logits, token_cross_entropy
from aimm.methods import functional as fn
from aimm.methods.base import Method


@dataclass
class LwFOptions:
    temperature: float = fn.LWF_TEMPERATURE  # T (the paper: 2)
    weight: float = 1.0  # λ_o: weight of the distillation term (the paper: 1)

    def validate(self) -> None:
        for name, low_ok in (("temperature", False), ("weight", True)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (v == 0 and not low_ok):
                raise ConfigError(f"{name}={v!r}: must be a finite number "
                                  + (">= 0" if low_ok else "> 0"))


class LwF(Method):
    """LwF (Li & Hoiem 2016): distil the previous stage's adapter on the new task (KL, temperature T)."""

    name = "lwf"
    display_name = "LwF"
    color = "#999933"  # olive (Tol's muted palette)
    Options = LwFOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.teacher: dict[str, torch.Tensor] | None = None  # LoRA tensors at the last stage's end

    def inner_loss(self, ctx, batch: dict) -> torch.Tensor:
        if self.teacher is None:  # the first task: plain LoRA
            return super().inner_loss(ctx, batch)
        ce, kd = self.losses(ctx, batch)
        loss = ce + self.options.weight * kd
        extra = self.extra_loss(ctx, batch)
        return loss if extra is None else loss + extra

    def losses(self, ctx, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CE on the targets, the distillation term)`` of one micro-batch (needs a teacher)."""
        teacher_logits = self.teacher_logits(ctx, batch)
        logits, targets = target_logits(ctx.model, batch, ctx.is_seq2seq)
        kd = fn.lwf_loss(logits, teacher_logits, targets != IGNORE_INDEX, self.options.temperature)
        return token_cross_entropy(logits, targets), kd

    @torch.no_grad()
    def teacher_logits(self, ctx, batch: dict) -> torch.Tensor:
        """The teacher's logits on the target positions: its adapter swapped in, dropout off."""
        model = ctx.model
        was_training = model.training
        with swapped_weights(ctx.lora_params(), self.teacher):
            model.eval()
            try:
                logits, _ = target_logits(model, batch, ctx.is_seq2seq)
            finally:
                model.train(was_training)
        return logits

    def on_stage_end(self, ctx) -> None:
        """The adapter as this stage leaves it (and as it is evaluated) teaches the next stage."""
        self.teacher = {k: p.detach().clone() for k, p in ctx.lora_params().items()}

    # ---------------------------------------------------------------- across stages
    def stage_state(self) -> dict[str, Any] | None:
        if self.teacher is None:
            return None
        return {"teacher": {k: v.cpu() for k, v in self.teacher.items()}}

    def load_stage_state(self, state: dict[str, Any], model: torch.nn.Module) -> None:
        device = next(model.parameters()).device
        self.teacher = {k: v.to(device) for k, v in state["teacher"].items()}


@contextlib.contextmanager
def swapped_weights(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """``tensors`` copied into ``params`` for the ``with`` block, the old values back after it."""
    missing = set(params) - set(tensors)
    if missing:
        raise ValueError(f"teacher adapter lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        saved = {k: p.detach().clone() for k, p in params.items()}
        for k, p in params.items():
            p.copy_(tensors[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])


__all__ = ["LwF", "LwFOptions", "swapped_weights"]
