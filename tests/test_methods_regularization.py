"""The training-time continual-learning methods ewc, agem and lwf: their defining behaviour.

Hook-level checks use a hand-built :class:`TrainContext` on the tiny models; end-to-end checks
run the engine (or the CLI) on the tiny benchmark of ``conftest``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from aimm.cli import main
from aimm.encoding import EncodedExamples
from aimm.errors import ConfigError
from aimm.loss import lm_loss, target_logits
from aimm.methods import METHODS, build_method
from aimm.methods import functional as fn
from aimm.methods.agem import AGEM, reference_gradient
from aimm.methods.ewc import EWC
from aimm.methods.lwf import LwF
from aimm.runs import load_metrics, load_scores_matrix, load_trajectory
from aimm.training.context import Stage, TrainContext
from aimm.training.engine import Engine, run

NEW = ("ewc", "agem", "lwf")


# ------------------------------------------------------------------------------ helpers
def tiny_ctx(tiny_config, model="tiny-causal", memory=False):
    """A TrainContext on a tiny model with a LoRA adapter (no dropout) and, optionally, a memory."""
    from accelerate import Accelerator

    from aimm.models import attach_lora, load_model

    cfg = tiny_config(model=model, lora_dropout=0.0)
    bundle = attach_lora(load_model(model, seed=0), r=cfg.lora_r, alpha=cfg.lora_alpha,
                         dropout=0.0, targets=cfg.lora_targets)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0: move it so the adapter does something
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ctx = TrainContext(cfg=cfg, model=bundle.model, tokenizer=bundle.tokenizer,
                       is_seq2seq=bundle.is_seq2seq, accelerator=Accelerator(cpu=True), data={},
                       stage=Stage(1, "b", ("b",), ("a", "b")))
    if memory:
        ctx.memory = encode(ctx, ["the cat sat", "a dog ran far", "birds sing", "rain falls"],
                            ["yes", "no", "yes", "no"])
    return ctx


def encode(ctx, inputs, outputs) -> EncodedExamples:
    return EncodedExamples.from_texts(ctx.tokenizer, inputs, outputs, is_seq2seq=ctx.is_seq2seq,
                                      max_input_len=64, max_target_len=8)


def a_batch(ctx):
    return encode(ctx, ["review: great film", "review: dull plot"], ["positive", "negative"]).batch([0, 1])


def snapshot(ctx):
    return {k: p.detach().clone() for k, p in ctx.lora_params().items()}


def crash_after_first_task_then_resume(tiny_config, tmp_path, monkeypatch, method, **changes):
    """``(uninterrupted run dir, resumed run dir)``: the second run is killed while evaluating
    task 2 (task 1 complete), then resumed with the same config."""
    full = run(tiny_config(method=method, run_dir=str(tmp_path / "full"), **changes))
    original = Engine._evaluate

    def crash_in_second_stage(self, ctx, stage, *a, **k):
        if stage.index == 1:
            raise KeyboardInterrupt("simulated kill")
        return original(self, ctx, stage, *a, **k)

    cfg = tiny_config(method=method, run_dir=str(tmp_path / "resumed"), **changes)
    monkeypatch.setattr(Engine, "_evaluate", crash_in_second_stage)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(Engine, "_evaluate", original)
    assert json.loads((tmp_path / "resumed" / "state.json").read_text())["completed"] == ["sst-2"]
    return full, run(cfg)


def assert_same_run(a, b):
    assert load_metrics(a) == load_metrics(b)
    pd.testing.assert_frame_equal(load_scores_matrix(a), load_scores_matrix(b))
    pd.testing.assert_frame_equal(load_trajectory(a)[0], load_trajectory(b)[0])
    for name in ("adapter.safetensors", "method_state.safetensors"):
        x, y = (load_file(str(d / "stages" / "02_agnews" / name)) for d in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def stage_losses(run_dir, task="agnews"):
    steps = load_trajectory(run_dir)[0]
    return steps[steps["task"] == task]["loss"].tolist()


# ------------------------------------------------------------------------------ EWC
def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_the_fisher_and_the_distance(tiny_config):
    ctx = tiny_ctx(tiny_config)
    ewc = EWC(EWC.parse_options({"ewc_lambda": 2.0}))
    assert ewc.extra_loss(ctx, None) is None  # the first task: no penalty
    params = ctx.lora_params()
    ewc.anchor = snapshot(ctx)
    ewc.fisher = {k: torch.rand_like(p) + 0.1 for k, p in params.items()}
    assert float(ewc.extra_loss(ctx, None).detach()) == 0.0  # at θ*
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1)
    near = float(ewc.extra_loss(ctx, None).detach())
    assert near > 0
    ewc.fisher = {k: 3 * v for k, v in ewc.fisher.items()}
    assert float(ewc.extra_loss(ctx, None).detach()) == pytest.approx(3 * near, rel=1e-5)  # linear in F
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1)  # twice as far from θ*
    assert float(ewc.extra_loss(ctx, None).detach()) == pytest.approx(4 * 3 * near, rel=1e-4)
    penalty = ewc.extra_loss(ctx, None)
    penalty.backward()  # differentiable: its gradient is λ F (θ - θ*)
    want = fn.ewc_penalty_grad(params, ewc.anchor, ewc.fisher, 2.0)
    for k, p in params.items():
        torch.testing.assert_close(p.grad, want[k])


def test_ewc_fisher_is_the_mean_of_per_example_squared_gradients(tiny_config):
    ctx = tiny_ctx(tiny_config)
    examples = [SimpleNamespace(input=f"text {i} words", output=("yes", "no")[i % 2]) for i in range(5)]
    ctx.data = {"b": SimpleNamespace(train=examples)}
    ewc = EWC(EWC.parse_options({"fisher_samples": 5, "gamma": 0.5}))
    ewc.on_stage_end(ctx)
    params = ctx.lora_params()
    enc = encode(ctx, [e.input for e in examples], [e.output for e in examples])
    per_example = []
    for i in range(5):
        ctx.model.zero_grad()
        lm_loss(ctx.model, enc.batch([i]), False).backward()
        per_example.append({k: p.grad.clone() for k, p in params.items()})
    want = fn.fisher_diagonal(per_example)
    for k in params:
        torch.testing.assert_close(ewc.fisher[k], want[k])
        assert torch.equal(ewc.anchor[k], params[k].detach())
    # per example, not the square of the batch-mean gradient (Jensen: strictly larger overall)
    mean_sq = sum(float(sum(g[k] for g in per_example).div(5).pow(2).sum()) for k in params)
    assert sum(float(v.sum()) for v in ewc.fisher.values()) > 1.05 * mean_sq
    old = {k: v.clone() for k, v in ewc.fisher.items()}
    ewc.on_stage_end(ctx)  # same weights, same data: F <- 0.5 F + F
    for k in params:
        torch.testing.assert_close(ewc.fisher[k], 1.5 * old[k])


def test_ewc_fisher_and_anchor_are_saved_and_a_resumed_run_equals_an_uninterrupted_one(
        tiny_config, tmp_path, monkeypatch):
    loaded = []
    original = EWC.load_stage_state
    monkeypatch.setattr(EWC, "load_stage_state",
                        lambda self, state, model: (loaded.append(state), original(self, state, model)))
    full, resumed = crash_after_first_task_then_resume(tiny_config, tmp_path, monkeypatch, "ewc")
    assert_same_run(full, resumed)
    saved = load_file(str(full / "stages" / "01_sst-2" / "method_state.safetensors"))
    assert len(loaded) == 1
    for k, v in loaded[0]["fisher"].items():
        assert torch.equal(v, saved[next(t for t in saved if torch.equal(saved[t], v))])
    fisher = loaded[0]["fisher"]
    assert all((v >= 0).all() for v in fisher.values()) and sum(float(v.sum()) for v in fisher.values()) > 0
    adapter = load_file(str(full / "stages" / "01_sst-2" / "adapter.safetensors"))
    assert set(loaded[0]["anchor"]) == set(adapter)
    assert all(torch.equal(loaded[0]["anchor"][k], adapter[k]) for k in adapter)  # θ* = task-1 end
    # the penalty acts: task 2 trains differently from plain LoRA (so the equality above needed it)
    plain = run(tiny_config(method="seq_lora", run_dir=str(tmp_path / "plain")))
    assert stage_losses(plain, "sst-2") == stage_losses(full, "sst-2")
    assert stage_losses(plain) != stage_losses(full)


# ------------------------------------------------------------------------------ A-GEM
def test_agem_projects_a_conflicting_gradient_onto_the_reference_halfspace(tiny_config):
    ctx = tiny_ctx(tiny_config, memory=True)
    ctx.memory_rng.seed(0)
    agem = AGEM(AGEM.parse_options({"reference_batch_size": 2}))
    params = ctx.lora_params()
    state = ctx.memory_rng.getstate()
    ref = reference_gradient(ctx, params, 2)
    for k, p in params.items():  # a gradient that opposes the memory's: g = -ref + noise
        p.grad = -ref[k] + 0.01 * torch.randn_like(p)
    assert float(fn.dot({k: p.grad for k, p in params.items()}, ref)) < 0
    ctx.memory_rng.setstate(state)  # the hook draws the same memory batch
    agem.before_optimizer_step(ctx)
    assert agem.projected is True
    after = fn.dot({k: p.grad for k, p in params.items()}, ref)
    scale = float(fn.dot(ref, ref)) ** 0.5 * sum(float(p.grad.pow(2).sum()) for p in params.values()) ** 0.5
    assert float(after) >= -1e-5 * scale
    record = {}
    agem.after_step(ctx, record)
    assert record["agem_projected"] == 1
    # an agreeing gradient is left alone
    for k, p in params.items():
        p.grad = ref[k].clone()
    ctx.memory_rng.setstate(state)
    agem.before_optimizer_step(ctx)
    assert agem.projected is False and all(torch.equal(p.grad, ref[k]) for k, p in params.items())


class ConflictingAGEM(AGEM):
    """A-GEM forced into conflicts: task 2 trains on the memory itself with its loss negated
    (gradient ascent on the earlier task); after every hook, the step's gradient and the
    hook's reference gradient (same memory batch) are compared."""

    name = "toy_agem_conflict"
    cosines: list = []

    def training_examples(self, ctx, stage):
        return list(ctx.memory_examples) if ctx.has_memory else super().training_examples(ctx, stage)

    def before_optimizer_step(self, ctx):
        before = ctx.memory_rng.getstate()
        grads = {k: p.grad.clone() for k, p in ctx.lora_params().items() if p.grad is not None}
        super().before_optimizer_step(ctx)
        if self.projected is None:
            return
        after = ctx.memory_rng.getstate()
        ctx.memory_rng.setstate(before)
        params = {k: p for k, p in ctx.lora_params().items() if p.grad is not None}
        ref = reference_gradient(ctx, params, self.options.reference_batch_size)
        assert ctx.memory_rng.getstate() == after
        projected = {k: p.grad for k, p in params.items()}
        # g̃ᵀg_ref relative to |g| |g_ref| (g before the hook: g̃ may be ~0)
        norm = (float(fn.dot(ref, ref)) * float(fn.dot(grads, grads))) ** 0.5
        ConflictingAGEM.cosines.append(float(fn.dot(projected, ref)) / norm)


def test_agem_projects_in_a_run_with_conflicts_and_never_leaves_a_negative_dot_product(
        tiny_config, monkeypatch):
    monkeypatch.setitem(METHODS, ConflictingAGEM.name, ConflictingAGEM)
    ConflictingAGEM.cosines.clear()
    # the reference batch (2) is a part of the memory (4) the step trains on: g ≠ -g_ref
    engine = Engine(tiny_config(method=ConflictingAGEM.name, lora_dropout=0.0,
                                method_options={"reference_batch_size": 2}))
    engine.loss_hook = lambda ctx, loss: -loss if ctx.stage.index == 1 else loss
    steps = load_trajectory(engine.run())[0]
    task2 = steps[steps["task"] == "agnews"]
    assert steps[steps["task"] == "sst-2"]["agem_projected"].isna().all()  # no memory in task 1
    assert task2["agem_projected"].notna().all() and task2["agem_projected"].sum() >= 1
    assert len(ConflictingAGEM.cosines) == len(task2)
    assert min(ConflictingAGEM.cosines) >= -1e-5


# ------------------------------------------------------------------------------ LwF
@pytest.mark.parametrize("model", ["tiny-causal", "tiny-seq2seq"])
def test_lwf_distillation_is_zero_when_teacher_is_student_and_positive_otherwise(tiny_config, model):
    ctx = tiny_ctx(tiny_config, model=model)
    ctx.model.eval()  # no dropout anywhere: student and teacher forwards are the same function
    batch = a_batch(ctx)
    lwf = LwF()
    student = snapshot(ctx)
    lwf.teacher = {k: v.clone() for k, v in student.items()}
    ce, kd = lwf.losses(ctx, batch)
    assert abs(float(kd.detach())) < 1e-6
    torch.testing.assert_close(ce, lm_loss(ctx.model, batch, ctx.is_seq2seq))  # the task loss
    lwf.teacher = {k: v + 0.3 * torch.randn_like(v) for k, v in student.items()}
    ce, kd = lwf.losses(ctx, batch)
    assert float(kd.detach()) > 1e-4
    # the teacher's logits are those of the model with the teacher's adapter; the student's
    # weights are back afterwards
    teacher_logits = lwf.teacher_logits(ctx, batch)
    assert all(torch.equal(p, student[k]) for k, p in ctx.lora_params().items())
    from aimm.models import load_lora_state_dict

    load_lora_state_dict(ctx.model, lwf.teacher)
    with torch.no_grad():
        torch.testing.assert_close(teacher_logits, target_logits(ctx.model, batch, ctx.is_seq2seq)[0])
    load_lora_state_dict(ctx.model, student)
    loss = lwf.inner_loss(ctx, batch)  # CE + weight * KD, differentiable in the student only
    torch.testing.assert_close(loss, ce + kd)
    loss.backward()
    assert all(p.grad is not None for p in ctx.lora_params().values())


def test_lwf_teacher_is_saved_and_restored_on_resume(tiny_config, tmp_path, monkeypatch):
    loaded = []
    original = LwF.load_stage_state
    monkeypatch.setattr(LwF, "load_stage_state",
                        lambda self, state, model: (loaded.append(state), original(self, state, model)))
    full, resumed = crash_after_first_task_then_resume(tiny_config, tmp_path, monkeypatch, "lwf")
    assert_same_run(full, resumed)
    adapter = load_file(str(full / "stages" / "01_sst-2" / "adapter.safetensors"))
    assert len(loaded) == 1 and set(loaded[0]["teacher"]) == set(adapter)
    assert all(torch.equal(loaded[0]["teacher"][k], adapter[k]) for k in adapter)  # task-1 adapter
    plain = run(tiny_config(method="seq_lora", run_dir=str(tmp_path / "plain")))
    assert stage_losses(plain, "sst-2") == stage_losses(full, "sst-2")
    # the distillation term acts in task 2: its gradient is 0 while student = teacher (steps 1-2,
    # the first at lr 0), so in these 4 warm-up steps it moves the adapter by little (~1e-7),
    # below what the recorded losses show, but it moves every tensor
    tail = "stages/02_agnews/adapter.safetensors"
    plain_b, full_b = load_file(str(plain / tail)), load_file(str(full / tail))
    assert all(not torch.equal(plain_b[k], full_b[k]) for k in plain_b)


# ------------------------------------------------------------------------------ all three
@pytest.mark.parametrize("model", ["tiny-causal", "tiny-seq2seq"])
@pytest.mark.parametrize("method", NEW)
def test_aimm_run_completes_on_the_tiny_models(tiny_config, tmp_path, method, model, capsys):
    cfg = tiny_config(max_train=8, max_test=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if v is not None}))
    run_dir = tmp_path / "r"
    assert main(["run", "--config", str(path), "--method", method, "--model", model,
                 "--run-dir", str(run_dir)]) == 0
    metrics = load_metrics(run_dir)
    assert metrics["complete"] is True and {"OP", "BWT"} <= set(metrics)
    assert (run_dir / "stages" / "01_sst-2" / "method_state.json").is_file() == (method != "agem")


def test_aimm_methods_lists_every_method_with_its_description(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == list(METHODS)
    assert all(line.count("\t") == 1 and line.split("\t")[1].strip() for line in lines)
    assert "ewc\tOnline EWC (Kirkpatrick et al. 2017" in "\n".join(lines)


def test_method_facts_are_distinct():
    colors = [cls.color for cls in METHODS.values()]
    assert len(set(colors)) == len(colors)
    assert AGEM.uses_memory and not EWC.uses_memory and not LwF.uses_memory
    assert all(METHODS[m].sequential() for m in NEW)


@pytest.mark.parametrize("method, options, message", [
    ("ewc", {"ewc_lambda": -1}, "ewc_lambda=-1: must be a finite number >= 0"),
    ("ewc", {"ewc_lambda": "big"}, "ewc_lambda='big': must be a number, not a string"),
    ("ewc", {"gamma": 1.5}, "gamma=1.5: must be in [0, 1]"),
    ("ewc", {"fisher_samples": 0}, "fisher_samples=0: must be an integer >= 1"),
    ("agem", {"reference_batch_size": 0}, "reference_batch_size=0: must be an integer >= 1"),
    ("lwf", {"temperature": 0}, "temperature=0: must be a finite number > 0"),
    ("lwf", {"weight": -0.5}, "weight=-0.5: must be a finite number >= 0"),
    ("lwf", {"temprature": 2}, "unknown option 'temprature'"),
])
def test_bad_options_give_one_clear_config_error(tiny_config, tmp_path, capsys, method, options, message):
    with pytest.raises(ConfigError) as exc:
        build_method(tiny_config(method=method, method_options=options))
    assert str(exc.value).startswith("config: method_options: ") and message in str(exc.value)
    key, value = next(iter(options.items()))
    assert main(["run", "--method", method, "-o", f"{key}={json.dumps(value)}",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "r").exists()


def test_train_overhead_settings_methods_measures_every_other_sequential_method():
    from benchmarks.train_overhead import expand_settings, variant_name, variant_options

    settings = expand_settings("release,fast,methods")
    assert settings[:2] == ["release", "fast"] and set(NEW) <= set(settings[2:])
    assert not {"seq_lora", "aimmerging", "mtl", "single_task"} & set(settings[2:])
    args = SimpleNamespace(initial_interval=4, option={})
    assert variant_options("ewc", args) == ("ewc", {})
    assert variant_options("fast", args) == ("aimmerging", {"initial_interval": 4, "fast": True})
    assert [variant_name(s) for s in ("release", "lwf")] == ["aimmerging_release", "lwf"]
    with pytest.raises(SystemExit, match="unknown setting 'mtl'"):
        variant_options("mtl", args)
