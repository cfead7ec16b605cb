"""The training loss: token-level cross-entropy on the target tokens only.

Decoder-only batches are LEFT-padded (see :func:`aimm.encoding.collate`), so every row's target
sits at the end of the sequence. The LM head then only needs the last ``K`` positions
(``logits_to_keep``), where ``K`` is the longest target in the batch plus one: with a 49k-token
vocabulary and ~200-token prompts this avoids materialising ~98% of the logits, which dominate
memory and time of the forgetting-signal probes and rehearsal steps. The value equals the
model's own mean cross-entropy over the labelled tokens (tested).

``K`` comes from the batch (``logits_to_keep``, a host ``int`` set by the collator): reading it
from the labels would be a device-to-host sync before every forward, which on a GPU stalls the
queue of kernels (tested: ``lm_loss`` reads nothing back from the device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aimm.encoding import IGNORE_INDEX


def last_positions(k: int, device=None) -> torch.Tensor:
    """The last ``k`` sequence positions as a ``logits_to_keep`` index tensor: ``[-k, ..., -1]``.

    transformers takes ``logits_to_keep`` as an ``int`` (``hidden[:, -k:]``) or as a tensor of
    positions (``hidden[:, index]``). The ``int`` slice of a batch of more than one row is not
    contiguous, and with the base frozen under LoRA the LM head's ``F.linear`` then runs as a
    ``bmm`` against its weight expanded per row, copying the 49,152 x 576 weight once per row and
    forward (in training and in evaluation; tested); indexing with a tensor gives a
    contiguous tail and one ``mm``, with the same logits. Measured on SmolLM2-135M bf16 (2 idle
    cores, 2026-12-07): a training step at batch 4 x 150 in 0.87x the time, a label-scoring
    forward at batch 20 in 0.77x. Negative positions count from the end, so a model that
    prepends positions (a PEFT soft prompt) keeps the same tail as with the ``int``."""
    return torch.arange(-k, 0, device=device)


def lm_loss(model: torch.nn.Module, batch: dict, is_seq2seq: bool) -> torch.Tensor:
    """Mean cross-entropy over the labelled (target) tokens of ``batch`` (a 0-dim tensor)."""
    if is_seq2seq:
        return model(**batch).loss
    logits, targets = target_logits(model, batch, is_seq2seq)
    return token_cross_entropy(logits, targets)


def target_logits(model: torch.nn.Module, batch: dict, is_seq2seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)``: ``logits[b, i]`` predicts ``targets[b, i]`` (``IGNORE_INDEX`` where
    nothing is predicted), for a loss or a distillation on the target positions only.

    Decoder-only: the last ``K`` positions (``logits_to_keep``), shifted by one; seq2seq: the
    decoder's logits and the labels."""
    if is_seq2seq:
        return model(**batch).logits, batch["labels"]
    labels = batch["labels"]
    keep = batch.get("logits_to_keep")
    if keep is None:  # a hand-made batch: derive K from the labels (one host read)
        keep = int((labels != IGNORE_INDEX).sum(dim=1).max()) + 1
    keep = min(keep, labels.shape[1])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep")}
    logits = model(**inputs, logits_to_keep=last_positions(keep, labels.device)).logits
    return logits[:, :-1], labels[:, -keep:][:, 1:]


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions of :func:`target_logits`' output."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
