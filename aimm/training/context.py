"""What a method programs against: :class:`Stage`, :class:`TrainContext`, the callbacks.

A method (:class:`aimm.methods.base.Method`) gets a :class:`TrainContext` in every hook: the model,
the inner optimiser and scheduler, the memory buffer, the forgetting-signal probe, rehearsal
steps and the stage's trajectory. Rehearsal steps go through the same
:func:`aimm.training.loop.optimizer_step` as the inner steps.

Callbacks (the protocol of :func:`notify`) are objects with any of ``on_step(record)``,
``on_merge(event)`` and ``on_stage_end(stage, score_rows)``; a live plot or a tracker is one.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from aimm.encoding import EncodedExamples, TruncationCounter
from aimm.loss import lm_loss
from aimm.training.loop import optimizer_step

CALLBACK_HOOKS = ("on_step", "on_merge", "on_stage_end")


@dataclass(frozen=True)
class Stage:
    """One training phase: train on ``train_tasks``, then evaluate ``eval_tasks``."""

    index: int
    name: str
    train_tasks: tuple[str, ...]
    eval_tasks: tuple[str, ...]


def notify(callbacks: list, hook: str, *args: Any) -> None:
    """Call ``hook`` (one of :data:`CALLBACK_HOOKS`) on every callback that has it."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


@dataclass
class TrainContext:
    """What a method may use during a stage."""

    cfg: Any  # the run's RunConfig
    model: torch.nn.Module
    tokenizer: Any
    is_seq2seq: bool
    accelerator: Any
    data: dict
    stage: Stage
    optimizer: Any = None
    scheduler: Any = None
    step: int = 0  # inner optimiser steps done in this stage
    total_steps: int = 0
    memory_examples: list = field(default_factory=list)
    memory_ids: list[dict] = field(default_factory=list)  # [{"task", "id"}] in buffer order
    memory: EncodedExamples | None = None
    memory_rng: random.Random = field(default_factory=random.Random)
    steps: list[dict] = field(default_factory=list)  # trajectory records of this stage
    merges: list[dict] = field(default_factory=list)
    callbacks: list = field(default_factory=list)
    nonfinite: int = 0
    rank_checksums: list = field(default_factory=list)  # sum of LoRA weights on every rank
    resumed_at: int = 0  # step a within-stage checkpoint resumed from (timings then partial)
    timers: dict = field(default_factory=lambda: {"train": 0.0, "probe": 0.0, "rehearsal": 0.0,
                                                  "eval": 0.0})
    warnings: list[str] = field(default_factory=list)
    counter: TruncationCounter = field(default_factory=TruncationCounter)
    optimizer_steps: int = 0  # inner + outer, for overhead accounting

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def has_memory(self) -> bool:
        return self.memory is not None and len(self.memory) > 0

    def lora_params(self) -> dict[str, torch.nn.Parameter]:
        from aimm.models import lora_parameters

        return lora_parameters(self.model)

    def to_device(self, batch: dict) -> dict:
        """Tensors to the device (non-blocking); host values (``logits_to_keep``) stay."""
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def memory_batch(self, size: int | None = None,
                     rng: random.Random | None = None) -> dict[str, torch.Tensor]:
        """A random batch (default ``memory_batch_size``) of the memory buffer, on the device,
        drawn with ``rng`` (default: the stage's ``memory_rng``)."""
        if not self.has_memory:
            raise RuntimeError("memory_batch() called without a memory buffer")
        k = min(size or self.cfg.memory_batch_size, len(self.memory))
        indices = (rng or self.memory_rng).sample(range(len(self.memory)), k)
        return self.to_device(self.memory.batch(indices))

    def forgetting_signal(self, mode: str = "train", batch_size: int | None = None,
                          rng: random.Random | None = None) -> float:
        """Forgetting signal: one no-grad forward on a random memory batch (spec §2).

        ``mode="train"`` keeps dropout on, as the release does; ``"eval"`` turns it off. Under
        several processes every rank probes the same batch and rank 0's value is used by all,
        so every rank takes the same merge decision. The batch is drawn with ``rng`` (default:
        the stage's ``memory_rng``, which rehearsal steps and A-GEM draw from too).
        """
        start = time.perf_counter()
        batch = self.memory_batch(batch_size, rng)
        was_training = self.model.training
        self.model.train(mode == "train")
        with torch.inference_mode():
            loss = lm_loss(self.model, batch, self.is_seq2seq)
        self.model.train(was_training)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            loss = broadcast(loss.detach().clone().reshape(1), from_process=0)[0]
        value = float(loss)
        self.timers["probe"] += time.perf_counter() - start
        return value

    def recorded_forgetting_signal(self) -> float:
        """The forgetting signal as an observation only (``record_forgetting_signal`` for a
        method whose training does not use it): the same probe, but training is the same with or
        without it. Its memory batch comes from a stream of its own, keyed by the run's seed,
        the stage and the step (so a resumed stage draws the same batches, with no state to
        checkpoint), and the global torch RNG that dropout draws from is left as it was."""
        from aimm.models import rng_untouched

        rng = random.Random(f"recorded-forgetting-signal:{self.cfg.seed}:{self.stage.index}:"
                            f"{self.step}")
        with rng_untouched():
            return self.forgetting_signal(rng=rng)

    def rehearsal_step(self, optimizer=None, on_grads: Callable[["TrainContext"], None] | None = None,
                       batch_size: int | None = None) -> torch.Tensor:
        """One outer optimiser step on a random memory batch (no scheduler step, spec §4b).

        As the release's outer step (HF ``training_step`` then clipping then ``optimizer.step``):
        the loss is divided by ``grad_accum`` before backward, then
        :func:`~aimm.training.loop.optimizer_step` clips at ``max_grad_norm`` and steps
        ``optimizer`` at its current lr. ``optimizer`` defaults to the inner one (the release's
        behaviour; its lr is the schedule's current value, the scheduler is not stepped).
        ``on_grads(ctx)`` is called after clipping and the step, before the gradients are
        cleared: it sees the clipped gradients and the updated weights (where the release updates
        its outer importance EMA). Returns the detached raw (unscaled) loss as a 0-dim tensor:
        nothing is read back from the device, so rehearsal steps queue up.
        """
        start = time.perf_counter()
        loss = lm_loss(self.model, self.memory_batch(batch_size), self.is_seq2seq)
        self.accelerator.backward(loss / self.cfg.grad_accum)
        optimizer_step(self, optimizer or self.optimizer, after=on_grads)
        self.timers["rehearsal"] += time.perf_counter() - start
        return loss.detach()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def notify(self, hook: str, *args: Any) -> None:
        """Tell the callbacks (main process only; see :func:`notify`)."""
        notify(self.callbacks, hook, *args)

    def log_merge(self, event: dict[str, Any]) -> None:
        event = {"task": self.stage.name, "stage": self.stage.index, **event}
        self.merges.append(event)
        self.notify("on_merge", event)


__all__ = ["CALLBACK_HOOKS", "Stage", "TrainContext", "notify"]
