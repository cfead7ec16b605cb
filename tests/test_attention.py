"""``attention_dtype``: float32 attention for a bf16 model (aimm.attention), and the config field."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aimm.attention import FLOAT32_SDPA, honours_4d_mask, set_attention_dtype
from aimm.models import attach_lora, load_model

TEXTS = ["Classify: the film was wonderful and moving.\nAnswer: positive",
         "Is it spam? win a prize now\nAnswer: yes"]


class AttentionDtypes(TorchDispatchMode):
    """The dtype of the query every aten attention kernel receives, and the dtypes of the mms."""

    def __init__(self) -> None:
        super().__init__()
        self.attention: list[torch.dtype] = []
        self.mm: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name and "backward" not in name:
            self.attention.append(args[0].dtype)
        elif name.startswith("aten.mm") or name.startswith("aten.addmm"):
            self.mm.add(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def forward(bundle, train: bool = False):
    ids = bundle.tokenizer(TEXTS, return_tensors="pt", padding=True)
    if train:
        return bundle.model(**ids).logits
    with torch.no_grad():
        return bundle.model(**ids).logits


def test_float32_attention_runs_the_kernel_in_float32_and_the_rest_in_bf16():
    b = load_model("tiny-causal", dtype=torch.bfloat16)
    with AttentionDtypes() as before:
        reference = forward(b)
    assert set(before.attention) == {torch.bfloat16}
    assert set_attention_dtype(b.model, "float32") is None
    assert b.model.config._attn_implementation == FLOAT32_SDPA
    with AttentionDtypes() as after:
        logits = forward(b)
    layers = b.model.config.num_hidden_layers
    assert after.attention == [torch.float32] * layers  # every layer's kernel
    assert after.mm == {torch.bfloat16}  # the projections stay in the weights' dtype
    assert logits.dtype == torch.bfloat16
    # the same model up to bf16 rounding of the attention (padding mask honoured)
    assert torch.allclose(logits.float(), reference.float(), atol=0.02), float((logits - reference).abs().max())


def test_float32_attention_trains_under_lora_and_changes_nothing_for_a_float32_model():
    b = attach_lora(load_model("tiny-causal", dtype=torch.bfloat16))
    set_attention_dtype(b.model.get_base_model(), "float32")
    b.model.train()
    forward(b, train=True).float().sum().backward()
    grads = [p.grad for p in b.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    f32 = load_model("tiny-causal")
    reference = forward(f32)
    assert set_attention_dtype(f32.model, "float32") is None
    assert torch.equal(forward(f32), reference)  # bit for bit


def test_packed_label_scoring_keeps_its_block_mask_under_float32_attention():
    from aimm.evaluation.label_scoring import label_logprobs

    b = load_model("tiny-causal", dtype=torch.bfloat16)
    set_attention_dtype(b.model, "float32")
    assert honours_4d_mask(b.model)
    prompts = ["Classify: the film was wonderful.\nAnswer:", "Topic: bank rates\nAnswer:"]
    options = ["positive", "negative", "business news"]
    packed = label_logprobs(b.model, b.tokenizer, prompts, options, is_seq2seq=False,
                            batch_size=2, strategy="packed")
    full = label_logprobs(b.model, b.tokenizer, prompts, options, is_seq2seq=False,
                          batch_size=2, strategy="full")
    assert torch.allclose(torch.as_tensor(packed), torch.as_tensor(full), atol=0.05)


def test_an_encoder_decoder_model_is_left_as_it_is_with_a_warning():
    b = load_model("tiny-seq2seq", dtype=torch.bfloat16)
    before = b.model.config._attn_implementation
    problem = set_attention_dtype(b.model, "float32")
    assert problem and "encoder-decoder" in problem and "attention_dtype" in problem
    assert b.model.config._attn_implementation == before
    assert set_attention_dtype(b.model, "model") is None
    with pytest.raises(ValueError, match="attention_dtype"):
        set_attention_dtype(b.model, "half")


def test_a_run_records_the_option_and_warns_when_it_cannot_apply(tiny_config):
    from aimm.engine import run
    from aimm.runs import load_warnings

    run_dir = run(tiny_config(tasks=["sst-2"], dtype="bfloat16", attention_dtype="float32"))
    assert json.loads((run_dir / "config.json").read_text())["attention_dtype"] == "float32"
    assert not any("attention_dtype" in w for w in load_warnings(run_dir))
    with pytest.warns(UserWarning, match="attention_dtype 'float32'.*encoder-decoder"):  # shown now
        seq2seq = run(tiny_config(tasks=["sst-2"], model="tiny-seq2seq", attention_dtype="float32",
                                  run_dir=str(run_dir.parent / "seq2seq")))
    assert any("attention_dtype" in w and "encoder-decoder" in w for w in load_warnings(seq2seq))


def test_a_run_written_before_the_field_existed_resumes_as_model_attention(tiny_config):
    """Its config.json lacks ``attention_dtype``: it reads as ``model`` (what it ran), so the
    run resumes instead of being refused as "a different config"."""
    from aimm.engine import run
    from aimm.runs import RunDirError, load_config

    cfg = tiny_config(method="seq_lora", tasks=["sst-2"])
    run_dir = run(cfg)
    path = run_dir / "config.json"
    stored = json.loads(path.read_text())
    del stored["attention_dtype"]
    path.write_text(json.dumps(stored))
    assert load_config(run_dir)["attention_dtype"] == "model"
    metrics = (run_dir / "metrics.json").read_text()
    assert run(cfg) == run_dir  # accepted: the finished run is read, not refused
    assert (run_dir / "metrics.json").read_text() == metrics
    with pytest.raises(RunDirError, match="attention_dtype: 'model' -> 'float32'"):
        run(tiny_config(method="seq_lora", tasks=["sst-2"], attention_dtype="float32"))


def test_an_unknown_attention_dtype_is_one_clear_line_and_exit_2(tmp_path, capsys):
    from aimm.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("attention_dtype: half\n")
    assert main(["run", "--config", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}: attention_dtype='half': choose model or float32" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_the_cli_flag_sets_the_field(tmp_path, capsys):
    from aimm.cli import main

    assert main(["run", "--attention-dtype", "fp16", "--run-dir", str(tmp_path / "r")]) == 2
    assert "attention_dtype='fp16': choose model or float32" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
