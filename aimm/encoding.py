"""Examples -> tensors, for seq2seq and decoder-only models.

* Seq2seq (T5): encoder input = prompt, labels = target + EOS (pad -> -100).
* Decoder-only: input = prompt + " " + target + EOS, loss on the target tokens only
  (prompt and padding labelled -100); left padding, for training and generation alike.

Prompts longer than ``max_input_len`` tokens are cut by one of :data:`TRUNCATIONS`:

* ``"release"`` (default): right truncation, as the release's
  ``tokenizer(inputs, max_length=max_input_length, truncation=True)`` (``finetune_ours.py``): the
  first tokens are kept; a seq2seq prompt keeps its EOS as the last token, as T5's tokenizer does.
  The release does not truncate at evaluation (``generate_bwt.py``): the engine passes
  ``max_input_len=None`` there.
* ``"middle"``: the head (instruction and options) and the last ``tail`` tokens (``\\nAnswer:``)
  are kept, so the model still sees the question it must answer (helps decoder-only models).

Every truncation is counted (:class:`TruncationCounter`).

Prompt and target ids of 64 or more texts are cached on disk by fingerprint
(:mod:`aimm.token_cache`; ``AIMM_TOKEN_CACHE=0`` turns it off): bump
:data:`aimm.token_cache.ENCODING_VERSION` whenever this module changes how ids are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from aimm.token_cache import cached_encode

IGNORE_INDEX = -100
PROMPT_TAIL_TOKENS = 8
TRUNCATIONS = ("release", "middle")


@dataclass
class TruncationCounter:
    """How many prompts / targets were cut, for the run's warnings."""

    prompts: int = 0
    targets: int = 0
    seen: int = 0
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"prompts_truncated": self.prompts, "targets_truncated": self.targets, "seen": self.seen}


def truncate_middle(ids: list[int], max_len: int, tail: int = PROMPT_TAIL_TOKENS) -> list[int]:
    """Keep the first ``max_len - tail`` and the last ``tail`` token ids."""
    if len(ids) <= max_len:
        return ids
    tail = min(tail, max_len // 2)
    return ids[: max_len - tail] + ids[len(ids) - tail :]


def truncate_right(ids: list[int], max_len: int, eos_id: int | None = None) -> list[int]:
    """The first ``max_len`` ids; with ``eos_id`` (seq2seq) the first ``max_len - 1`` + EOS.

    Equals a tokenizer call ``tokenizer(text, max_length=max_len, truncation=True)`` whose
    post-processor appends EOS (T5) when ``ids`` ends with that EOS, and a plain one otherwise.
    """
    if len(ids) <= max_len:
        return ids
    if eos_id is not None:
        return ids[: max_len - 1] + [eos_id]
    return ids[:max_len]


def cut_prompt(ids: list[int], max_len: int | None, truncation: str = "release",
               eos_id: int | None = None) -> list[int]:
    """``ids`` cut to ``max_len`` by ``truncation`` (``max_len`` None: unchanged)."""
    if max_len is None:
        return ids
    if truncation == "release":
        return truncate_right(ids, max_len, eos_id)
    if truncation == "middle":
        return truncate_middle(ids, max_len)
    raise ValueError(f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATIONS)}")


def _ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _prompt_ids(tokenizer, prompts: Sequence[str], is_seq2seq: bool, max_input_len: int | None,
                truncation: str) -> tuple[list[list[int]], list[bool]]:
    eos = tokenizer.eos_token_id if is_seq2seq else None
    out, cut_rows = [], []
    for ids in _ids(tokenizer, prompts):
        if is_seq2seq:
            ids = ids + [eos]
        cut = cut_prompt(ids, max_input_len, truncation, eos)
        out.append(cut)
        cut_rows.append(len(cut) < len(ids))
    return out, cut_rows


def encode_prompts(
    tokenizer,
    prompts: Sequence[str],
    *,
    is_seq2seq: bool,
    max_input_len: int | None,
    counter: TruncationCounter | None = None,
    truncation: str = "release",
) -> list[list[int]]:
    """Token ids of each prompt (seq2seq: EOS appended, as T5), cut to ``max_input_len`` by
    ``truncation`` (see the module docstring; ``max_input_len`` None: no truncation).
    Read from / written to the token cache (:mod:`aimm.token_cache`)."""
    params = dict(kind="prompts", is_seq2seq=is_seq2seq, max_len=max_input_len,
                  truncation=truncation, eos=tokenizer.eos_token_id, tail=PROMPT_TAIL_TOKENS)
    out, cut_rows = cached_encode(
        tokenizer, prompts, params,
        lambda texts: _prompt_ids(tokenizer, texts, is_seq2seq, max_input_len, truncation))
    if counter is not None:
        counter.seen += len(out)
        counter.prompts += sum(cut_rows)
    return out


def _target_ids(tokenizer, targets: Sequence[str], is_seq2seq: bool,
                max_target_len: int) -> tuple[list[list[int]], list[bool]]:
    texts = list(targets) if is_seq2seq else [" " + t for t in targets]
    out, cut_rows = [], []
    for ids in _ids(tokenizer, texts):
        cut = ids[: max_target_len - 1]
        out.append(cut + [tokenizer.eos_token_id])
        cut_rows.append(len(cut) < len(ids))
    return out, cut_rows


def encode_targets(
    tokenizer,
    targets: Sequence[str],
    *,
    is_seq2seq: bool,
    max_target_len: int,
    counter: TruncationCounter | None = None,
) -> list[list[int]]:
    """Target ids + EOS; decoder-only targets get a leading space (they follow ``Answer:``).
    Read from / written to the token cache (:mod:`aimm.token_cache`)."""
    params = dict(kind="targets", is_seq2seq=is_seq2seq, max_len=max_target_len,
                  eos=tokenizer.eos_token_id)
    out, cut_rows = cached_encode(
        tokenizer, targets, params,
        lambda texts: _target_ids(tokenizer, texts, is_seq2seq, max_target_len))
    if counter is not None:
        counter.targets += sum(cut_rows)
    return out


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (``multiple`` <= 1: ``n``)."""
    return n if multiple <= 1 else -(-n // multiple) * multiple


def pad_batch(
    sequences: list[list[int]], pad_id: int, *, left: bool = False, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a rectangle whose width is a multiple of ``multiple``; returns (ids, attention_mask)."""
    width = round_up(max(len(s) for s in sequences), multiple)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        sl = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, sl] = torch.tensor(seq, dtype=torch.long)
        mask[row, sl] = 1
    return ids, mask


class EncodedExamples:
    """Examples tokenised once; ``batch(indices)`` pads a batch without re-tokenising.

    Memory buffers are probed after every inner step, so their tokenisation is done here once
    per task instead of once per probe. ``pad_to_multiple_of`` > 1 pads every batch to a width
    that is a multiple of it (few distinct shapes: ``torch.compile`` then compiles a handful of
    graphs instead of one per batch length).
    """

    def __init__(self, prompt_ids: list[list[int]], target_ids: list[list[int]], *,
                 is_seq2seq: bool, pad_id: int, pad_to_multiple_of: int = 1) -> None:
        self.prompt_ids = prompt_ids
        self.target_ids = target_ids
        self.is_seq2seq = is_seq2seq
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_texts(cls, tokenizer, inputs: Sequence[str], outputs: Sequence[str], *,
                   is_seq2seq: bool, max_input_len: int, max_target_len: int,
                   counter: TruncationCounter | None = None,
                   pad_to_multiple_of: int = 1, truncation: str = "release") -> "EncodedExamples":
        prompts = encode_prompts(tokenizer, inputs, is_seq2seq=is_seq2seq,
                                 max_input_len=max_input_len, counter=counter,
                                 truncation=truncation)
        targets = encode_targets(tokenizer, outputs, is_seq2seq=is_seq2seq,
                                 max_target_len=max_target_len, counter=counter)
        return cls(prompts, targets, is_seq2seq=is_seq2seq, pad_id=tokenizer.pad_token_id,
                   pad_to_multiple_of=pad_to_multiple_of)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        prompts = [self.prompt_ids[i] for i in indices]
        targets = [self.target_ids[i] for i in indices]
        return collate(prompts, targets, is_seq2seq=self.is_seq2seq, pad_id=self.pad_id,
                       pad_to_multiple_of=self.pad_to_multiple_of)


def collate(prompt_ids: list[list[int]], target_ids: list[list[int]], *, is_seq2seq: bool,
            pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor | int]:
    """Pad encoded prompts/targets into ``input_ids``, ``attention_mask``, ``labels``.

    Decoder-only rows are left-padded (targets aligned at the end, see :mod:`aimm.loss`) and
    get explicit ``position_ids`` so padding does not shift the positions, plus
    ``logits_to_keep``: a plain ``int`` (the longest target + 1, rounded up to a multiple of 8
    when padding to multiples), known here on the host so the loss never has to read the
    labels back from the device.
    """
    multiple = pad_to_multiple_of
    if is_seq2seq:
        ids, mask = pad_batch(prompt_ids, pad_id, multiple=multiple)
        labels, label_mask = pad_batch(target_ids, pad_id, multiple=multiple)
        labels[label_mask == 0] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    full = [p + t for p, t in zip(prompt_ids, target_ids)]
    ids, mask = pad_batch(full, pad_id, left=True, multiple=multiple)
    labels = torch.full_like(ids, IGNORE_INDEX)
    width = ids.shape[1]
    for row, t in enumerate(target_ids):
        labels[row, width - len(t):] = torch.tensor(t, dtype=torch.long)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    keep = round_up(max(len(t) for t in target_ids) + 1, 8 if multiple > 1 else 1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels,
            "logits_to_keep": min(keep, width)}
