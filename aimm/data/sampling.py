"""Seeded, label-stratified subsampling of examples (for quick runs)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from fractions import Fraction

from .labels import is_classification_like
from .records import Example


def allocate(counts: Mapping[str, int], n: int) -> dict[str, int]:
    """Split ``n`` draws over labels in proportion to their counts.

    Largest-remainder allocation with exact arithmetic. When ``n`` is at least the
    number of labels every label gets at least one; no label gets more than it has.
    Ties are broken by label (sorted), so the result is deterministic.

    Args:
        counts: label -> number of examples (each >= 1).
        n: number of draws, ``0 <= n <= sum(counts)``.
    """
    total = sum(counts.values())
    if not 0 <= n <= total:
        raise ValueError(f"cannot draw {n} from {total} examples")
    labels = sorted(counts)
    quota = {lab: Fraction(n * counts[lab], total) for lab in labels}
    floor = 1 if n >= len(labels) else 0
    alloc = {lab: max(floor, int(quota[lab])) for lab in labels}
    while sum(alloc.values()) > n:  # only possible after raising labels to one each
        lab = max((lab for lab in labels if alloc[lab] > floor),
                  key=lambda lab: (alloc[lab] - quota[lab], -labels.index(lab)))
        alloc[lab] -= 1
    while sum(alloc.values()) < n:
        lab = max((lab for lab in labels if alloc[lab] < counts[lab]),
                  key=lambda lab: (quota[lab] - alloc[lab], -labels.index(lab)))
        alloc[lab] += 1
    return alloc


def subsample(
    examples: Sequence[Example], n: int | None, seed: int = 42, stratify: bool = True
) -> list[Example]:
    """A seeded subset of ``n`` examples, in their original order.

    - ``n`` None or ``>= len(examples)``: all examples, order kept.
    - classification-like outputs and ``stratify``: per-label counts from
      :func:`allocate` (proportional, at least one per label when ``n`` >= number of
      labels), drawn per label (labels in sorted order) with ``random.Random(seed)``.
    - otherwise (generation tasks, outputs nearly all unique, or ``stratify=False``):
      a plain seeded random sample.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 0:
        raise ValueError(f"subsample size must be >= 0, got {n}")
    rng = random.Random(seed)
    if stratify and is_classification_like(e.output for e in examples):
        groups: dict[str, list[int]] = defaultdict(list)
        for index, example in enumerate(examples):
            groups[example.output].append(index)
        alloc = allocate({lab: len(idx) for lab, idx in groups.items()}, n)
        chosen = [i for lab in sorted(groups) for i in rng.sample(groups[lab], alloc[lab])]
    else:
        chosen = rng.sample(range(len(examples)), n)
    return [examples[i] for i in sorted(chosen)]
