"""Scoring, batched greedy generation and label scoring on the tiny random models."""

from types import SimpleNamespace

import contextlib

import pytest
import torch

from aimm.encoding import encode_prompts, encode_targets, pad_batch
from aimm.evaluation import (
    EvalResult,
    evaluate_task,
    exact_match,
    generate,
    generate_one_by_one,
    label_logprobs,
    label_scores,
    max_new_tokens_for,
    normalize,
    rouge_l,
    score_predictions,
)
from aimm.models import attach_lora, load_model

WORDS = ["alpha", "beta", "gamma", "delta", "river", "house"]
PROMPTS = [
    f"Sentence {i}: " + " ".join(WORDS[(i * j) % 6] for j in range(n)) + "\nAnswer:"
    for i, n in enumerate((1, 5, 30, 2, 17, 60, 3, 9, 44, 0, 12, 7))
]
OPTIONS = ["Company", "Mean of Transportation", "Album", "Natural Place"]
NEW_TOKENS = 6


def _sharpen(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Re-draw the weight matrices with a larger std: the default init (0.02) makes the tiny
    models emit the same token whatever the prompt, which would make the comparisons vacuous."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)


@pytest.fixture(scope="module", params=["tiny-causal", "tiny-seq2seq"])
def bundle(request):
    b = load_model(request.param)
    _sharpen(b.model)
    return b


# ---------------------------------------------------------------- scoring


def test_normalize_and_exact_match():
    assert normalize("  Company \n") == "company"
    assert exact_match(" Company", "company") == 1.0
    assert exact_match("Company Ltd", "Company") == 0.0
    assert score_predictions(["A", "b ", "c"], ["a", "B", "x"], "accuracy") == pytest.approx(2 / 3)


def test_rouge_l_known_values():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides -> P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("Running dogs", "run dog") == pytest.approx(1.0)  # Porter stemmer on
    assert rouge_l("", "anything") == 0.0
    assert score_predictions(["a b", "c"], ["a b", "d"], "rougeL") == pytest.approx(0.5)


def test_scoring_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        score_predictions(["a"], ["a"], "bleu")
    with pytest.raises(ValueError, match="1 predictions but 2"):
        score_predictions(["a"], ["a", "b"], "accuracy")


def test_max_new_tokens_for(bundle):
    tok = bundle.tokenizer
    longest = max(len(tok(" " + x, add_special_tokens=False)["input_ids"]) for x in OPTIONS)
    assert max_new_tokens_for(OPTIONS, tok, "accuracy") >= longest + 1
    assert max_new_tokens_for(["yes"], tok, "accuracy") <= 3
    assert max_new_tokens_for(["whatever"], tok, "rougeL") == 128


# ---------------------------------------------------------------- generation


@contextlib.contextmanager
def _eval_no_grad(model):
    """For the reference computations (the tiny models are built in train mode: T5 dropout)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _manual_greedy(bundle, prompt: str, steps: int) -> str:
    """Reference decoder: full forward at every step (no cache, no padding), argmax."""
    model, tok = bundle.model, bundle.tokenizer
    ids = encode_prompts(tok, [prompt], is_seq2seq=bundle.is_seq2seq, max_input_len=512)[0]
    out: list[int] = []
    with _eval_no_grad(model):
        for _ in range(steps):
            if bundle.is_seq2seq:
                dec = [model.config.decoder_start_token_id] + out
                logits = model(
                    input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([dec])
                ).logits
            else:
                logits = model(input_ids=torch.tensor([ids + out])).logits
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_batched_equals_one_by_one_and_manual_greedy(bundle):
    model, tok = bundle.model, bundle.tokenizer
    kw = dict(is_seq2seq=bundle.is_seq2seq, max_new_tokens=NEW_TOKENS)
    batched = generate(model, tok, PROMPTS, batch_size=5, **kw)
    single = generate_one_by_one(model, tok, PROMPTS, **kw)
    assert batched == single
    assert len(set(batched)) >= 8 and all(batched)  # non-trivial, prompt-dependent answers
    for k in (0, 5, 9):  # short, longest, empty body
        assert batched[k] == _manual_greedy(bundle, PROMPTS[k], NEW_TOKENS)
    # order restored whatever the batch size
    assert generate(model, tok, PROMPTS[::-1], batch_size=16, **kw) == batched[::-1]


def test_wrong_padding_side_changes_decoder_outputs():
    """Control: right-padding a decoder-only batch must change answers, so the equality in the
    test above actually checks the padding."""
    b = load_model("tiny-causal")
    _sharpen(b.model)
    tok = b.tokenizer
    enc = encode_prompts(tok, PROMPTS, is_seq2seq=False, max_input_len=512)
    ids, mask = pad_batch(enc, tok.pad_token_id, left=False)
    with _eval_no_grad(b.model):
        out = b.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
    wrong = [t.strip() for t in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
    right = generate(b.model, tok, PROMPTS, is_seq2seq=False, max_new_tokens=NEW_TOKENS)
    assert sum(w != r for w, r in zip(wrong, right)) >= 6


def test_peft_model_and_train_mode_restored(bundle):
    peft_bundle = attach_lora(load_model(bundle.spec))
    model, tok = peft_bundle.model, peft_bundle.tokenizer
    _sharpen(model)  # also gives lora_B non-zero values, so the adapter matters
    model.train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    frozen.eval()  # a partly-eval model must come back exactly as it was
    kw = dict(is_seq2seq=bundle.is_seq2seq, max_new_tokens=NEW_TOKENS)
    batched = generate(model, tok, PROMPTS, batch_size=4, **kw)
    assert batched == generate_one_by_one(model, tok, PROMPTS, **kw)
    assert model.training and not frozen.training
    assert sum(m.training for m in model.modules()) == sum(1 for m in model.modules()) - 1
    table = label_logprobs(model, tok, PROMPTS[:3], OPTIONS, is_seq2seq=bundle.is_seq2seq, batch_size=2)
    assert model.training and not frozen.training
    brute = [[_brute_force_logprob(peft_bundle, p, o) for o in OPTIONS] for p in PROMPTS[:3]]
    assert torch.tensor(table) == pytest.approx(torch.tensor(brute), abs=2e-3, rel=1e-4)


# ---------------------------------------------------------------- label scoring


def _brute_force_logprob(bundle, prompt: str, option: str) -> float:
    model, tok = bundle.model, bundle.tokenizer
    s2s = bundle.is_seq2seq
    p = encode_prompts(tok, [prompt], is_seq2seq=s2s, max_input_len=512)[0]
    t = encode_targets(tok, [option], is_seq2seq=s2s, max_target_len=1000)[0]
    with _eval_no_grad(model):
        if s2s:
            loss = model(input_ids=torch.tensor([p]), labels=torch.tensor([t])).loss
        else:
            labels = [-100] * len(p) + t
            loss = model(input_ids=torch.tensor([p + t]), labels=torch.tensor([labels])).loss
    return -float(loss) * len(t)  # mean token NLL -> summed log-likelihood


@pytest.fixture(scope="module")
def brute(bundle):
    """log p(option | prompt) for every pair, one unpadded forward each (the reference)."""
    return [[_brute_force_logprob(bundle, p, o) for o in OPTIONS] for p in PROMPTS]


@pytest.mark.parametrize("strategy", ["packed", "cache", "full"])
def test_label_scoring_matches_brute_force(bundle, brute, strategy):
    # seq2seq ignores the strategy (the encoder runs once per prompt): same check, every value
    model, tok = bundle.model, bundle.tokenizer
    kw = dict(is_seq2seq=bundle.is_seq2seq, batch_size=3, strategy=strategy)
    table = label_logprobs(model, tok, PROMPTS, OPTIONS, **kw)
    assert torch.tensor(table) == pytest.approx(torch.tensor(brute), abs=2e-3, rel=1e-4)
    preds = label_scores(model, tok, PROMPTS, OPTIONS, **kw)
    assert preds == [OPTIONS[max(range(len(OPTIONS)), key=row.__getitem__)] for row in brute]
    assert set(preds) <= set(OPTIONS)


def test_label_scoring_length_normalize(bundle):
    model, tok = bundle.model, bundle.tokenizer
    s2s = bundle.is_seq2seq
    lens = [len(t) for t in encode_targets(tok, OPTIONS, is_seq2seq=s2s, max_target_len=1000)]
    summed = label_logprobs(model, tok, PROMPTS[:4], OPTIONS, is_seq2seq=s2s)
    mean = label_logprobs(model, tok, PROMPTS[:4], OPTIONS, is_seq2seq=s2s, length_normalize=True)
    for row_s, row_m in zip(summed, mean):
        assert row_m == pytest.approx([s / n for s, n in zip(row_s, lens)])
    with pytest.raises(ValueError, match="duplicate"):
        label_scores(model, tok, PROMPTS[:1], ["a", "a"], is_seq2seq=s2s)
    if not s2s:
        with pytest.raises(ValueError, match="no tokens"):
            generate(model, tok, ["x", ""], is_seq2seq=False, max_new_tokens=2)
    else:  # the encoder still sees EOS
        assert len(generate(model, tok, [""], is_seq2seq=True, max_new_tokens=2)) == 1


# ---------------------------------------------------------------- evaluate_task


def test_evaluate_task_both_modes(bundle):
    gen = generate(bundle.model, bundle.tokenizer, PROMPTS[:6], is_seq2seq=bundle.is_seq2seq,
                   max_new_tokens=max_new_tokens_for(OPTIONS, bundle.tokenizer, "accuracy"))
    # references: the model's own answer for the first 2 examples, a label for the others
    refs = gen[:2] + [OPTIONS[k % 4] for k in range(4)]
    examples = [SimpleNamespace(id=f"t_{k}", input=p, output=r) for k, (p, r) in enumerate(zip(PROMPTS, refs))]
    res = evaluate_task(bundle, None, examples, metric="accuracy", labels=OPTIONS, batch_size=4)
    assert isinstance(res, EvalResult) and res.n == 6 and res.mode == "generate"
    assert [r["id"] for r in res.predictions] == [f"t_{k}" for k in range(6)]
    assert [r["prediction"] for r in res.predictions] == gen
    assert res.predictions[0]["correct"] and res.predictions[1]["correct"]
    assert res.score == pytest.approx(sum(r["score"] for r in res.predictions) / 6)
    assert res.score >= 2 / 6
    assert "input" not in res.predictions[0]

    ls = evaluate_task(bundle.model, bundle.tokenizer, examples, is_seq2seq=bundle.is_seq2seq,
                       metric="accuracy", labels=OPTIONS, mode="label_scoring", keep_inputs=True)
    assert all(r["prediction"] in OPTIONS for r in ls.predictions)
    assert ls.predictions[0]["input"] == PROMPTS[0]
    rg = evaluate_task(bundle, None, examples[:2], metric="rougeL", max_new_tokens=4)
    assert "correct" not in rg.predictions[0] and 0.0 <= rg.score <= 1.0
    with pytest.raises(ValueError, match="label scoring"):
        evaluate_task(bundle, None, examples, metric="rougeL", mode="label_scoring")
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate_task(bundle, None, examples, mode="beam")
