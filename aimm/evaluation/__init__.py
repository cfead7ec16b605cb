"""Evaluation of a model on one task's examples (spec §8 scoring).

``evaluate_task`` decodes greedily (``mode="generate"``, the paper's protocol) or ranks the label
options by likelihood (``mode="label_scoring"``, classification only) and scores the answers with
lower-cased exact match (``metric="accuracy"``) or ROUGE-L F1 (``metric="rougeL"``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from aimm.encoding import TruncationCounter

from .generation import generate, generate_one_by_one, max_new_tokens_for
from .label_scoring import STRATEGIES, label_logprobs, label_scores
from .scoring import (
    METRICS,
    RELEASE_ANSWER_MAPS,
    check_metric,
    exact_match,
    map_answer,
    normalize,
    rouge_l,
    score_one,
    score_predictions,
)

MODES = ("generate", "label_scoring")

__all__ = [
    "EvalResult",
    "MODES",
    "METRICS",
    "RELEASE_ANSWER_MAPS",
    "STRATEGIES",
    "evaluate_task",
    "exact_match",
    "generate",
    "generate_one_by_one",
    "label_logprobs",
    "label_scores",
    "map_answer",
    "max_new_tokens_for",
    "normalize",
    "rouge_l",
    "score_predictions",
]


@dataclass
class EvalResult:
    """Mean score (0-1) and one record per example:
    ``{"id", ["input"], "prediction", "reference", "score", ["correct"]}`` (``correct`` for
    accuracy only; ``input`` with ``keep_inputs=True``)."""

    score: float
    predictions: list[dict[str, Any]]
    metric: str = "accuracy"
    mode: str = "generate"
    seconds: float = 0.0
    truncation: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.predictions)

    def as_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.predictions)


def _unpack(bundle_or_model, tokenizer, is_seq2seq):
    """Accept a ModelBundle (duck-typed: ``.model``, ``.tokenizer``, ``.is_seq2seq``) or a model."""
    if hasattr(bundle_or_model, "model") and hasattr(bundle_or_model, "tokenizer"):
        model = bundle_or_model.model
        tokenizer = tokenizer if tokenizer is not None else bundle_or_model.tokenizer
        if is_seq2seq is None:
            is_seq2seq = bool(bundle_or_model.is_seq2seq)
    else:
        model = bundle_or_model
    if tokenizer is None:
        raise ValueError("evaluate_task needs a tokenizer (or a ModelBundle that carries one)")
    if is_seq2seq is None:
        is_seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return model, tokenizer, is_seq2seq


def evaluate_task(
    bundle_or_model,
    tokenizer=None,
    examples: Sequence[Any] = (),
    *,
    is_seq2seq: bool | None = None,
    metric: str = "accuracy",
    labels: Sequence[str] | None = None,
    mode: str = "generate",
    batch_size: int = 16,
    max_input_len: int | None = 512,
    max_new_tokens: int | None = None,
    length_normalize: bool = False,
    label_strategy: str = "packed",
    keep_inputs: bool = False,
    progress: bool | str = False,
    truncation: str = "release",
    answer_map: dict[str, str] | None = None,
) -> EvalResult:
    """Score a model on ``examples`` (objects with ``.id``, ``.input``, ``.output``).

    ``labels``: the task's label strings; they size the generation budget (accuracy tasks, see
    :func:`max_new_tokens_for`) and are the options of label scoring. When None they default to
    the sorted distinct references (the label set, not their frequencies). ``max_new_tokens``
    overrides the budget. ``is_seq2seq`` defaults to the bundle's / the model config's.
    ``batch_size`` counts prompts in both modes (label scoring scores all options of a group of
    ``batch_size`` prompts together; ``length_normalize`` and ``label_strategy`` are described in
    :mod:`aimm.evaluation.label_scoring`). ``keep_inputs`` adds each prompt to its record.
    ``truncation`` / ``max_input_len`` cut the prompts as :func:`aimm.encoding.encode_prompts`
    (``max_input_len`` None: no cut, as the release evaluates). ``answer_map`` (e.g.
    ``RELEASE_ANSWER_MAPS["task363"]``) maps answers before scoring; the record then keeps the
    raw answer in ``prediction`` and the scored one in ``scored_as``.
    """
    check_metric(metric)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "label_scoring" and metric != "accuracy":
        raise ValueError("label scoring ranks fixed options: it needs metric='accuracy'")
    model, tokenizer, is_seq2seq = _unpack(bundle_or_model, tokenizer, is_seq2seq)
    examples = list(examples)
    prompts = [str(ex.input) for ex in examples]
    refs = [str(ex.output) for ex in examples]
    if labels is None:
        labels = sorted(set(refs))
    labels = [str(x) for x in labels]
    counter = TruncationCounter()
    start = time.perf_counter()
    if not examples:
        preds: list[str] = []
    elif mode == "generate":
        budget = max_new_tokens or max_new_tokens_for(labels, tokenizer, metric)
        preds = generate(
            model,
            tokenizer,
            prompts,
            is_seq2seq=is_seq2seq,
            max_new_tokens=budget,
            batch_size=batch_size,
            max_input_len=max_input_len,
            progress=progress,
            counter=counter,
            truncation=truncation,
        )
    else:
        preds = label_scores(
            model,
            tokenizer,
            prompts,
            labels,
            is_seq2seq=is_seq2seq,
            batch_size=batch_size,
            max_input_len=max_input_len,
            length_normalize=length_normalize,
            strategy=label_strategy,
            progress=progress,
            counter=counter,
            truncation=truncation,
        )
    seconds = time.perf_counter() - start
    records = []
    for ex, pred, ref in zip(examples, preds, refs):
        scored = map_answer(pred, answer_map)
        value = score_one(scored, ref, metric)
        rec: dict[str, Any] = {"id": getattr(ex, "id", None)}
        if keep_inputs:
            rec["input"] = ex.input
        rec.update(prediction=pred, reference=ref, score=value)
        if answer_map:
            rec["scored_as"] = scored
        if metric == "accuracy":
            rec["correct"] = bool(value == 1.0)
        records.append(rec)
    total = sum(r["score"] for r in records) / len(records) if records else float("nan")
    return EvalResult(
        score=total,
        predictions=records,
        metric=metric,
        mode=mode,
        seconds=seconds,
        truncation={"prompts_truncated": counter.prompts, "seen": counter.seen},
    )
