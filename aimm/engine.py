"""The training engine: stages -> inner optimiser steps -> evaluation -> run store.

The loop is ours (no Trainer) but steps like the release's HF Trainer 4.28.1 (see
:mod:`aimm.schedule`): AdamW, ``get_linear_schedule_with_warmup`` restarting at every stage
(first step at lr x 0), Trainer's ``max_steps`` and its accumulation of micro-batches across
epochs (each micro-batch loss divided by ``grad_accum``), clipping at ``max_grad_norm``, seeds,
on ``accelerate``. Methods plug in through the hooks of
:class:`aimm.methods.base.Method`; they get a :class:`TrainContext` with what they may touch
(model, optimiser, memory buffer, probes, rehearsal steps, trajectory).

Determinism and resume: every stage re-seeds from ``(seed, stage index)`` and the data order of
a stage is planned up front from its own generator, so a run resumed after stage k (its adapter
reloaded from the run dir) continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time

import warnings as pywarnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aimm.config import RunConfig
from aimm.encoding import EncodedExamples, TruncationCounter
from aimm.faults import crash_point
from aimm.integrity import (
    check_run_data,
    record_stage_files,
    require_finite_adapter,
    rewind_run,
    verify_for_resume,
)
from aimm.loss import lm_loss
from aimm.merging import reduce
from aimm.methods import Method, Stage, build_method
from aimm.runs import (
    RunDirError,
    RunStore,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_jsonl,
    environment_info,
    new_run_id,
)
from aimm.schedule import lr_lambda, plan_micro_batches, plan_optimizer_steps, warmup_for

# config fields that may differ between the first start of a run and its resumption
RESUME_FREE_FIELDS = {"run_dir", "run_id", "progress", "data_dir", "device"}


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


@dataclass
class TrainContext:
    """What a method may use during a stage."""

    cfg: RunConfig
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

    def memory_batch(self, size: int | None = None) -> dict[str, torch.Tensor]:
        """A random batch (default ``memory_batch_size``) of the memory buffer, on the device."""
        if not self.has_memory:
            raise RuntimeError("memory_batch() called without a memory buffer")
        k = min(size or self.cfg.memory_batch_size, len(self.memory))
        indices = self.memory_rng.sample(range(len(self.memory)), k)
        return self.to_device(self.memory.batch(indices))

    def probe_loss(self, mode: str = "train", batch_size: int | None = None) -> float:
        """Forgetting signal: one no-grad forward on a random memory batch (spec §2).

        ``mode="train"`` keeps dropout on, as the release does; ``"eval"`` turns it off. Under
        several processes every rank probes the same batch and rank 0's value is used by all,
        so every rank takes the same merge decision.
        """
        start = time.perf_counter()
        batch = self.memory_batch(batch_size)
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

    def rehearsal_step(self, optimizer=None, on_grads=None,
                       batch_size: int | None = None) -> torch.Tensor:
        """One outer optimiser step on a random memory batch (no scheduler step, spec §4b).

        As the release's outer step (HF ``training_step`` then clipping then ``optimizer.step``):
        the loss is divided by ``grad_accum`` before backward, the gradients are clipped at
        ``max_grad_norm`` and ``optimizer`` steps at its current lr. ``optimizer`` defaults to
        the inner one (the release's behaviour; its lr is the schedule's current value, the
        scheduler is not stepped). ``on_grads(ctx)`` is called after clipping and the step,
        before the gradients are cleared: it sees the clipped gradients and the updated weights
        (where the release updates its outer importance EMA). Returns the detached raw
        (unscaled) loss as a 0-dim tensor: nothing is read back from the device, so rehearsal
        steps queue up.
        """
        start = time.perf_counter()
        optimizer = optimizer or self.optimizer
        loss = lm_loss(self.model, self.memory_batch(batch_size), self.is_seq2seq)
        self.accelerator.backward(loss / self.cfg.grad_accum)
        if self.cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        optimizer.step()
        if on_grads is not None:
            on_grads(self)
        optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        self.timers["rehearsal"] += time.perf_counter() - start
        return loss.detach()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def log_merge(self, event: dict[str, Any]) -> None:
        event = {"task": self.stage.name, "stage": self.stage.index, **event}
        self.merges.append(event)
        notify(self.callbacks, "on_merge", event)


# ------------------------------------------------------------------------------------------
class Engine:
    """Runs one configured experiment into its run directory (resuming if it exists)."""

    def __init__(self, cfg: RunConfig, callbacks: list | None = None,
                 restart_from_stage: int | None = None) -> None:
        """``callbacks``: objects with any of ``on_step(record)``, ``on_merge(event)``,
        ``on_stage_end(stage, score_rows)`` (e.g. a live plot in a notebook).
        ``restart_from_stage``: k (1-based) drops the stages from k on before resuming."""
        cfg.validate()
        self.cfg = cfg
        self.restart_from_stage = restart_from_stage
        self.callbacks = list(callbacks or [])
        self.loss_hook = None  # tests: inject a NaN loss
        run_id = cfg.run_id or (Path(cfg.run_dir).name if cfg.run_dir else new_run_id(cfg.method))
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / run_id
        self.cfg = cfg.replace(run_id=run_id, run_dir=str(self.run_dir))
        self.store = RunStore(self.run_dir)
        self.method: Method = build_method(self.cfg)
        self.warnings: list[str] = []

    # ---------------------------------------------------------------- set-up
    def _check_resume(self) -> dict:
        self.store.ensure_writable()
        if int(os.environ.get("RANK", "0")) == 0:
            self.store.remove_stale_temporaries()
        if not self.store.exists():
            return {"completed": [], "scores": [], "stage_steps": []}
        old = self.store.read_config()
        new = self.cfg.to_dict()
        diff = sorted(k for k in set(old) | set(new)
                      if k not in RESUME_FREE_FIELDS and old.get(k) != new.get(k))
        if diff:
            raise RunDirError(
                f"{self.run_dir}: holds a run with a different config "
                f"({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)}); "
                "choose another run dir or the same settings to resume"
            )
        if self.restart_from_stage:
            rewind_run(self.store, self.restart_from_stage)
        state = self.store.read_state()
        verify_for_resume(self.store, state)
        return state

    def _load_data(self, tasks: list[str]) -> dict:
        from aimm.data import load_tasks

        data = load_tasks(self.cfg.data_dir, self.cfg.benchmark, tasks, max_train=self.cfg.max_train,
                          max_test=self.cfg.max_test, seed=self.cfg.seed, specs=self.cfg.task_specs())
        for task in data.values():
            self.warnings.extend(task.warnings)
        return data

    def _load_model(self):
        from aimm.models import attach_lora, load_model

        bundle = load_model(self.cfg.model, seed=self.cfg.seed, dtype=getattr(torch, self.cfg.dtype))
        torch.manual_seed(self.cfg.seed)
        return attach_lora(bundle, r=self.cfg.lora_r, alpha=self.cfg.lora_alpha,
                           dropout=self.cfg.lora_dropout, targets=self.cfg.lora_targets)

    def _memory_for(self, stage: Stage, tasks: list[str], data: dict) -> dict[str, list]:
        """The release's buffer of the tasks before ``stage``: earlier task -> its examples.

        :func:`aimm.data.memory_buffers` with one generator seeded ``buffer_seed`` (42, fixed
        in the release and independent of the training seed) sampling the earlier tasks in
        order, as ``load_memory_buffer`` does. It samples each task's training split as
        loaded: with ``max_train`` None (or >= the file's size) that is the whole train file,
        exactly the release's buffer; with a smaller ``max_train`` the same procedure runs on
        the ``max_train`` subset (the release always samples the whole file).
        """
        from aimm.data import memory_buffers

        if not (self.method.uses_memory or self.cfg.probe_history) or self.method.joint:
            return {}
        first = tasks.index(stage.train_tasks[0])
        earlier = {task: data[task].train for task in tasks[:first]}
        return memory_buffers(earlier, fraction=self.cfg.buffer_fraction,
                              mode=self.cfg.buffer_mode, seed=self.cfg.buffer_seed)

    # ---------------------------------------------------------------- main
    def run(self) -> Path:
        with self.store.lock():  # one process per run dir; bad input leaves nothing behind
            return self._run()

    def _run(self) -> Path:
        from accelerate import Accelerator

        from aimm.models import lora_state_dict

        cfg = self.cfg
        tasks = cfg.task_names()
        state = self._check_resume()
        data = self._load_data(tasks)
        check_run_data(self.store, cfg.benchmark, data, state, cfg.max_train)
        bundle = self._load_model()
        initial_lora = lora_state_dict(bundle.model)
        use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        accelerator = Accelerator(cpu=use_cpu)
        if cfg.compile:
            bundle.model.compile(backend=cfg.compile_backend)  # in place: parameter names (and saved adapters) unchanged
        model = accelerator.prepare_model(bundle.model)
        reduce.set_layout(reduce.layout_for(accelerator, self.method.merges))  # sharded under FSDP
        if accelerator.is_main_process:
            self.store.write_config(self.cfg.to_dict())
            if not (self.run_dir / "environment.json").exists():
                self.store.write_environment(environment_info(cfg.seed))

        stages = self.method.stages(tasks)
        done = len(state["completed"])
        if done:
            self._restore_adapter(model, stages[done - 1])
        for stage in stages[done:]:
            ctx = self._run_stage(stage, tasks, data, model, bundle, accelerator, initial_lora,
                                  global_offset=sum(state["stage_steps"]))
            require_finite_adapter(ctx.lora_params(), stage.name, self.run_dir)
            ctx.rank_checksums = lora_checksums(model, accelerator)
            rows = self._evaluate(ctx, stage, data, accelerator) if accelerator.is_main_process else []
            accelerator.wait_for_everyone()
            notify(ctx.callbacks, "on_stage_end", stage, rows)
            state["scores"].extend(rows)
            state["completed"].append(stage.name)
            state["stage_steps"].append(ctx.total_steps)
            self.warnings.extend(w for w in ctx.warnings if w not in self.warnings)
            if ctx.counter.prompts or ctx.counter.targets:
                self.warnings.append(
                    f"stage {stage.name}: truncated {ctx.counter.prompts} of {ctx.counter.seen} "
                    f"prompts to {cfg.max_input_len} tokens and {ctx.counter.targets} targets to "
                    f"{cfg.max_target_len} tokens")
            if accelerator.is_main_process:
                self._write_results(tasks, state)
                self.store.write_warnings(self._all_warnings())
                crash_point("stage_end")
                record_stage_files(state, self.run_dir, self.store.stage_dir(stage.index, stage.name))
                self.store.write_state(state)  # last: the resume point
                self.store.checkpoint_path(stage.index).unlink(missing_ok=True)
        if accelerator.is_main_process:
            self._write_results(tasks, state)
            self.store.write_warnings(self._all_warnings())
        return self.run_dir

    def _all_warnings(self) -> list[str]:
        old = []
        path = self.run_dir / "warnings.json"
        if path.is_file():
            from aimm.runs import read_json

            old = read_json(path)
        return list(dict.fromkeys(old + self.warnings))

    def _restore_adapter(self, model, stage: Stage) -> None:
        from aimm.export import restore_stage_adapter  # adapter.safetensors or adapter/ (PEFT)

        restore_stage_adapter(model, self.store.stage_dir(stage.index, stage.name))

    # ---------------------------------------------------------------- one stage
    def _run_stage(self, stage, tasks, data, model, bundle, accelerator, initial_lora,
                   global_offset: int) -> TrainContext:
        from aimm.models import load_lora_state_dict

        cfg = self.cfg
        stage_seed = cfg.seed + 1000 * stage.index
        seed_everything(stage_seed)
        if self.method.fresh_adapter_per_stage:
            load_lora_state_dict(model, initial_lora)
        ctx = TrainContext(cfg=cfg, model=model, tokenizer=bundle.tokenizer,
                           is_seq2seq=bundle.is_seq2seq, accelerator=accelerator, data=data,
                           stage=stage, memory_rng=random.Random(stage_seed),
                           callbacks=self.callbacks if accelerator.is_main_process else [])
        encode = dict(is_seq2seq=bundle.is_seq2seq, max_input_len=cfg.max_input_len,
                      max_target_len=cfg.max_target_len, counter=ctx.counter,
                      pad_to_multiple_of=cfg.sequence_multiple(), truncation=cfg.truncation)
        buffers = self._memory_for(stage, tasks, data)
        ctx.memory_examples = [e for examples in buffers.values() for e in examples]
        ctx.memory_ids = memory_records(buffers)
        if ctx.memory_examples:
            ctx.memory = EncodedExamples.from_texts(
                bundle.tokenizer, [e.input for e in ctx.memory_examples],
                [e.output for e in ctx.memory_examples], **encode)
        examples = self.method.training_examples(ctx, stage)
        if not examples:
            raise ValueError(f"stage {stage.name}: no training examples")
        train = EncodedExamples.from_texts(bundle.tokenizer, [e.input for e in examples],
                                           [e.output for e in examples], **encode)
        plan = plan_optimizer_steps(len(train), cfg.batch_size, cfg.grad_accum, cfg.epochs,
                                    stage_seed)
        total = len(plan)  # Trainer's max_steps
        warmup = warmup_for(cfg.warmup_steps, cfg.max_warmup_fraction, total)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=True if cfg.fused_optimizer else None)
        optimizer = accelerator.prepare_optimizer(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total))
        ctx.optimizer, ctx.scheduler, ctx.total_steps = optimizer, scheduler, total

        self.method.on_stage_start(ctx)
        ckpt_path = self.store.checkpoint_path(stage.index)
        start = self._restore_checkpoint(ckpt_path, ctx, model)
        model.train()
        bar = _progress(total, f"train {stage.index + 1}/{len(self.method.stages(tasks))} "
                               f"{stage.name} [{cfg.method}]", cfg.progress and accelerator.is_main_process)
        bar.update(start)
        started = time.perf_counter()
        for step_index in range(start, total):
            losses = []
            for micro in plan[step_index]:
                local = shard(micro, accelerator)
                batch = ctx.to_device(train.batch(local))
                loss = lm_loss(model, batch, bundle.is_seq2seq)
                if accelerator.num_processes > 1:  # the one-process token mean, see rank_share
                    loss = loss * rank_share(train.target_ids, micro, local, accelerator.num_processes)
                if self.loss_hook is not None:
                    loss = self.loss_hook(ctx, loss)
                losses.append(loss.detach())
                accelerator.backward(loss / cfg.grad_accum)  # HF training_step's scaling
            # the one host read of an inner step: the NaN policy must see the loss before the
            # update, and the trajectory records it (the probe, when a method probes, is the other)
            step_loss = float(mean_over_ranks(torch.stack(losses).mean(), accelerator))
            lr = ctx.current_lr()  # the lr optimizer.step() applies below
            ctx.step = step_index + 1
            record = {"task": stage.name, "stage": stage.index, "step": ctx.step,
                      "global_step": global_offset + ctx.step, "loss": step_loss, "lr": lr}
            if not math.isfinite(step_loss):
                ctx.nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                if cfg.nan_policy == "stop":
                    bar.close()
                    raise NonFiniteLossError(
                        f"stage {stage.name} step {ctx.step}: training loss is {step_loss}; run "
                        f"stopped before the update. {self.run_dir} keeps the completed stages"
                        + (" and the last within-stage checkpoint" if cfg.checkpoint_every else "")
                        + " intact (nan_policy='skip' skips such steps instead)")
                record["skipped"] = 1
                scheduler.step()
            else:
                self.method.before_optimizer_step(ctx)
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                self.method.after_optimizer_step(ctx)
                optimizer.zero_grad(set_to_none=True)
                ctx.optimizer_steps += 1
                self.method.after_step(ctx, record)
                release_scale(record, cfg.grad_accum)
            ctx.steps.append(record)
            crash_point("train_step")
            notify(ctx.callbacks, "on_step", record)
            bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
            bar.update(1)
            if cfg.checkpoint_every and (ctx.step % cfg.checkpoint_every == 0 or ctx.step == total):
                self._save_checkpoint(ckpt_path, ctx, model)
        bar.close()
        self.method.on_stage_end(ctx)
        ctx.timers["train"] = time.perf_counter() - started
        if ctx.nonfinite:
            ctx.warnings.append(f"stage {stage.name}: skipped {ctx.nonfinite} steps with a non-finite loss")
        return ctx

    def _save_checkpoint(self, path: Path, ctx: TrainContext, model) -> None:
        from aimm.checkpoint import capture_rng, save_checkpoint
        from aimm.models import lora_state_dict

        if not ctx.accelerator.is_main_process:
            return
        save_checkpoint(path, {
            "stage": ctx.stage.index, "step": ctx.step, "lora": lora_state_dict(model),
            "optimizer": ctx.optimizer.state_dict(), "scheduler": ctx.scheduler.state_dict(),
            "rng": capture_rng(ctx.memory_rng), "method": self.method.state_dict(),
            "steps": ctx.steps, "merges": ctx.merges, "optimizer_steps": ctx.optimizer_steps,
            "nonfinite": ctx.nonfinite})

    def _restore_checkpoint(self, path: Path, ctx: TrainContext, model) -> int:
        """Continue a stage from its checkpoint; returns the number of steps already done."""
        from aimm.checkpoint import load_checkpoint, restore_rng
        from aimm.models import load_lora_state_dict, lora_state_dict

        ckpt = load_checkpoint(path, self.warnings.append, like=lora_state_dict(model)) \
            if self.cfg.checkpoint_every else None
        if ckpt is None or ckpt["stage"] != ctx.stage.index:
            return 0
        load_lora_state_dict(model, ckpt["lora"])
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
        ctx.scheduler.load_state_dict(ckpt["scheduler"])
        self.method.load_state_dict(ckpt["method"], ctx)
        restore_rng(ckpt["rng"], ctx.memory_rng)
        ctx.steps, ctx.merges = list(ckpt["steps"]), list(ckpt["merges"])
        ctx.optimizer_steps, ctx.nonfinite = ckpt["optimizer_steps"], ckpt["nonfinite"]
        ctx.step = ctx.resumed_at = ckpt["step"]
        return ctx.step

    # ---------------------------------------------------------------- evaluation + writing
    def _evaluate(self, ctx: TrainContext, stage: Stage, data: dict, accelerator) -> list[dict]:
        """Score every evaluated task and write the stage's files (main process only)."""
        from safetensors.torch import save as safetensors_bytes

        from aimm.data import task_metric
        from aimm.evaluation import RELEASE_ANSWER_MAPS, evaluate_task
        from aimm.export import base_model_name, save_adapter
        from aimm.models import lora_state_dict

        cfg = self.cfg
        stage_dir = self.store.stage_dir(stage.index, stage.name)
        model = accelerator.unwrap_model(ctx.model)
        rows = []
        started = time.perf_counter()
        # a compiled model evaluates eagerly: evaluation's ever-changing shapes would recompile
        stance = torch.compiler.set_stance("force_eager") if cfg.compile else contextlib.nullcontext()
        with stance:
            for task in stage.eval_tasks:
                td = data[task]
                metric = task_metric(cfg.benchmark, task)
                result = evaluate_task(model, ctx.tokenizer, td.test, is_seq2seq=ctx.is_seq2seq,
                                       metric=metric, labels=td.label_set, mode=cfg.eval_mode,
                                       batch_size=cfg.eval_batch_size,
                                       # release: no truncation at evaluation (generate_bwt.py)
                                       max_input_len=None if cfg.truncation == "release" else cfg.max_input_len,
                                       truncation=cfg.truncation,
                                       answer_map=RELEASE_ANSWER_MAPS.get(task) if cfg.release_answer_map else None,
                                       progress=f"eval {task} after {stage.name}" if cfg.progress else False)
                atomic_write_jsonl(stage_dir / "predictions" / f"{task}.jsonl", result.predictions)
                crash_point("eval")
                rows.append({"stage": stage.index, "after_task": stage.name, "eval_task": task,
                             "metric": metric, "score": result.score, "n": len(td.test),
                             "split": td.test_split})
        ctx.timers["eval"] = time.perf_counter() - started
        atomic_write_bytes(stage_dir / "adapter.safetensors", safetensors_bytes(lora_state_dict(model)))
        save_adapter(model, stage_dir / "adapter", base_model_name(cfg.model))  # PEFT's format
        atomic_write_csv(stage_dir / "steps.csv", ctx.steps)
        atomic_write_csv(stage_dir / "merges.csv", ctx.merges)
        atomic_write_json(stage_dir / "memory.json", ctx.memory_ids)
        atomic_write_json(stage_dir / "stage.json", {
            "stage": stage.index, "name": stage.name, "train_tasks": list(stage.train_tasks),
            "inner_steps": ctx.total_steps, "optimizer_steps": ctx.optimizer_steps,
            "merges": len(ctx.merges), "memory_size": len(ctx.memory_examples),
            "seconds": {k: round(v, 3) for k, v in ctx.timers.items()},
            "processes": accelerator.num_processes,
            "lora_checksum_per_rank": ctx.rank_checksums,
            "resumed_within_stage": ctx.resumed_at,
            "truncation": ctx.counter.as_dict()})
        return rows

    def _write_results(self, tasks: list[str], state: dict) -> None:
        from aimm.metrics import cl_metrics

        rows = state["scores"]
        stage_names = [s.name for s in self.method.stages(tasks)]
        index = {name: j for j, name in enumerate(stage_names)}
        col = {t: i for i, t in enumerate(tasks)}
        matrix = [[float("nan")] * len(tasks) for _ in stage_names]
        for r in rows:
            matrix[index[r["after_task"]]][col[r["eval_task"]]] = r["score"]
        matrix_rows = [{"after_task": name, **{t: matrix[j][i] for i, t in enumerate(tasks)}}
                       for j, name in enumerate(stage_names)]
        complete = len(state["completed"]) == len(stage_names)
        metrics: dict[str, Any] = {"method": self.cfg.method, "complete": complete,
                                   "stages_done": len(state["completed"])}
        if complete:
            if self.method.joint:
                metrics["OP"] = sum(matrix[-1]) / len(tasks)
            elif self.method.fresh_adapter_per_stage:
                metrics["single_task"] = {t: matrix[j][j] for j, t in enumerate(tasks)}
                metrics["OP"] = sum(matrix[j][j] for j in range(len(tasks))) / len(tasks)
            else:
                metrics.update(cl_metrics(matrix))
        metrics["merges_per_stage"] = _merges_per_stage(self.run_dir)
        # one consistent set: everything computed first, then written (metrics.json last)
        atomic_write_csv(self.run_dir / "scores.csv", rows)
        atomic_write_csv(self.run_dir / "scores_matrix.csv", matrix_rows)
        atomic_write_json(self.run_dir / "metrics.json", metrics)


def memory_records(buffers: dict[str, list]) -> list[dict]:
    """``memory.json``: one ``{"task", "id"}`` per buffer example, in buffer order."""
    return [{"task": task, "id": e.id} for task, examples in buffers.items() for e in examples]


def release_scale(record: dict, grad_accum: int) -> None:
    """Add the release's scale of the forgetting signal (and threshold) beside the raw values.

    The release's probe (``Trainer.training_step_no_grad``) returns ``loss / grad_accum`` (loss / 4
    at its 8 x 4), and its threshold is a mean of those values times the factor; the paper's
    figures plot that scale. Merge decisions are the same on either scale (exact scaling).
    """
    for name in ("history_loss", "threshold"):
        value = record.get(name)
        if value is not None:
            record[f"{name}_release"] = value / grad_accum


def _merges_per_stage(run_dir: Path) -> dict[str, int]:
    from aimm.runs import read_json

    out = {}
    for path in sorted((run_dir / "stages").glob("*/stage.json")):
        info = read_json(path)
        out[info["name"]] = info.get("merges", 0)
    return out


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a, **k) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def lora_checksums(model, accelerator) -> list[float]:
    """Sum of all LoRA weights on each rank: equal values show the ranks stayed in sync."""
    from aimm.models import lora_parameters

    total = sum(p.detach().double().sum() for p in lora_parameters(model).values())
    value = torch.as_tensor(total, dtype=torch.float64, device=accelerator.device).reshape(1)
    return [float(v) for v in accelerator.gather(value).cpu()]


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


def notify(callbacks: list, hook: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def run(cfg: RunConfig | dict, callbacks: list | None = None,
        restart_from_stage: int | None = None) -> Path:
    """Run (or resume) an experiment; returns its run directory.

    ``restart_from_stage=k`` first drops stages k.. of an existing run (see
    :func:`aimm.integrity.rewind_run`); the run dir is locked for the whole call."""
    if isinstance(cfg, dict):
        cfg = RunConfig.from_dict(cfg)
    with pywarnings.catch_warnings():
        pywarnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return Engine(cfg, callbacks, restart_from_stage).run()


__all__ = ["Engine", "NonFiniteLossError", "TrainContext", "run", "plan_micro_batches",
           "plan_optimizer_steps", "lr_lambda", "memory_records", "release_scale"]

