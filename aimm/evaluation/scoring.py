"""Per-example scores (spec §8): lower-cased exact match and ROUGE-L F1 (stemmer on), 0-1.

Which metric a task uses is decided by :func:`aimm.data.task_metric`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

METRICS = ("accuracy", "rougeL")


def normalize(text: str) -> str:
    """Strip surrounding whitespace and lower-case."""
    return str(text).strip().lower()


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize(pred) == normalize(ref))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (rouge-score, Porter stemmer on; it lower-cases and tokenises itself)."""
    return float(_rouge_scorer().score(str(ref), str(pred))["rougeL"].fmeasure)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def score_one(pred: str, ref: str, metric: str) -> float:
    return exact_match(pred, ref) if check_metric(metric) == "accuracy" else rouge_l(pred, ref)


def score_predictions(preds: Sequence[str], refs: Sequence[str], metric: str) -> float:
    """Mean per-example score (0-1). NaN for an empty list."""
    check_metric(metric)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        return float("nan")
    return sum(score_one(p, r, metric) for p, r in zip(preds, refs)) / len(preds)

