"""Optimiser steps and lr of a task against transcriptions of the release's HF Trainer 4.28.1."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from aimm.training.engine import run
from aimm.schedule import (
    lr_lambda,
    plan_optimizer_steps,
    step_groups,
    trainer_max_steps,
    warmup_for,
)


# ------------------------------------------------------------------ release transcriptions
def release_max_steps(len_dataloader, gradient_accumulation_steps, num_train_epochs):
    """trainer.py, Trainer._inner_training_loop (max_steps <= 0 branch)."""
    num_update_steps_per_epoch = len_dataloader // gradient_accumulation_steps
    num_update_steps_per_epoch = max(num_update_steps_per_epoch, 1)
    return math.ceil(num_train_epochs * num_update_steps_per_epoch)


def release_step_batches(len_dataloader, gradient_accumulation_steps, num_train_epochs):
    """trainer.py, Trainer._inner_training_loop: which batches (epoch, step) each optimiser step
    accumulates; DefaultFlowCallback stops training once global_step >= max_steps."""
    max_steps = release_max_steps(len_dataloader, gradient_accumulation_steps, num_train_epochs)
    total_batched_samples, global_step, steps, grads = 0, 0, [], []
    for epoch in range(0, math.ceil(num_train_epochs)):
        steps_in_epoch = len_dataloader
        for step in range(steps_in_epoch):
            total_batched_samples += 1
            grads.append((epoch, step))  # tr_loss_step = self.training_step(model, inputs)
            if total_batched_samples % gradient_accumulation_steps == 0 or (
                steps_in_epoch <= gradient_accumulation_steps and (step + 1) == steps_in_epoch
            ):
                steps.append(grads)  # optimizer.step(); lr_scheduler.step(); model.zero_grad()
                grads = []
                global_step += 1
                if global_step >= max_steps:  # control.should_training_stop
                    return steps
    return steps


def hf_lrs(lr, warmup, total):
    """The lr each optimiser step applies under get_linear_schedule_with_warmup."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=lr)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# ------------------------------------------------------------------ tests
def test_release_sizes_310_steps_not_313():
    assert trainer_max_steps(math.ceil(1000 / 8), 4, 10) == 310
    assert len(plan_optimizer_steps(1000, 8, 4, 10, seed=0)) == 310


@pytest.mark.parametrize("n_batches", [1, 2, 3, 4, 5, 7, 8, 9, 125, 126])
@pytest.mark.parametrize("accum", [1, 2, 4])
@pytest.mark.parametrize("epochs", [1, 1.5, 2, 3, 10])
def test_step_grouping_and_count_equal_the_trainer_loop(n_batches, accum, epochs):
    expected = release_step_batches(n_batches, accum, epochs)
    got = step_groups(n_batches, accum, epochs)
    assert got == [[e * n_batches + s for e, s in group] for group in expected]
    assert len(got) == trainer_max_steps(n_batches, accum, epochs) == release_max_steps(n_batches, accum, epochs)


def test_remainder_batch_is_accumulated_with_the_next_epoch():
    plan = plan_optimizer_steps(10, 4, 2, epochs=2, seed=3)  # 3 batches/epoch: 4, 4, 2
    assert len(plan) == 2  # ceil(2 * (3 // 2))
    assert [len(b) for b in plan[1]] == [2, 4]  # epoch 1's last batch + epoch 2's first
    epoch0 = plan[0] + plan[1][:1]  # every example once in epoch 1, the remainder included
    assert sorted(i for b in epoch0 for i in b) == list(range(10))


@pytest.mark.parametrize("warmup,total", [(0, 5), (2, 6), (50, 310), (50, 20), (3, 3)])
def test_lr_lambda_equals_hf_get_linear_schedule_with_warmup(warmup, total):
    hf = hf_lrs(1.0, warmup, total)
    f = lr_lambda(warmup, total)
    assert [f(s) for s in range(total)] == pytest.approx(hf, abs=0, rel=1e-12)
    assert hf[0] == (0.0 if warmup else 1.0)


def test_warmup_is_exact_unless_capped():
    assert warmup_for(50, None, 20) == 50  # release: warmup_steps even beyond max_steps
    assert warmup_for(50, 0.1, 20) == 2
    assert warmup_for(5, 0.5, 100) == 5


@pytest.mark.parametrize("max_train", [16, 18])  # 4 batches of 4; 5 batches, the last of 2
def test_run_lr_column_and_step_count_equal_the_release(tiny_config, max_train):
    cfg = tiny_config(method="seq_lora", tasks=["sst-2"], max_train=max_train, grad_accum=2,
                      epochs=2, warmup_steps=2, lr=1e-3)
    steps = pd.read_csv(run(cfg) / "stages" / "01_sst-2" / "steps.csv")
    len_dataloader = math.ceil(max_train / 4)
    total = release_max_steps(len_dataloader, 2, 2)
    assert len(steps) == total == 4  # 4 // 2 and 5 // 2 updates per epoch, 2 epochs
    assert list(steps["lr"]) == pytest.approx(hf_lrs(1e-3, 2, total), rel=1e-12)
    assert steps["lr"].iloc[0] == 0.0
