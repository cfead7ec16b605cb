"""One stage's inner loop: micro-batches -> one optimiser step, the NaN policy, checkpoints.

Steps like the release's HF Trainer 4.28.1 (see :mod:`aimm.schedule`): every micro-batch loss is
divided by ``grad_accum`` before backward (Trainer's ``training_step``), then
:func:`optimizer_step` clips at ``max_grad_norm``, steps the optimiser and (inner steps only) the
scheduler. Rehearsal steps (:meth:`aimm.training.context.TrainContext.rehearsal_step`) use the
same :func:`optimizer_step`, without a scheduler step and without the method's
``before_optimizer_step``.

The NaN policy: a step whose loss is not finite is never applied. ``nan_policy="stop"`` raises
:class:`NonFiniteLossError` before the update (the run dir keeps the completed stages and the last
within-stage checkpoint); ``"skip"`` drops the step (its scheduler step still counts) and records
``skipped=1``. Within-stage checkpoints are written every ``checkpoint_every`` steps and after the
stage's last step, and restored after ``on_stage_start``.

This module imports nothing from :mod:`aimm.training.context` or :mod:`aimm.methods` (the context
imports :func:`optimizer_step` from here, and the methods import the context): ``TrainContext``
and ``Method`` in the annotations below are names for the reader, not imports.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from aimm.faults import crash_point
from aimm.util import error_summary

TrainContext = Any  # aimm.training.context.TrainContext (not imported: it imports this module)
Method = Any  # aimm.methods.base.Method (not imported: methods import the context)
Hook = Callable[["TrainContext"], None]


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf training loss under ``nan_policy='stop'``."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def optimizer_step(ctx: "TrainContext", optimizer, *, scheduler=None, before: Hook | None = None,
                   after: Hook | None = None) -> None:
    """The one optimiser step of inner and rehearsal steps, on gradients already accumulated.

    ``before(ctx)`` (gradients live, unclipped) -> clip at ``max_grad_norm`` -> ``optimizer.step()``
    -> ``scheduler.step()`` when given (inner steps only) -> ``after(ctx)`` (clipped gradients and
    updated weights) -> gradients cleared; counts the step in ``ctx.optimizer_steps``.
    """
    if before is not None:
        before(ctx)
    if ctx.cfg.max_grad_norm:
        ctx.accelerator.clip_grad_norm_(ctx.model.parameters(), ctx.cfg.max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if after is not None:
        after(ctx)
    optimizer.zero_grad(set_to_none=True)
    ctx.optimizer_steps += 1


def train_stage(ctx: "TrainContext", method: "Method", train, plan: list[list[list[int]]], *,
                global_offset: int, ckpt_path: Path, run_dir: Path, desc: str,
                loss_hook: Callable | None = None) -> None:
    """Run the stage's inner steps from ``ctx.step`` (a restored checkpoint) to the end of
    ``plan``, then ``method.on_stage_end(ctx)``; ``ctx`` collects the trajectory."""
    cfg, accelerator, optimizer, scheduler = ctx.cfg, ctx.accelerator, ctx.optimizer, ctx.scheduler
    total = len(plan)
    ctx.model.train()
    bar = progress_bar(total, desc, cfg.progress and accelerator.is_main_process)
    bar.update(ctx.step)
    started = time.perf_counter()
    for step_index in range(ctx.step, total):
        losses = []
        for micro in plan[step_index]:
            local = shard(micro, accelerator)
            batch = ctx.to_device(train.batch(local))
            loss = method.inner_loss(ctx, batch)
            if accelerator.num_processes > 1:  # the one-process token mean, see rank_share
                loss = loss * rank_share(train.target_ids, micro, local, accelerator.num_processes)
            if loss_hook is not None:
                loss = loss_hook(ctx, loss)
            losses.append(loss.detach())
            accelerator.backward(loss / cfg.grad_accum)  # HF training_step's scaling
        # the one host read of an inner step: the NaN policy must see the loss before the
        # update, and the trajectory records it (the probe, when a method probes, is the other)
        step_loss = float(mean_over_ranks(torch.stack(losses).mean(), accelerator))
        lr = ctx.current_lr()  # the lr optimizer.step() applies below
        ctx.step = step_index + 1
        record = {"task": ctx.stage.name, "stage": ctx.stage.index, "step": ctx.step,
                  "global_step": global_offset + ctx.step, "loss": step_loss, "lr": lr}
        if not math.isfinite(step_loss):
            ctx.nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            if cfg.nan_policy == "stop":
                bar.close()
                raise NonFiniteLossError(
                    f"stage {ctx.stage.name} step {ctx.step}: training loss is {step_loss}; run "
                    f"stopped before the update. {run_dir} keeps the completed stages"
                    + (" and the last within-stage checkpoint" if cfg.checkpoint_every else "")
                    + " intact (nan_policy='skip' skips such steps instead)")
            record["skipped"] = 1
            scheduler.step()
        else:
            optimizer_step(ctx, optimizer, scheduler=scheduler, before=method.before_optimizer_step,
                           after=method.after_optimizer_step)
            method.after_step(ctx, record)
            release_scale(record, cfg.grad_accum)
        ctx.steps.append(record)
        crash_point("train_step")
        ctx.notify("on_step", record)
        bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
        bar.update(1)
        if cfg.checkpoint_every and (ctx.step % cfg.checkpoint_every == 0 or ctx.step == total):
            save_checkpoint(ckpt_path, ctx, method)
    bar.close()
    method.on_stage_end(ctx)  # may change the model: before the adapter check and evaluation
    ctx.timers["train"] = time.perf_counter() - started
    if ctx.nonfinite:
        ctx.warnings.append(f"stage {ctx.stage.name}: skipped {ctx.nonfinite} steps with a non-finite loss")


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, ctx: "TrainContext", method: "Method") -> None:
    from aimm.checkpoint import capture_rng, save_checkpoint as write
    from aimm.models import lora_state_dict

    if not ctx.accelerator.is_main_process:
        return
    write(path, {
        "stage": ctx.stage.index, "step": ctx.step, "lora": lora_state_dict(ctx.model),
        "optimizer": ctx.optimizer.state_dict(), "scheduler": ctx.scheduler.state_dict(),
        "rng": capture_rng(ctx.memory_rng), "method": method.state_dict(),
        "steps": ctx.steps, "merges": ctx.merges, "optimizer_steps": ctx.optimizer_steps,
        "nonfinite": ctx.nonfinite})


def restore_checkpoint(path: Path, ctx: "TrainContext", method: "Method",
                       on_problem: Callable[[str], None]) -> int:
    """Continue a stage from its checkpoint (after ``on_stage_start``); returns the steps done.

    The checkpoint is checked against the stage before anything is restored
    (:func:`aimm.checkpoint.payload_problem`: the model's LoRA shapes, a step within the stage's
    plan, the optimiser's and scheduler's state structure, RNG states the generators accept); one
    that fails is reported through ``on_problem`` and ignored, and the stage restarts from its
    beginning. A restore that still fails half-way (a method or the optimiser refusing its state)
    cannot be undone without copies of the whole training state (a full fine-tune's model), so
    it stops the run with :class:`aimm.checkpoint.CheckpointError` (one line, exit 2) naming the
    file and the fix: delete it, and the stage restarts from its beginning.
    """
    from aimm.checkpoint import CheckpointError, load_checkpoint, restore_rng
    from aimm.models import load_lora_state_dict, lora_state_dict

    if not ctx.cfg.checkpoint_every:
        return 0
    ckpt = load_checkpoint(path, on_problem, like=lora_state_dict(ctx.model), stage=ctx.stage.index,
                           total_steps=ctx.total_steps, optimizer=ctx.optimizer,
                           scheduler=ctx.scheduler)
    if ckpt is None:
        return 0
    try:
        load_lora_state_dict(ctx.model, ckpt["lora"])
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
        ctx.scheduler.load_state_dict(ckpt["scheduler"])
        method.load_state_dict(ckpt["method"], ctx)
        restore_rng(ckpt["rng"], ctx.memory_rng)
    except Exception as exc:  # whatever a loader raises, half-way through the restore
        raise CheckpointError(f"{path}: within-stage checkpoint refused half-way through its "
                              f"restore ({error_summary(exc)}); delete the file and run again: the "
                              "stage restarts from its beginning") from None
    ctx.steps, ctx.merges = list(ckpt["steps"]), list(ckpt["merges"])
    ctx.optimizer_steps, ctx.nonfinite = ckpt["optimizer_steps"], ckpt["nonfinite"]
    ctx.step = ctx.resumed_at = ckpt["step"]
    return ctx.step


# ------------------------------------------------------------------------------ helpers
def release_scale(record: dict, grad_accum: int) -> None:
    """Add the release's scale of the forgetting signal (and threshold) beside the raw values.

    The release's probe (``Trainer.training_step_no_grad``) returns ``loss / grad_accum`` (loss / 4
    at its 8 x 4), and its threshold is a mean of those values times the factor; the paper's
    figures plot that scale. Merge decisions are the same on either scale (exact scaling).
    """
    for name in ("forgetting_signal", "threshold"):
        value = record.get(name)
        if value is not None:
            record[f"{name}_release"] = value / grad_accum


def shard(indices: list[int], accelerator) -> list[int]:
    """This rank's share of a micro-batch (data parallel: ranks split every batch)."""
    n = accelerator.num_processes
    return indices if n == 1 else indices[accelerator.process_index :: n]


def rank_share(target_ids: list, micro: list[int], local: list[int], ranks: int) -> float:
    """``ranks`` x this rank's share of the micro-batch's target tokens.

    The loss is a mean over target tokens and data parallelism averages the ranks' gradients, so
    with unequal token counts per rank (targets of different lengths) the plain per-rank mean
    would weight tokens differently than one process on the whole batch; scaling each rank's
    loss by this factor makes the averaged gradient (and the mean logged loss) equal the
    one-process token mean.
    """
    tokens = lambda idx: sum(len(target_ids[i]) for i in idx)  # noqa: E731
    return ranks * tokens(local) / max(1, tokens(micro))


def mean_over_ranks(value: torch.Tensor, accelerator) -> torch.Tensor:
    """The loss every rank logs and checks for NaN is the same: the mean over ranks."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.reshape(1).clone(), reduction="mean")[0]


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a: Any, **k: Any) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


__all__ = ["NonFiniteLossError", "optimizer_step", "progress_bar", "release_scale",
           "restore_checkpoint", "save_checkpoint", "seed_everything", "train_stage"]
