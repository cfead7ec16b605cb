"""The training loss: equal to the model's own loss, shape buckets, and no device-to-host reads."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from aimm.config import RunConfig
from aimm.encoding import IGNORE_INDEX, EncodedExamples, collate
from aimm.loss import lm_loss
from aimm.models import attach_lora, load_model

PROMPTS = ["Classify: the film was wonderful and moving.\nAnswer:", "Is it spam? win a prize now\nAnswer:",
           "Topic of: the central bank raised interest rates again today\nAnswer:"]
TARGETS = ["positive", "yes it is", "business"]

HOST_READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Records every tensor method that copies a value to the host (a sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", params=["tiny-causal", "tiny-seq2seq"])
def bundle(request):
    b = load_model(request.param)
    b.model.eval()  # T5 dropout off: values comparable across calls
    return b


def encoded(bundle, multiple: int = 1) -> EncodedExamples:
    return EncodedExamples.from_texts(bundle.tokenizer, PROMPTS, TARGETS, is_seq2seq=bundle.is_seq2seq,
                                      max_input_len=64, max_target_len=16, pad_to_multiple_of=multiple)


@pytest.mark.parametrize("multiple", [1, 64])
def test_lm_loss_equals_the_models_own_loss(bundle, multiple):
    batch = encoded(bundle, multiple).batch([0, 1, 2])
    reference = {k: v for k, v in encoded(bundle).batch([0, 1, 2]).items() if k != "logits_to_keep"}
    with torch.no_grad():
        expected = bundle.model(**reference).loss
        got = lm_loss(bundle.model, batch, bundle.is_seq2seq)
    assert got.dim() == 0
    assert torch.allclose(got, expected, atol=1e-5), (float(got), float(expected))


def test_padding_to_a_multiple_gives_few_shapes_and_a_host_side_logits_to_keep():
    tok = load_model("tiny-causal").tokenizer
    plain = EncodedExamples.from_texts(tok, PROMPTS, TARGETS, is_seq2seq=False, max_input_len=64,
                                       max_target_len=16)
    bucketed = EncodedExamples.from_texts(tok, PROMPTS, TARGETS, is_seq2seq=False, max_input_len=64,
                                          max_target_len=16, pad_to_multiple_of=64)
    for rows in ([0], [1], [2], [0, 1, 2]):
        a, b = plain.batch(rows), bucketed.batch(rows)
        longest_target = max(len(plain.target_ids[i]) for i in rows)
        assert a["logits_to_keep"] == longest_target + 1 and isinstance(a["logits_to_keep"], int)
        assert b["input_ids"].shape[1] == 64 and b["logits_to_keep"] % 8 == 0
        assert b["logits_to_keep"] >= longest_target + 1
        # the same labelled tokens, only more (unlabelled, masked) padding on the left
        assert (b["labels"] != IGNORE_INDEX).sum() == (a["labels"] != IGNORE_INDEX).sum()
        assert b["attention_mask"].sum() == a["attention_mask"].sum()
    seq2seq = collate([[1, 2, 3]], [[4, 5]], is_seq2seq=True, pad_id=0, pad_to_multiple_of=8)
    assert seq2seq["input_ids"].shape == (1, 8) and seq2seq["labels"].shape == (1, 8)
    assert "logits_to_keep" not in seq2seq


def test_lm_loss_reads_nothing_back_beyond_the_models_forward(bundle):
    """On a GPU a host read is a sync that stalls the kernel queue: lm_loss must add none."""
    batch = encoded(bundle).batch([0, 1, 2])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if bundle.is_seq2seq:
        inputs = dict(batch)
    else:
        inputs["logits_to_keep"] = batch["logits_to_keep"]
    with torch.no_grad():
        with HostReads() as forward_only:
            bundle.model(**inputs)
        with HostReads() as loss:
            lm_loss(bundle.model, batch, bundle.is_seq2seq)
    assert loss.calls == forward_only.calls
    if not bundle.is_seq2seq:  # the spy does see a read: a hand-made batch must derive K
        handmade = {k: v for k, v in batch.items() if k != "logits_to_keep"}
        with torch.no_grad(), HostReads() as derived:
            lm_loss(bundle.model, handmade, False)
        assert len(derived.calls) == len(forward_only.calls) + 1


def test_sequence_multiple_defaults_to_64_under_compile_only():
    assert RunConfig().sequence_multiple() == 1
    assert RunConfig(compile=True).sequence_multiple() == 64
    assert RunConfig(compile=True, pad_to_multiple_of=32).sequence_multiple() == 32
    assert RunConfig(pad_to_multiple_of=16).sequence_multiple() == 16


def test_width_buckets_mean_fewer_compiled_graphs():
    """torch.compile traces one graph per shape (then a dynamic one): buckets keep it at one."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    b = load_model("tiny-causal")
    prompts = [p + " extra words" * k for k, p in enumerate(PROMPTS * 2)]  # 6 distinct lengths
    graphs = {}
    for multiple in (1, 64):
        data = EncodedExamples.from_texts(b.tokenizer, prompts, TARGETS * 2, is_seq2seq=False,
                                          max_input_len=64, max_target_len=16,
                                          pad_to_multiple_of=multiple)
        torch._dynamo.reset()
        counters.clear()
        model = torch.compile(b.model, backend="eager")
        widths = set()
        with torch.no_grad():
            for i in range(len(prompts)):
                batch = data.batch([i])
                widths.add(batch["input_ids"].shape[1])
                lm_loss(model, batch, False)
        graphs[multiple] = (counters["stats"]["unique_graphs"], len(widths))
    torch._dynamo.reset()
    assert graphs[1][1] == 6 and graphs[64][1] == 1
    assert graphs[64][0] == 1 < graphs[1][0], graphs


def test_engine_runs_compiled_with_buckets_and_evaluates_eagerly(tiny_config):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from aimm.training.engine import run
    from aimm.runs import load_metrics

    cfg = tiny_config(method="aimmerging", method_options={"initial_interval": 2}, compile=True,
                      compile_backend="eager", max_train=8, eval_mode="label_scoring")
    torch._dynamo.reset()
    counters.clear()
    assert load_metrics(run(cfg))["complete"] is True
    # two graphs: the training step (rehearsal steps have the same shapes: batch 4, width 64)
    # and the no-grad probe. Label scoring would add a third without set_stance("force_eager").
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()


class AtenShapes(TorchDispatchMode):
    """Records the shape of every tensor that an aten op receives."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in [*args, *(kwargs or {}).values()]:
            if isinstance(a, torch.Tensor):
                self.shapes.add(tuple(a.shape))
        return func(*args, **(kwargs or {}))


def test_the_lm_head_on_the_target_tail_never_expands_its_weight_per_row():
    """``logits_to_keep`` as an int slices a non-contiguous tail; with the base frozen under LoRA
    the head then runs as a bmm against its (hidden x vocab) weight expanded once per row: a copy
    of the whole head per row and forward, in training and evaluation alike
    (``aimm.loss.last_positions``). The loss and label scoring must not do that."""
    from aimm.evaluation.label_scoring import label_logprobs
    from aimm.loss import last_positions

    b = attach_lora(load_model("tiny-causal"))  # as the engine trains and evaluates it
    hidden, vocab = b.model.config.hidden_size, b.model.config.vocab_size
    rows = len(PROMPTS)
    expanded = {(rows, hidden, vocab), (rows, vocab, hidden)}
    batch = encoded(b).batch([0, 1, 2])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep")}
    with AtenShapes() as spy:  # the spy sees the expansion when the int is passed
        b.model(**inputs, logits_to_keep=batch["logits_to_keep"]).logits.sum().backward()
    assert spy.shapes & expanded
    with AtenShapes() as loss_ops:
        lm_loss(b.model, batch, False).backward()
    assert not loss_ops.shapes & expanded
    with AtenShapes() as scoring_ops:
        label_logprobs(b.model, b.tokenizer, PROMPTS, TARGETS, is_seq2seq=False, batch_size=rows)
    assert not scoring_ops.shapes & expanded
    # generation: transformers' prefill passes logits_to_keep=1, a one-position tail that folds
    # into one mm without a copy (checked, so that it stays so)
    from aimm.evaluation.generation import generate

    with AtenShapes() as generation_ops:
        generate(b.model, b.tokenizer, PROMPTS, is_seq2seq=False, batch_size=rows, max_new_tokens=3)
    assert not generation_ops.shapes & expanded
    assert (rows, 1, vocab) in generation_ops.shapes  # the prefill's one-position logits
    with torch.no_grad():  # the same logits either way
        tail = b.model(**inputs, logits_to_keep=last_positions(4)).logits
        sliced = b.model(**inputs, logits_to_keep=4).logits
    assert tail.shape == sliced.shape and torch.allclose(tail, sliced, atol=1e-6)
