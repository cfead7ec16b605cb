"""A-GEM: the update may not increase the loss on the memory buffer (to first order).

Averaged gradient episodic memory (Chaudhry et al. 2019, arXiv 1812.00420). Before every inner
optimiser step from the second task on, with ``g`` the step's gradient and ``g_ref`` the gradient
of the LM loss on a random batch of the memory buffer (earlier tasks' examples):

* constraint (their Eq. 10): ``gᵀ g_ref ≥ 0``;
* if it is violated, the projection (their Eq. 11)
  ``g̃ = g − (gᵀ g_ref / g_refᵀ g_ref) · g_ref``, so that ``g̃ᵀ g_ref = 0``
  (:func:`~aimm.methods.functional.agem_project`); otherwise ``g̃ = g``.

The step's trajectory record gets ``agem_projected`` (1: projected, 0: not). Cost per optimiser
step: one forward+backward on a memory batch (``reference_batch_size``, default the run's
``batch_size``) and two dot products over the LoRA gradients (one host read).

Differences from the paper: the episodic memory is the run's memory buffer (the release's
sampling of ``buffer_fraction`` of every earlier task, :func:`aimm.data.memory_buffers`), not a
ring buffer filled while training; the gradients are those of the LoRA weights, as one flat
vector; the projection acts on the accumulated (``grad_accum``) gradient before clipping at
``max_grad_norm`` (the optimiser is AdamW, not the paper's SGD); the reference forward runs in
the model's training mode (dropout as in training). With several processes the reference
gradient is the mean over ranks, so every rank projects the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aimm.errors import ConfigError
from aimm.loss import lm_loss
from aimm.methods import functional as fn
from aimm.methods.base import Method


@dataclass
class AGEMOptions:
    reference_batch_size: int | None = None  # memory examples per reference gradient (None: batch_size)

    def validate(self) -> None:
        n = self.reference_batch_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"reference_batch_size={n!r}: must be an integer >= 1 (or null: "
                              "the run's batch_size)")


class AGEM(Method):
    """A-GEM (Chaudhry et al. 2019): project the gradient when it conflicts with the memory's."""

    name = "agem"
    display_name = "A-GEM"
    color = "#44AA99"  # teal (Tol's muted palette)
    first_stage_as = "seq_lora"  # no memory gradient to project against before the second task
    Options = AGEMOptions
    uses_memory = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.projected: bool | None = None  # the last step's decision (None: no memory)

    def before_optimizer_step(self, ctx) -> None:
        self.projected = None
        if not ctx.has_memory:  # the first task: nothing to protect
            return
        params = {k: p for k, p in ctx.lora_params().items() if p.grad is not None}
        grads = {k: p.grad for k, p in params.items()}
        ref = reference_gradient(ctx, params, self.options.reference_batch_size or ctx.cfg.batch_size)
        new, self.projected = fn.agem_project(grads, ref)
        if self.projected:
            with torch.no_grad():
                for k, p in params.items():
                    p.grad.copy_(new[k])

    def after_step(self, ctx, record: dict[str, Any]) -> None:
        super().after_step(ctx, record)
        if self.projected is not None:
            record["agem_projected"] = int(self.projected)


def reference_gradient(ctx, params: dict[str, torch.nn.Parameter], batch_size: int) -> dict[str, torch.Tensor]:
    """The gradient of the LM loss on a random memory batch w.r.t. ``params`` (their ``.grad``
    untouched): ``torch.autograd.grad`` on the unwrapped model; mean over ranks."""
    model = ctx.accelerator.unwrap_model(ctx.model)
    loss = lm_loss(model, ctx.memory_batch(batch_size), ctx.is_seq2seq)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    ref = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}
    if ctx.accelerator.num_processes > 1:
        ref = {k: ctx.accelerator.reduce(v, reduction="mean") for k, v in ref.items()}
    return ref


__all__ = ["AGEM", "AGEMOptions", "reference_gradient"]
