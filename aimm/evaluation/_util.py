"""Small helpers shared by generation and label scoring."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` + ``torch.inference_mode()``; restores every module's train/eval flag after
    (module by module, so a partly frozen model comes back exactly as it was)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, was_training in flags:
            module.training = was_training


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, ties by index)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def progress_bar(total: int, progress, unit: str = "batch"):
    """A tqdm bar when ``progress`` is True or a description string, else None."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    desc = progress if isinstance(progress, str) else None
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def check_nonempty(encoded: Sequence[Sequence[int]], is_seq2seq: bool) -> None:
    """A decoder-only model cannot continue an empty prompt (nothing to attend to)."""
    if not is_seq2seq:
        empty = [k for k, ids in enumerate(encoded) if not ids]
        if empty:
            raise ValueError(f"prompt(s) {empty[:5]} encode to no tokens; a decoder-only model needs a prompt")
