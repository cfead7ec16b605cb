"""Batched greedy decoding for evaluation (decoder-only and seq2seq, plain or peft-wrapped).

Prompts are encoded as in training (:func:`aimm.encoding.encode_prompts`: ``truncation`` and
``max_input_len``, None for no cut as the release evaluates; seq2seq prompts end with EOS). Decoder-only batches are LEFT-padded (every prompt ends
at the last column, so the first new token follows the real prompt; ``generate`` derives the
position ids from the attention mask), seq2seq batches are right-padded. Within one call prompts
are sorted by token length to cut padding, and the answers are returned in the input order.
Greedy decoding: batched output equals one-by-one output up to floating-point ties.
"""

from __future__ import annotations

from typing import Sequence

import torch

from aimm.encoding import TruncationCounter, encode_prompts, pad_batch

from ._util import check_nonempty, inference, length_sorted_batches, model_device, progress_bar
from .scoring import check_metric

ROUGE_MAX_NEW_TOKENS = 128  # spec §6: max target 128


def _cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id)]
    return ids


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    is_seq2seq: bool,
    max_new_tokens: int,
    batch_size: int = 16,
    max_input_len: int | None = 512,
    progress: bool | str = False,
    counter: TruncationCounter | None = None,
    truncation: str = "release",
) -> list[str]:
    """Greedy answers to ``prompts`` (new tokens only, special tokens dropped, stripped).

    ``progress``: False, True or a tqdm description. ``counter`` collects prompt truncations.
    The model is put in eval mode under ``torch.inference_mode()`` and its train/eval flags are
    restored afterwards.
    """
    prompts = list(prompts)
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    encoded = encode_prompts(
        tokenizer, prompts, is_seq2seq=is_seq2seq, max_input_len=max_input_len, counter=counter,
        truncation=truncation,
    )
    check_nonempty(encoded, is_seq2seq)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    if is_seq2seq:
        start = getattr(model.config, "decoder_start_token_id", None)
        gen_kwargs["decoder_start_token_id"] = pad_id if start is None else start
    device = model_device(model)
    batches = length_sorted_batches([len(e) for e in encoded], batch_size)
    answers: list[str | None] = [None] * len(prompts)
    bar = progress_bar(len(prompts), progress, unit="ex")
    try:
        with inference(model):
            for idx in batches:
                ids, mask = pad_batch([encoded[k] for k in idx], pad_id, left=not is_seq2seq)
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs
                )
                # decoder-only: the output repeats the (padded) prompt; seq2seq: it starts with
                # the decoder start token.
                new = out[:, ids.shape[1] :] if not is_seq2seq else out[:, 1:]
                rows = [_cut_at_eos(row, eos_id) for row in new.tolist()]
                texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
                for k, text in zip(idx, texts):
                    answers[k] = text.strip()
                if bar is not None:
                    bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return answers  # type: ignore[return-value]


def generate_one_by_one(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    is_seq2seq: bool,
    max_new_tokens: int,
    max_input_len: int | None = 512,
    progress: bool | str = False,
    counter: TruncationCounter | None = None,
    truncation: str = "release",
) -> list[str]:
    """Reference path: one prompt per ``generate`` call (no padding at all)."""
    return generate(
        model,
        tokenizer,
        prompts,
        is_seq2seq=is_seq2seq,
        max_new_tokens=max_new_tokens,
        batch_size=1,
        max_input_len=max_input_len,
        progress=progress,
        counter=counter,
        truncation=truncation,
    )


def max_new_tokens_for(
    task_labels: Sequence[str], tokenizer, metric: str, *, rouge_max: int = ROUGE_MAX_NEW_TOKENS
) -> int:
    """Generation budget of a task: for accuracy tasks the token length of the longest label
    (the longer of its encodings with and without the leading space that decoder-only targets
    carry) + 1 for EOS; for ROUGE-L tasks ``rouge_max`` (128)."""
    if check_metric(metric) == "rougeL":
        return rouge_max
    labels = [str(x) for x in task_labels]
    if not labels:
        raise ValueError("an accuracy task needs its label strings to size generation")
    variants = labels + [" " + x for x in labels]
    ids = tokenizer(variants, add_special_tokens=False)["input_ids"]
    return max(len(x) for x in ids) + 1
