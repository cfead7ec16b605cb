"""The training engine: orchestrates the stages of one experiment into its run directory.

The loop is ours (no Trainer) but steps like the release's HF Trainer 4.28.1 (see
:mod:`aimm.schedule` and :mod:`aimm.training.loop`), on ``accelerate``. Methods plug in through
the hooks of :class:`aimm.methods.base.Method`; they get a
:class:`~aimm.training.context.TrainContext` with what they may touch.

Per stage: seed -> set up (memory buffer, encoded examples, step plan, optimiser, scheduler,
``on_stage_start``, checkpoint restore) -> :func:`~aimm.training.loop.train_stage` (inner steps,
then ``on_stage_end``, which may change the model) -> adapter check -> evaluation and the stage
folder (:mod:`aimm.training.artifacts`) -> callbacks' ``on_stage_end`` -> result set, warnings,
sha256 records -> ``state.json`` (:class:`~aimm.training.state.RunState`, last: the resume point).

Determinism and resume: every stage re-seeds from ``(seed, stage index)`` and the data order of
a stage is planned up front from its own generator, so a run resumed after stage k (its adapter
and the method's stage state reloaded from the run dir) continues exactly like an uninterrupted
one.
"""

from __future__ import annotations

import os
import random
import warnings as pywarnings
from pathlib import Path

import torch

from aimm.config import RunConfig
from aimm.encoding import EncodedExamples
from aimm.errors import ConfigError
from aimm.faults import crash_point
from aimm.hardware import slow_bfloat16_warning
from aimm.integrity import (check_data_fingerprint, check_restart_target, check_run_data,
                             require_finite_adapter, rewind_run, rewound_state, verify_for_resume)
from aimm.merging import reduce
from aimm.methods import Method, build_method
from aimm.runs import RunDirError, RunStore, environment_info, load_warnings, new_run_id
from aimm.schedule import lr_lambda, plan_optimizer_steps, warmup_for
from aimm.training import artifacts
from aimm.training.context import Stage, TrainContext
from aimm.training.launch import process_count_problem, random_model_device, run_on_cpu
from aimm.training.loop import NonFiniteLossError, restore_checkpoint, seed_everything, train_stage
from aimm.training.method_state import read_method_state
from aimm.training.shared_stage import copy_first_stage, share_problem
from aimm.training.state import RESUME_FREE_FIELDS, RunState, differing_fields
from aimm.util import check_launch_variables, is_int, launch_rank, launch_world_size


class Engine:
    """Runs one configured experiment into its run directory (resuming if it exists)."""

    def __init__(self, cfg: RunConfig, callbacks: list | None = None,
                 restart_from_stage: int | None = None,
                 first_stage_from: str | Path | None = None) -> None:
        """``callbacks``: objects with any of ``on_step(record)``, ``on_merge(event)``,
        ``on_stage_end(stage, score_rows)`` (e.g. a live plot in a notebook).
        ``restart_from_stage``: k (1-based) drops the stages from k on before resuming.
        ``first_stage_from``: a finished run whose first stage a new run copies instead of
        training it (:mod:`aimm.training.shared_stage`); ignored when the run dir holds a run."""
        cfg.validate()
        check_launch_variables()
        if restart_from_stage is not None and not (is_int(restart_from_stage)
                                                   and restart_from_stage > 0):
            raise ConfigError(f"--restart-from-stage {restart_from_stage!r}: stages are numbered "
                              "from 1")
        self.restart_from_stage = restart_from_stage
        self.first_stage_from = first_stage_from
        self.callbacks = list(callbacks or [])
        self.loss_hook = None  # tests: inject a NaN loss
        run_id = cfg.run_id or (Path(cfg.run_dir).name if cfg.run_dir else new_run_id(cfg.method))
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / run_id
        self.cfg = cfg.replace(run_id=run_id, run_dir=str(self.run_dir))
        self.store = RunStore(self.run_dir)
        self.method: Method = build_method(self.cfg)
        self.warnings: list[str] = []
        self.pending_rewind: int | None = None  # set by the resume check, applied by _rewind

    # ---------------------------------------------------------------- main
    def run(self) -> Path:
        with self.store.lock():  # one process per run dir; bad input leaves nothing behind
            return self._run()

    def _run(self) -> Path:
        tasks = self.cfg.task_names()
        state = self._check_resume()
        data, fingerprint = self._setup_data(tasks, state)
        bundle, initial_lora, accelerator, model = self._setup_model()
        self._rewind(fingerprint)  # --restart-from-stage deletes only now, with all input checked
        stages = self.method.stages(tasks)
        if state.completed:
            self._restore_stage(model, stages[len(state.completed) - 1])
        for stage in stages[len(state.completed):]:
            ctx, train, plan = self._setup_stage(stage, tasks, data, model, bundle, accelerator,
                                                 initial_lora, state)
            train_stage(ctx, self.method, train, plan, global_offset=state.steps_done,
                        ckpt_path=self.store.checkpoint_path(stage.index), run_dir=self.run_dir,
                        desc=f"train {stage.index + 1}/{len(stages)} {stage.name} [{self.cfg.method}]",
                        loss_hook=self.loss_hook)
            self._finish_stage(ctx, tasks, data, state)
        if accelerator.is_main_process:
            artifacts.write_results(self.cfg, self.method, tasks, state, self.run_dir)
            self.store.write_warnings(self._all_warnings())
        return self.run_dir

    # ---------------------------------------------------------------- set-up, one per concern
    def _check_resume(self) -> RunState:
        # rank 0 made (and checked) the run dir when locking; other ranks make nothing
        if launch_rank() == 0 and self.store.exists():
            self.store.remove_stale_temporaries()  # of this run's killed writes, not a user's
        check_restart_target(self.store, self.restart_from_stage)  # k > 1: needs a run
        if not self.store.exists():
            return self._share_first_stage() if self.first_stage_from else RunState()
        old = self.store.read_config()
        new = self.cfg.to_dict()
        diff = differing_fields(old, new)
        if diff:
            raise RunDirError(
                f"{self.run_dir}: holds a run with a different config "
                f"({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)}); "
                "choose another run dir or the same settings to resume"
            )
        if self.restart_from_stage is not None:  # applied by _rewind once all input is checked
            self.pending_rewind = self.restart_from_stage
            state = RunState.from_dict(rewound_state(self.store, self.restart_from_stage))
        else:
            state = RunState.read(self.store)
        verify_for_resume(self.store, state.to_dict())
        return state

    def _rewind(self, fingerprint: dict) -> None:
        """Drop the stages a ``restart_from_stage`` names, then record the data (rank 0)."""
        if self.pending_rewind is None or launch_rank() != 0:
            return
        state = rewind_run(self.store, self.pending_rewind)
        check_data_fingerprint(self.store, fingerprint, state)

    def _share_first_stage(self) -> RunState:
        """A new run starts with the first stage of ``first_stage_from`` (checked first)."""
        problem = share_problem(self.first_stage_from, self.cfg, self.method)
        if not problem and launch_world_size() > 1:
            problem = "a first stage is copied by one process only; run without it under several"
        if problem:
            raise RunDirError(f"first_stage_from {self.first_stage_from}: {problem}; leave it out "
                              "to train the first stage")
        return copy_first_stage(self.first_stage_from, self.store, self.cfg, self.method)

    def _setup_data(self, tasks: list[str], state: RunState) -> tuple[dict, dict]:
        """Load the tasks; check they are trainable and, on resume, the data the run used;
        ``(data, its fingerprint)``."""
        from aimm.data import load_tasks

        cfg = self.cfg
        data = load_tasks(cfg.data_dir, cfg.benchmark, tasks, max_train=cfg.max_train,
                          max_test=cfg.max_test, seed=cfg.seed, specs=cfg.task_specs())
        for task in data.values():
            self.warnings.extend(task.warnings)
        fingerprint = check_run_data(self.store, cfg.benchmark, data, state.to_dict(),
                                     cfg.max_train, rewinding=self.pending_rewind is not None)
        return data, fingerprint

    def _load_model(self):
        """The base model with what the method trains (:meth:`Method.setup_model`; default LoRA)."""
        from aimm.attention import set_attention_dtype
        from aimm.models import load_model

        bundle = load_model(self.cfg.model, seed=self.cfg.seed, dtype=getattr(torch, self.cfg.dtype),
                            random_device=random_model_device(self.cfg.device, launch_world_size()))
        self._warn(set_attention_dtype(bundle.model, self.cfg.attention_dtype))
        torch.manual_seed(self.cfg.seed)
        return self.method.setup_model(bundle, self.cfg)

    def _setup_model(self):
        """``(bundle, its initial LoRA weights, accelerator, prepared model)``; writes
        config.json and environment.json."""
        from accelerate import Accelerator

        from aimm.models import lora_state_dict

        cfg = self.cfg
        bundle = self._load_model()
        initial_lora = lora_state_dict(bundle.model)  # a fresh adapter per stage starts here
        use_cpu = run_on_cpu(cfg.device)
        accelerator = Accelerator(cpu=use_cpu)
        problem = process_count_problem(os.environ, accelerator.num_processes)
        if problem:  # every rank would train alone and write the same run dir
            raise ConfigError(problem)
        self._warn(slow_bfloat16_warning(cfg.dtype, "cpu" if use_cpu else "cuda"))
        if cfg.compile:
            bundle.model.compile(backend=cfg.compile_backend)  # in place: parameter names (and saved adapters) unchanged
        model = accelerator.prepare_model(bundle.model)
        reduce.set_layout(reduce.layout_for(accelerator, self.method.merges))  # sharded under FSDP
        if accelerator.is_main_process:
            self.store.write_config(cfg.to_dict())
            if not (self.run_dir / "environment.json").exists():
                self.store.write_environment(environment_info(cfg.seed))
        return bundle, initial_lora, accelerator, model

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

        if not (self.method.uses_memory or self.cfg.record_forgetting_signal) or self.method.joint:
            return {}
        first = tasks.index(stage.train_tasks[0])
        earlier = {task: data[task].train for task in tasks[:first]}
        return memory_buffers(earlier, fraction=self.cfg.buffer_fraction,
                              mode=self.cfg.buffer_mode, seed=self.cfg.buffer_seed)

    def _setup_stage(self, stage, tasks, data, model, bundle, accelerator, initial_lora,
                     state: RunState) -> tuple[TrainContext, EncodedExamples, list]:
        """Seed, memory buffer, encoded examples, step plan, optimiser and scheduler, then
        ``on_stage_start`` and a within-stage checkpoint's restore."""
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
        params = self.method.trainable_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=True if cfg.fused_optimizer else None)
        optimizer = accelerator.prepare_optimizer(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total))
        ctx.optimizer, ctx.scheduler, ctx.total_steps = optimizer, scheduler, total
        self.method.on_stage_start(ctx)
        restore_checkpoint(self.store.checkpoint_path(stage.index), ctx, self.method,
                           self.warnings.append)
        return ctx, train, plan

    # ---------------------------------------------------------------- stage end
    def _finish_stage(self, ctx: TrainContext, tasks: list[str], data: dict, state: RunState) -> None:
        """Adapter check, evaluation + stage folder, callbacks, results, then the resume point."""
        cfg, stage, accelerator = self.cfg, ctx.stage, ctx.accelerator
        trained = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}  # LoRA, prompt or all
        require_finite_adapter(trained, stage.name, self.run_dir)
        ctx.rank_checksums = lora_checksums(ctx.model, accelerator)
        rows = self._evaluate(ctx, stage, data) if accelerator.is_main_process else []
        accelerator.wait_for_everyone()
        ctx.notify("on_stage_end", stage, rows)
        state.complete_stage(stage.name, rows, ctx.total_steps)
        self.warnings.extend(w for w in ctx.warnings if w not in self.warnings)
        if ctx.counter.prompts or ctx.counter.targets:
            self.warnings.append(
                f"stage {stage.name}: truncated {ctx.counter.prompts} of {ctx.counter.seen} "
                f"prompts to {cfg.max_input_len} tokens and {ctx.counter.targets} targets to "
                f"{cfg.max_target_len} tokens")
        if accelerator.is_main_process:
            artifacts.write_results(cfg, self.method, tasks, state, self.run_dir)
            self.store.write_warnings(self._all_warnings())
            crash_point("stage_end")
            state.record_files(self.run_dir, self.store.stage_dir(stage.index, stage.name))
            state.write(self.store)  # last: the resume point
            self.store.checkpoint_path(stage.index).unlink(missing_ok=True)

    def _evaluate(self, ctx: TrainContext, stage: Stage, data: dict) -> list[dict]:
        """Score every evaluated task and write the stage's folder (main process only)."""
        stage_dir = self.store.stage_dir(stage.index, stage.name)
        rows, eval_truncation = artifacts.evaluate_stage(ctx, data, stage_dir)
        artifacts.write_stage(ctx, self.method, stage_dir, eval_truncation)
        return rows

    def _restore_stage(self, model, stage: Stage) -> None:
        """Resume after ``stage``: its adapter (aimm or PEFT copy) and the method's stage state."""
        from aimm.export import restore_stage_adapter

        stage_dir = self.store.stage_dir(stage.index, stage.name)
        restore_stage_adapter(model, stage_dir)
        method_state = read_method_state(stage_dir)
        if method_state is not None:
            self.method.load_stage_state(method_state, model)

    def _warn(self, message: str | None) -> None:
        """A setting that costs hours or did not apply: shown now, kept once in warnings.json."""
        if message and message not in self.warnings:
            pywarnings.warn(message, stacklevel=3)
            self.warnings.append(message)

    def _all_warnings(self) -> list[str]:
        try:
            old = load_warnings(self.run_dir)
        except RunDirError:  # damaged: written again with this run's warnings
            old = []
        return list(dict.fromkeys(old + self.warnings))


def memory_records(buffers: dict[str, list]) -> list[dict]:
    """``memory.json``: one ``{"task", "id"}`` per buffer example, in buffer order."""
    return [{"task": task, "id": e.id} for task, examples in buffers.items() for e in examples]


def lora_checksums(model, accelerator) -> list[float]:
    """Sum of all LoRA weights on each rank: equal values show the ranks stayed in sync."""
    from aimm.models import lora_parameters

    total = sum(p.detach().double().sum() for p in lora_parameters(model).values())
    value = torch.as_tensor(total, dtype=torch.float64, device=accelerator.device).reshape(1)
    return [float(v) for v in accelerator.gather(value).cpu()]


def run(cfg: RunConfig | dict, callbacks: list | None = None,
        restart_from_stage: int | None = None,
        first_stage_from: str | Path | None = None) -> Path:
    """Run (or resume) an experiment; returns its run directory.

    ``restart_from_stage=k`` first drops stages k.. of an existing run (see
    :func:`aimm.integrity.rewind_run`); ``first_stage_from``: a new run copies that finished
    run's first stage (:mod:`aimm.training.shared_stage`). The run dir is locked for the whole
    call."""
    if isinstance(cfg, dict):
        cfg = RunConfig.from_dict(cfg)
    with pywarnings.catch_warnings():
        pywarnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return Engine(cfg, callbacks, restart_from_stage, first_stage_from).run()


__all__ = ["Engine", "NonFiniteLossError", "RESUME_FREE_FIELDS", "TrainContext", "memory_records",
           "run"]
