"""One task's optimiser steps and learning rate, as the release's HF ``Trainer`` (4.28.1) runs them.

Pure functions (no torch state), so the engine's loop stays small and each rule is tested against
a transcription of the release's code path (``tests/test_schedule.py``):

* :func:`trainer_max_steps`: ``max_steps = ceil(epochs * max(len(dataloader) // grad_accum, 1))``
  (``Trainer._inner_training_loop``); ``len(dataloader) = ceil(n / batch_size)`` (no drop_last).
* :func:`plan_optimizer_steps`: which micro-batches each optimiser step accumulates. The Trainer
  counts micro-batches across epochs and steps when that count is a multiple of ``grad_accum``
  (or at an epoch's last batch when an epoch has at most ``grad_accum`` batches), and stops after
  ``max_steps`` steps: a remainder batch at the end of an epoch is accumulated with the first
  batches of the next epoch, and the plan ends there (1000 examples at 8 x 4 for 10 epochs: 310
  steps, not 313).
* :func:`lr_lambda`: ``transformers.get_linear_schedule_with_warmup``'s factor. Step 0 (the first
  optimiser step) runs at ``lr * 0``, the peak is reached at ``step == warmup`` and the rate falls
  linearly to 0 at ``total``.
* :func:`warmup_for`: exactly ``warmup_steps`` (the release's 50); the optional
  ``max_warmup_fraction`` cap (off by default) is for short CPU runs only.

Data order is ours: every epoch is a fresh permutation from ``torch.Generator`` seeded by
``(seed, epoch)`` (the release shuffles with ``datasets`` and HF's ``RandomSampler``; the two
orders cannot be equal across libraries, see ``docs/fidelity.md``).
"""

from __future__ import annotations

import math

import torch

from aimm.errors import ConfigError

#: Most training-example passes (examples x epochs) one task may plan: far beyond any real run
#: (the release: 1000 x 10), so that a typo in ``epochs`` or a huge dataset is refused with a
#: line instead of building a plan that exhausts memory and never finishes.
MAX_EXAMPLE_PASSES = 10**8


def check_plan_size(n: int, epochs: float) -> None:
    """``ConfigError`` naming ``epochs`` when ``ceil(epochs)`` epochs of ``n`` examples exceed
    :data:`MAX_EXAMPLE_PASSES` (checked before anything is planned)."""
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs)):
        raise ConfigError(f"epochs={epochs!r}: must be a finite number")
    passes = max(1, math.ceil(epochs)) * n
    if passes > MAX_EXAMPLE_PASSES:
        raise ConfigError(
            f"epochs={epochs!r}: {n} training examples x {max(1, math.ceil(epochs)):g} epochs "
            f"exceed the limit of {MAX_EXAMPLE_PASSES:,} example passes in one task; "
            "lower epochs or max_train")


def trainer_max_steps(n_batches: int, grad_accum: int, epochs: float) -> int:
    """HF Trainer's number of optimiser steps for a dataloader of ``n_batches`` micro-batches."""
    return math.ceil(epochs * max(n_batches // grad_accum, 1))


def lr_lambda(warmup: int, total: int):
    """The factor of ``get_linear_schedule_with_warmup(optimizer, warmup, total)``.

    ``f(step)`` multiplies the peak lr for optimiser step ``step`` (0-based): ``step / warmup``
    during warmup (so the first step uses lr x 0), then ``(total - step) / (total - warmup)``.
    """

    def f(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))

    return f


def warmup_for(warmup_steps: int, max_warmup_fraction: float | None, total: int) -> int:
    """Warmup length: ``warmup_steps`` (release), or at most ``max_warmup_fraction * total``."""
    if max_warmup_fraction is None:
        return warmup_steps
    return min(warmup_steps, int(max_warmup_fraction * total))


def plan_micro_batches(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Micro-batches of example indices for ``ceil(epochs)`` epochs, shuffled per epoch.

    Every epoch is a permutation of ``range(n)`` cut into ``ceil(n / batch_size)`` batches (the
    last one smaller when ``batch_size`` does not divide ``n``).
    """
    check_plan_size(n, epochs)
    plan: list[list[int]] = []
    for epoch in range(max(1, math.ceil(epochs))):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        plan.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return plan


def step_groups(n_batches: int, grad_accum: int, epochs: float) -> list[list[int]]:
    """Positions (into the concatenated epochs' micro-batches) accumulated by each optimiser step.

    A transcription of the step condition of ``Trainer._inner_training_loop``::

        total_batched_samples += 1
        if total_batched_samples % grad_accum == 0 or (
                steps_in_epoch <= grad_accum and step + 1 == steps_in_epoch):
            optimizer step; global_step += 1          # training stops at max_steps
    """
    max_steps = trainer_max_steps(n_batches, grad_accum, epochs)
    groups: list[list[int]] = []
    pending: list[int] = []
    seen = 0
    for epoch in range(max(1, math.ceil(epochs))):
        for step in range(n_batches):
            pending.append(epoch * n_batches + step)
            seen += 1
            if seen % grad_accum == 0 or (n_batches <= grad_accum and step + 1 == n_batches):
                groups.append(pending)
                pending = []
                if len(groups) == max_steps:
                    return groups
    return groups


def plan_optimizer_steps(n: int, batch_size: int, grad_accum: int, epochs: float,
                         seed: int) -> list[list[list[int]]]:
    """The micro-batches (lists of example indices) of every optimiser step of a task."""
    micro = plan_micro_batches(n, batch_size, epochs, seed)
    n_batches = math.ceil(n / batch_size)
    return [[micro[i] for i in group] for group in step_groups(n_batches, grad_accum, epochs)]


__all__ = ["MAX_EXAMPLE_PASSES", "check_plan_size", "lr_lambda", "plan_micro_batches",
           "plan_optimizer_steps", "step_groups", "trainer_max_steps", "warmup_for"]
