"""Rehearsal steps, Recurrent-KIF importance EMAs and the probe scale against transcriptions of
the release's trainer.py (WoodScene/AimMerging) and utils/lora_importance_bilevel_adaptive.py."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from aimm.config import RunConfig
from aimm.encoding import EncodedExamples
from aimm.training.context import TrainContext
from aimm.training.engine import run
from aimm.loss import lm_loss
from aimm.merging import MergeController
from aimm.methods import Stage
from aimm.methods.recurrent_kif import RecurrentKIF
from aimm.models import attach_lora, load_model

PROMPTS = [f"Question {i}: is {i} even?\nAnswer:" for i in range(6)]
TARGETS = ["yes" if i % 2 == 0 else "no" for i in range(6)]


# ------------------------------------------------------------------ release transcriptions
def release_update_ipt(state, named_parameters, beta1=0.85, beta2=0.85):
    """RankAllocator.update_ipt_inner / update_ipt_outer (taylor="param_first"), on a copy of
    ``state = (ipt, exp_avg_ipt, exp_avg_unc)``; called by the release after clip + step."""
    ipt, exp_avg_ipt, exp_avg_unc = (dict(d) for d in state)
    for n, p in named_parameters:
        if "lora_" in n:
            if n not in ipt:
                ipt[n] = torch.zeros_like(p)
                exp_avg_ipt[n] = torch.zeros_like(p)
                exp_avg_unc[n] = torch.zeros_like(p)
            with torch.no_grad():
                ipt[n] = (p * p.grad).abs().detach()
                exp_avg_ipt[n] = beta1 * exp_avg_ipt[n] + (1 - beta1) * ipt[n]
                exp_avg_unc[n] = beta2 * exp_avg_unc[n] + (1 - beta2) * (ipt[n] - exp_avg_ipt[n]).abs()
    return ipt, exp_avg_ipt, exp_avg_unc


def as_release_state(ours):
    """Our ``{"ipt", "unc"}`` EMA state as the release's three dicts (None: emptied). The
    release's last instantaneous score is overwritten before use; only its keys matter."""
    if ours is None:
        return {}, {}, {}
    return dict(ours["ipt"]), dict(ours["ipt"]), dict(ours["unc"])


def release_outer_grads(model, inputs_loss, gradient_accumulation_steps, max_grad_norm):
    """The outer step's gradients: Trainer.training_step (loss / accumulation steps, backward),
    then nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)."""
    loss = inputs_loss(model)
    if gradient_accumulation_steps > 1:
        loss = loss / gradient_accumulation_steps
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


# ------------------------------------------------------------------ rehearsal steps
def make_ctx(grad_accum: int, max_grad_norm: float, dropout: float = 0.0):
    from accelerate import Accelerator

    bundle = attach_lora(load_model("tiny-causal", seed=0), dropout=dropout)
    cfg = RunConfig(model="tiny-causal", grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                    memory_batch_size=4, progress=False)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare_model(bundle.model)
    model.train()
    memory = EncodedExamples.from_texts(bundle.tokenizer, PROMPTS, TARGETS, is_seq2seq=False,
                                        max_input_len=64, max_target_len=8)
    stage = Stage(1, "t", ("t",), ("t",))
    return TrainContext(cfg=cfg, model=model, tokenizer=bundle.tokenizer, is_seq2seq=False,
                        accelerator=accelerator, data={}, stage=stage, memory=memory,
                        memory_rng=random.Random(0))


def rehearsal_grads(ctx, optimizer):
    seen = {}

    def grab(c):
        seen.update({n: p.grad.detach().clone() for n, p in c.lora_params().items()})

    ctx.rehearsal_step(optimizer, on_grads=grab)
    return seen


def reference_batch_loss(ctx):
    indices = random.Random(0).sample(range(len(ctx.memory)), 4)  # memory_rng's first draw
    batch = ctx.memory.batch(indices)
    return lambda model: lm_loss(model, batch, False)


@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("max_grad_norm", [1e9, 1e-3])  # no clipping; clipping active
def test_rehearsal_gradient_is_the_clipped_gradient_of_loss_over_accum(accum, max_grad_norm):
    ctx = make_ctx(accum, max_grad_norm)
    expected = release_outer_grads(ctx.model, reference_batch_loss(ctx), accum, max_grad_norm)
    params = list(ctx.lora_params().values())
    got = rehearsal_grads(ctx, torch.optim.SGD(params, lr=0.0))
    assert set(got) and set(got) <= set(expected)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-9)
    if max_grad_norm < 1:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in got.values()]))
        assert float(norm) == pytest.approx(max_grad_norm, rel=1e-4)


def test_rehearsal_uses_the_shared_optimizer_at_its_current_lr_without_a_scheduler_step():
    ctx = make_ctx(4, 1e9)
    params = ctx.lora_params()
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.25)  # current lr 2.5e-3
    ctx.optimizer, ctx.scheduler = optimizer, scheduler
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = rehearsal_grads(ctx, None)
    assert scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    for n, p in params.items():
        big = grads[n].abs() > 1e-6  # first AdamW step: -lr * g / (|g| + eps) ~ -lr * sign(g)
        step = (p.detach() - before[n])[big]
        torch.testing.assert_close(step, -2.5e-3 * grads[n][big].sign(), rtol=1e-2, atol=1e-7)


# ------------------------------------------------------------------ Recurrent-KIF EMAs
def _named(ctx):
    return list(ctx.lora_params().items())


@pytest.mark.parametrize("empty_inner", [True, False])
def test_recurrent_kif_emas_follow_the_release_update_after_clip_and_step(tiny_config, monkeypatch,
                                                                          empty_inner):
    inner_log, outer_log = [], []
    original_after, original_outer = RecurrentKIF.after_optimizer_step, RecurrentKIF.after_rehearsal_step
    original_before = RecurrentKIF.before_optimizer_step

    def before(self, ctx):
        self._pre = {n: p.detach().clone() for n, p in ctx.lora_params().items()}
        original_before(self, ctx)

    def after(self, ctx):
        if not self.active:
            return original_after(self, ctx)
        named = _named(ctx)
        moved = any(not torch.equal(p.detach(), self._pre[n]) for n, p in named)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for _, p in named]))
        expected = release_update_ipt(as_release_state(self.ipt_in), named)
        emptied = self.ipt_in is None
        original_after(self, ctx)
        inner_log.append((ctx.step, moved, float(norm), emptied, expected, self.ipt_in))

    def outer(self, ctx):
        named = _named(ctx)
        adam_steps = int(ctx.optimizer.state[named[0][1]]["step"])
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for _, p in named]))
        expected = release_update_ipt(as_release_state(self.ipt_out), named)
        original_outer(self, ctx)
        outer_log.append((adam_steps, ctx.step, ctx.optimizer_steps, float(norm), expected, self.ipt_out))

    monkeypatch.setattr(RecurrentKIF, "before_optimizer_step", before)
    monkeypatch.setattr(RecurrentKIF, "after_optimizer_step", after)
    monkeypatch.setattr(RecurrentKIF, "after_rehearsal_step", outer)
    max_norm = 1e-4  # every step is clipped: the recorded norms prove the EMAs see clipped grads
    run(tiny_config(method="recurrent_kif", max_grad_norm=max_norm, warmup_steps=0,  # lr > 0 at step 1
                    method_options={"interval": 2, "empty_inner_score": empty_inner}))
    assert inner_log and outer_log
    for step, moved, norm, emptied, expected, ours in inner_log:
        assert moved  # after the optimiser step: weights already updated
        assert norm == pytest.approx(max_norm, rel=1e-3)
        merged_before = step > 2 and (step - 1) % 2 == 0  # a merge ran at the previous step
        assert emptied == (step == 1 or (empty_inner and merged_before)), step
        _, exp_ipt, exp_unc = expected
        for n in exp_ipt:
            torch.testing.assert_close(ours["ipt"][n], exp_ipt[n], rtol=1e-6, atol=0)
            torch.testing.assert_close(ours["unc"][n], exp_unc[n], rtol=1e-6, atol=0)
    for adam_steps, step, steps_before, norm, expected, ours in outer_log:
        assert adam_steps == steps_before + 1  # the shared AdamW already stepped this batch
        assert norm == pytest.approx(max_norm, rel=1e-3)
        _, exp_ipt, exp_unc = expected
        for n in exp_ipt:
            torch.testing.assert_close(ours["ipt"][n], exp_ipt[n], rtol=1e-6, atol=0)
            torch.testing.assert_close(ours["unc"][n], exp_unc[n], rtol=1e-6, atol=0)


# ------------------------------------------------------------------ forgetting-signal scale
def test_steps_csv_records_the_release_scale_beside_the_raw_probe(tiny_config):
    run_dir = run(tiny_config(method="aimmerging", grad_accum=2, max_train=24,
                              method_options={"initial_interval": 2}))
    steps = pd.read_csv(run_dir / "stages" / "02_agnews" / "steps.csv")
    assert steps["forgetting_signal"].notna().all()
    pd.testing.assert_series_equal(steps["forgetting_signal_release"], steps["forgetting_signal"] / 2,
                                   check_names=False)
    ok = steps["threshold"].notna()
    assert ok.any()
    pd.testing.assert_series_equal(steps.loc[ok, "threshold_release"], steps.loc[ok, "threshold"] / 2,
                                   check_names=False)


def test_merge_decisions_are_the_same_on_the_release_scale():
    rng = random.Random(5)
    for trial in range(50):
        losses = [rng.uniform(0.5, 3.0) * (3 if rng.random() < 0.1 else 1) for _ in range(300)]
        l1s = [rng.uniform(0.1, 5.0) for _ in range(300)]
        runs = []
        for scale in (1.0, 4.0):  # the release's probe: loss / gradient_accumulation_steps (4)
            c, merges = MergeController(), []
            for step, loss in enumerate(losses, start=1):
                if c.observe(step, loss / scale):
                    c.next_interval_after_merge(step, l1s[len(merges)], weights=c.fusion_weights())
                    merges.append(step)
            runs.append(merges)
        assert runs[0] == runs[1], trial


# ------------------------------------------------------------------ inner steps, outer optimiser, probe
def test_inner_micro_batch_losses_are_divided_by_grad_accum_even_in_a_short_chunk(tiny_config,
                                                                                  monkeypatch):
    from aimm.methods.baselines import SeqLoRA
    from aimm.schedule import plan_optimizer_steps

    checked = []

    def capture(self, ctx):  # grads before clipping (max_grad_norm is huge)
        examples = ctx.data[ctx.stage.name].train
        train = EncodedExamples.from_texts(ctx.tokenizer, [e.input for e in examples],
                                           [e.output for e in examples], is_seq2seq=False,
                                           max_input_len=64, max_target_len=128)
        plan = plan_optimizer_steps(len(train), 4, 4, 1, ctx.cfg.seed + 1000 * ctx.stage.index)
        params = ctx.lora_params()
        expected = {n: torch.zeros_like(p) for n, p in params.items()}
        for micro in plan[ctx.step - 1]:  # Trainer.training_step: loss / accumulation steps
            loss = lm_loss(ctx.model, train.batch(micro), False) / 4
            for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
                expected[n] += g
        for n, p in params.items():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-10)
        checked.append(len(plan[ctx.step - 1]))

    monkeypatch.setattr(SeqLoRA, "before_optimizer_step", capture)
    run(tiny_config(method="seq_lora", tasks=["sst-2"], max_train=12, grad_accum=4,
                    lora_dropout=0.0, max_grad_norm=1e9))
    assert checked == [3]  # 3 micro-batches of 4 <= accum: one step, still divided by 4


def test_release_outer_scheduler_would_leave_the_separate_optimizer_at_lr_0():
    from transformers import get_linear_schedule_with_warmup

    from aimm.methods import build_method

    ctx = make_ctx(1, 1e9)
    # trainer.py::create_outer_optimizer_and_scheduler: AdamW(outer_lr) + a warmup scheduler
    # (warmup_steps 50, 200 steps) that is never stepped -> the optimiser's lr stays at 0
    release_outer = torch.optim.AdamW(list(ctx.lora_params().values()), lr=1e-3)
    get_linear_schedule_with_warmup(release_outer, num_warmup_steps=50, num_training_steps=200)
    assert release_outer.param_groups[0]["lr"] == 0.0
    method = build_method(ctx.cfg.replace(method="aimmerging",
                                         method_options={"outer_optimizer": "separate", "outer_lr": 1e-3}))
    method.on_stage_start(ctx)  # ours: its own AdamW at a constant outer_lr
    assert method.outer_opt.param_groups[0]["lr"] == 1e-3
    before = {n: p.detach().clone() for n, p in ctx.lora_params().items()}
    grads = rehearsal_grads(ctx, method.outer_opt)
    for n, p in ctx.lora_params().items():
        big = grads[n].abs() > 1e-6
        torch.testing.assert_close((p.detach() - before[n])[big], -1e-3 * grads[n][big].sign(),
                                   rtol=1e-2, atol=1e-7)


def test_probe_runs_without_gradients_in_train_mode_by_default():
    ctx = make_ctx(1, 1.0, dropout=0.5)  # LoRA dropout: what the probe mode decides about
    with torch.no_grad():  # a non-zero B, so LoRA (and its dropout) changes the output
        for name, p in ctx.lora_params().items():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    ctx.memory_rng = random.Random(1)
    evals = [ctx.forgetting_signal("eval") for _ in range(2)]
    ctx.memory_rng = random.Random(1)
    trains = [ctx.forgetting_signal("train") for _ in range(2)]
    ctx.memory_rng = random.Random(1)
    assert [ctx.forgetting_signal("eval") for _ in range(2)] == evals  # dropout off: deterministic
    assert trains != evals  # training_step_no_grad: model.train(), dropout on
    assert all(p.grad is None for p in ctx.lora_params().values()) and ctx.model.training
