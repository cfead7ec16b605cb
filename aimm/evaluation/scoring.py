"""Per-example scores (spec §8): lower-cased exact match and ROUGE-L F1 (stemmer on), 0-1.

Which metric a task uses is decided by :func:`aimm.data.task_metric`.

:data:`RELEASE_ANSWER_MAPS`: the release's SuperNI OP script (``eval_avgPerf_superni.py``) maps
task363's answers ``pos``/``neg`` to its labels ``p``/``n`` before scoring (its BWT script does
not). Off by default (the spec scores the answer as generated); ``release_answer_map`` in the
run config turns it on for every score of that task.
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


RELEASE_ANSWER_MAPS: dict[str, dict[str, str]] = {"task363": {"pos": "p", "neg": "n"}}


def map_answer(pred: str, mapping: dict[str, str] | None) -> str:
    """``pred`` replaced by ``mapping[normalize(pred)]`` where present (the release compares
    the stripped, lower-cased answer), else unchanged."""
    if not mapping:
        return pred
    return mapping.get(normalize(pred), pred)


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

