"""Deciding whether a task is classification-like from its outputs."""

from __future__ import annotations

from collections.abc import Iterable

#: A task with more distinct outputs than this is treated as generation.
MAX_CLASSES = 50


def is_classification_like(outputs: Iterable[str]) -> bool:
    """True when the outputs look like class labels.

    Rule: at most :data:`MAX_CLASSES` distinct outputs, and at most half as many
    distinct outputs as examples (so each label repeats on average). Examples:
    dbpedia (14 labels / 1000) and SuperNI task073 (5 / 975) are classification;
    SuperNI task181 (146 / 338) and all-unique summaries are generation.
    """
    values = list(outputs)
    distinct = len(set(values))
    return 0 < distinct <= MAX_CLASSES and 2 * distinct <= len(values)


def label_set(outputs: Iterable[str]) -> list[str]:
    """Sorted distinct outputs if classification-like, else an empty list."""
    values = list(outputs)
    return sorted(set(values)) if is_classification_like(values) else []
