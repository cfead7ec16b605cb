"""``seq_ft`` (full fine-tuning) and ``progprompt`` (Progressive Prompts on PEFT's prompt tuning).

seq_ft: every weight trains, the stage's weights are saved (safetensors) and restored on resume,
``aimm export`` writes the full model. progprompt: only the new prompt trains (base and earlier
prompts bitwise unchanged), the loss and label scoring see the virtual tokens PEFT prepends, the
stage's adapter is a plain PEFT prompt-tuning adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aimm.cli import main
from aimm.training.method_state import read_method_state
from aimm.methods import METHODS
from aimm.methods.progprompt import ProgPrompt, prompt_order
from aimm.methods.seq_ft import SeqFT
from aimm.models import load_model
from aimm.runs import load_metrics, load_scores_matrix
from aimm.training import engine
from aimm.training.engine import run

STAGES = ("01_sst-2", "02_agnews")


def weights(run_dir, stage):
    return read_method_state(run_dir / "stages" / stage)


def crash_then_resume(cfg, monkeypatch):
    """Kill the run while it evaluates stage 2 (stage 1 complete), then resume it."""
    original = engine.Engine._evaluate

    def crash(self, ctx, stage, *a, **k):
        if stage.index == 1:
            raise KeyboardInterrupt("simulated kill")
        return original(self, ctx, stage, *a, **k)

    monkeypatch.setattr(engine.Engine, "_evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(engine.Engine, "_evaluate", original)
    assert json.loads((Path(cfg.run_dir) / "state.json").read_text())["completed"] == ["sst-2"]
    return run(cfg)


# ------------------------------------------------------------------------------ seq_ft
def test_seq_ft_trains_every_weight_and_saves_them_per_stage(tiny_config, tmp_path):
    cfg = tiny_config(method="seq_ft")
    bundle = SeqFT().setup_model(load_model("tiny-causal", seed=cfg.seed), cfg)
    params = list(bundle.model.parameters())
    assert SeqFT().trainable_parameters(bundle.model) == params  # every parameter, no LoRA
    base = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    run_dir = run(cfg)
    one, two = (weights(run_dir, s)["weights"] for s in STAGES)
    assert set(one) == set(base)
    changed = [n for n in base if not torch.equal(two[n], base[n])]
    assert len(changed) == len(base)  # every weight moved (embeddings, norms, projections)
    assert any(not torch.equal(one[n], two[n]) for n in base)  # task 2 trained further
    for stage in STAGES:
        folder = run_dir / "stages" / stage
        assert not (folder / "adapter").exists()  # no PEFT adapter for a full fine-tune
        assert load_file(str(folder / "adapter.safetensors")) == {}
        assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.pt"))
    sums = json.loads((run_dir / "state.json").read_text())["sha256"]
    assert "stages/02_agnews/method_state.safetensors" in sums


def test_seq_ft_resume_after_a_task_equals_the_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    full = run(tiny_config(method="seq_ft", run_dir=str(tmp_path / "full")))
    resumed = crash_then_resume(tiny_config(method="seq_ft", run_dir=str(tmp_path / "res")),
                                monkeypatch)
    assert load_metrics(resumed) == load_metrics(full)
    assert load_scores_matrix(resumed).equals(load_scores_matrix(full))
    a, b = weights(full, STAGES[1])["weights"], weights(resumed, STAGES[1])["weights"]
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_seq_ft_resume_within_a_stage_from_its_checkpoint(tiny_config, tmp_path, monkeypatch):
    import aimm.training.loop as loop

    full = run(tiny_config(method="seq_ft", run_dir=str(tmp_path / "full")))
    cfg = tiny_config(method="seq_ft", run_dir=str(tmp_path / "res"), checkpoint_every=1)
    calls = {"n": 0}

    def crash_at_step_6(point):  # stage 2, step 2: its checkpoint after step 1 exists
        if point == "train_step":
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(loop, "crash_point", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    ckpt = tmp_path / "res" / "checkpoints"
    assert any(ckpt.glob("*.safetensors"))
    monkeypatch.undo()
    resumed = run(cfg)
    stage = json.loads((resumed / "stages" / STAGES[1] / "stage.json").read_text())
    assert stage["resumed_within_stage"] == 1
    a, b = weights(full, STAGES[1])["weights"], weights(resumed, STAGES[1])["weights"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert load_metrics(resumed) == load_metrics(full)


def test_seq_ft_non_finite_weights_stop_the_stage(tiny_config, monkeypatch):
    from aimm.integrity import NonFiniteWeightsError

    class Broken(SeqFT):
        name = "toy_broken_ft"

        def on_stage_end(self, ctx):
            with torch.no_grad():
                next(iter(ctx.model.parameters()))[0, 0] = float("nan")

    monkeypatch.setitem(METHODS, Broken.name, Broken)
    with pytest.raises(NonFiniteWeightsError, match="stage sst-2"):
        run(tiny_config(method="toy_broken_ft"))


def test_seq_ft_export_writes_the_full_model(tiny_config, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir = run(tiny_config(method="seq_ft"))
    assert main(["export", str(run_dir), str(tmp_path / "out"), "--stage", "1"]) == 0
    printed = capsys.readouterr().out
    assert "merged model:" in printed and "PEFT adapter: none (this method trains no adapter)" in printed
    assert not (tmp_path / "out" / "adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    want = weights(run_dir, STAGES[0])["weights"]
    got = dict(model.named_parameters())
    assert all(torch.equal(got[n].detach(), want[n]) for n in want)


# ------------------------------------------------------------------------------ progprompt
class SpyPrompt(ProgPrompt):
    """Records the prompts and the base weights at every stage start and end."""

    name = "toy_progprompt_spy"
    seen: list = []

    def _record(self, ctx, when):
        base = {n: p.detach().clone() for n, p in ctx.model.named_parameters()
                if "prompt_encoder" not in n}
        SpyPrompt.seen.append((when, ctx.stage.index, self.weight.detach().clone(), base))

    def on_stage_start(self, ctx):
        super().on_stage_start(ctx)
        self._record(ctx, "start")

    def on_stage_end(self, ctx):
        self._record(ctx, "end")


def test_prompt_order_is_newest_first():
    assert prompt_order(0, 2).tolist() == [0, 1]
    assert prompt_order(2, 2).tolist() == [4, 5, 2, 3, 0, 1]


@pytest.mark.parametrize("model", ["tiny-causal", "tiny-seq2seq"])
def test_progprompt_trains_only_the_new_prompt(tiny_config, monkeypatch, model):
    monkeypatch.setitem(METHODS, SpyPrompt.name, SpyPrompt)
    SpyPrompt.seen.clear()
    run_dir = run(tiny_config(method=SpyPrompt.name, model=model))
    (_, _, w0, base0), (_, _, w1, base1), (_, _, w2, _), (_, _, w3, base3) = SpyPrompt.seen
    n = ProgPrompt.Options().prompt_length
    assert w0.shape[0] == 2 * n  # one prompt per task
    assert not torch.equal(w1[:n], w0[:n]) and torch.equal(w1[n:], w0[n:])  # stage 1: P_1 only
    assert torch.equal(w2, w1)
    assert torch.equal(w3[:n], w1[:n]) and not torch.equal(w3[n:], w1[n:])  # stage 2: P_2 only
    for base in (base1, base3):  # the base model bitwise unchanged
        assert base.keys() == base0.keys() and all(torch.equal(base[k], base0[k]) for k in base0)
    # the stage's PEFT adapter: exactly [P_k; ...; P_1]
    for k, (stage, w) in enumerate(zip(STAGES, (w1, w3))):
        folder = run_dir / "stages" / stage / "adapter"
        assert json.loads((folder / "adapter_config.json").read_text())["num_virtual_tokens"] == n * (k + 1)
        saved = load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]
        assert torch.equal(saved, w[prompt_order(k, n)])
        assert torch.equal(weights(run_dir, stage)["prompts"], w)


def _prompted(model_spec, stage=1, length=3):
    """A tiny model under ProgPrompt at ``stage`` (0-based) of 2 tasks, its prompts made random."""
    from types import SimpleNamespace

    method = ProgPrompt(ProgPrompt.parse_options({"prompt_length": length}))
    bundle = method.setup_model(load_model(model_spec, seed=0),
                                SimpleNamespace(task_names=lambda: ["a", "b"]))
    with torch.no_grad():
        method.weight.normal_(generator=torch.Generator().manual_seed(1))
    method._activate(stage)
    bundle.model.eval()
    return method, bundle


def _batch(bundle, prompts, targets):
    from aimm.encoding import EncodedExamples

    enc = EncodedExamples.from_texts(bundle.tokenizer, prompts, targets,
                                     is_seq2seq=bundle.is_seq2seq, max_input_len=64, max_target_len=16)
    return enc.batch(list(range(len(prompts))))


@pytest.mark.parametrize("model", ["tiny-causal", "tiny-seq2seq"])
def test_progprompt_loss_sees_the_prepended_prompt(model):
    """The engine's loss (target masking, ``logits_to_keep`` tail) on the PEFT model equals the
    cross-entropy of the base model fed [P_2; P_1; E(x)] by hand."""
    import torch.nn.functional as F

    from aimm.loss import lm_loss

    method, bundle = _prompted(model)
    batch = _batch(bundle, ["a short prompt", "another, longer prompt here"], ["yes", "no way"])
    got = method.inner_loss(SimpleCtx(bundle), batch)
    base = bundle.model.get_base_model()
    prompt = method.weight[prompt_order(1, 3)]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    embeds = torch.cat([prompt.expand(len(ids), -1, -1), base.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(len(ids), prompt.shape[0], dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        if bundle.is_seq2seq:
            want = base(inputs_embeds=embeds, attention_mask=full_mask, labels=labels).loss
        else:
            logits = base(inputs_embeds=embeds, attention_mask=full_mask).logits
            padded = torch.cat([torch.full((len(ids), prompt.shape[0]), -100), labels], dim=1)
            want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   padded[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # without the prompt the loss differs: the test would notice a prompt that is not prepended
    assert abs(float(lm_loss(base, batch, bundle.is_seq2seq)) - float(want)) > 1e-4


class SimpleCtx:
    def __init__(self, bundle):
        self.model, self.is_seq2seq = bundle.model, bundle.is_seq2seq


@pytest.mark.parametrize("strategy", ["packed", "full"])
@pytest.mark.parametrize("model", ["tiny-causal", "tiny-seq2seq"])
def test_progprompt_label_scoring_matches_the_training_loss(model, strategy):
    """label_logprobs on the prompted model = - (loss x target tokens) of each (input, option),
    through either path: "packed" (one base-model forward per group of prompts, the soft prompt
    fed as input embeddings; seq2seq: one encoder pass per prompt) and "full" (PEFT's forward on
    one row per pair). Two prompts of different lengths: left padding in the packed rows."""
    from aimm.encoding import IGNORE_INDEX
    from aimm.evaluation.label_scoring import label_logprobs

    method, bundle = _prompted(model)
    prompts, options = ["first input", "the second, longer input"], ["positive", "negative", "x"]
    base = bundle.model.get_base_model()
    rows = []  # the batch size of every base-model forward (the encoder's, for seq2seq)
    counted = base.get_encoder() if bundle.is_seq2seq else base
    hook = counted.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(
            (kwargs.get("input_ids") if kwargs.get("input_ids") is not None
             else kwargs["inputs_embeds"]).shape[0]), with_kwargs=True)
    try:
        table = label_logprobs(bundle.model, bundle.tokenizer, prompts, options,
                               is_seq2seq=bundle.is_seq2seq, batch_size=2, max_input_len=64,
                               strategy=strategy)
    finally:
        hook.remove()
    shared = strategy == "packed" or bundle.is_seq2seq  # seq2seq ignores the strategy
    assert rows == ([len(prompts)] if shared else [len(prompts) * len(options)])
    for i, p in enumerate(prompts):
        for j, o in enumerate(options):
            batch = _batch(bundle, [p], [o])
            with torch.no_grad():
                loss = method.inner_loss(SimpleCtx(bundle), batch)
            n = int((batch["labels"] != IGNORE_INDEX).sum())  # the option's tokens, EOS included
            assert table[i][j] == pytest.approx(-float(loss) * n, abs=1e-4)


@pytest.mark.parametrize("model", ["tiny-causal", "tiny-seq2seq"])
def test_progprompt_resume_after_a_task_equals_the_uninterrupted_run(tiny_config, tmp_path,
                                                                     monkeypatch, model):
    full = run(tiny_config(method="progprompt", model=model, run_dir=str(tmp_path / "full")))
    resumed = crash_then_resume(tiny_config(method="progprompt", model=model,
                                            run_dir=str(tmp_path / "res")), monkeypatch)
    assert load_metrics(resumed) == load_metrics(full)
    assert torch.equal(weights(resumed, STAGES[1])["prompts"], weights(full, STAGES[1])["prompts"])


def test_progprompt_export_writes_the_prompt_adapter_only(tiny_config, tmp_path, capsys):
    from peft import PeftModel

    run_dir = run(tiny_config(method="progprompt"))
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "PEFT adapter:" in printed and "merged model: none" in printed
    assert not (tmp_path / "out" / "merged").exists()
    model = PeftModel.from_pretrained(load_model("tiny-causal", seed=42).model,
                                      str(tmp_path / "out" / "adapter"))
    stage = weights(run_dir, STAGES[1])["prompts"]
    got = model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(got, stage[prompt_order(1, ProgPrompt.Options().prompt_length)])


# ------------------------------------------------------------------------------ both
@pytest.mark.parametrize("method", ["seq_ft", "progprompt"])
@pytest.mark.parametrize("model", ["tiny-causal", "tiny-seq2seq"])
def test_aimm_run_completes(tiny_data, tmp_path, method, model):
    run_dir = tmp_path / "r"
    assert main(["run", "--method", method, "--model", model, "--benchmark", "long_sequence",
                 "--tasks", "sst-2,agnews", "--data-dir", str(tiny_data), "--max-train", "8",
                 "--max-test", "4", "--batch-size", "4", "--eval-mode", "label_scoring",
                 "--run-dir", str(run_dir), "--no-progress"]) == 0
    metrics = load_metrics(run_dir)
    assert metrics["complete"] and metrics["stages_done"] == 2


@pytest.mark.parametrize("argv, needle", [
    (["--method", "progprompt", "--option", "prompt_length=0"], "prompt_length=0: must be an integer >= 1"),
    (["--method", "progprompt", "--option", "lr=-1"], "lr=-1: must be a number > 0"),
    (["--method", "progprompt", "--option", "init=text"], "init='text': choose sample_vocab or random"),
    (["--method", "progprompt", "--option", "promt_length=5"], "did you mean 'prompt_length'"),
    (["--method", "seq_ft", "--option", "lr=1"], "seq_ft: unknown option 'lr'; this method has no options"),
])
def test_bad_options_end_in_one_clear_line(tmp_path, capsys, argv, needle):
    assert main(["run", *argv, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "method_options" in err
    assert not (tmp_path / "r").exists()


def test_method_facts():
    for cls in (SeqFT, ProgPrompt):
        assert METHODS[cls.name] is cls and cls.description and cls.display_name
    colours = [c.color for c in METHODS.values()]
    assert len(set(colours)) == len(colours)
    assert SeqFT.peft_adapter is False and ProgPrompt.peft_adapter is True
