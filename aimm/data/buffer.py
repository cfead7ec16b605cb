"""The rehearsal memory buffer of spec section 5.

Per earlier task, ``n = floor(len(train) * fraction)`` (2% by default, computed
exactly, i.e. ``int(len * 2 / 100)`` as the release does). Then, as in the
release's ``load_memory_buffer``:

1. ``labels`` = distinct outputs in order of first appearance, ``per_label =
   max(1, n // len(labels))``;
2. for each label, ``rng.sample(indices of that label, min(per_label, count))``;
3. if fewer than ``n`` were drawn, top up with ``rng.sample(other indices in
   ascending order, n - drawn)``;
4. the result keeps the draw order (label by label, then the top-up).

The release seeds ``random`` once (42) and samples the earlier tasks in order with
that one generator; :func:`build_memory` does the same, so the memory of task k is
exactly what the release builds.

Modes:

- ``"official"``: exactly the above. No cap: with every output unique (generation
  tasks) step 2 takes one example per label, i.e. the whole training split; when
  the labels outnumber ``n`` it also returns more than ``n``. Tasks with fewer
  than 50 examples get ``n = 0`` but still one example per label.
- ``"capped"``: the same draw, then, if it holds more than ``max(1, n)``
  examples, a seeded random subset of ``max(1, n)`` of them (draw order kept).
  Classification tasks with ``n >= number of labels`` are unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Literal

from .records import Example

BufferMode = Literal["official", "capped"]
BUFFER_MODES: tuple[str, ...] = ("official", "capped")


def memory_size(n_examples: int, fraction: float = 0.02) -> int:
    """Target buffer size ``floor(n_examples * fraction)``, exact for decimal fractions (1000 -> 20, 126 -> 2)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"memory fraction must be in (0, 1], got {fraction}")
    return int(n_examples * Fraction(str(fraction)))


def memory_buffer(
    examples: Sequence[Example],
    *,
    fraction: float = 0.02,
    mode: BufferMode = "official",
    seed: int = 42,
    rng: random.Random | None = None,
) -> list[Example]:
    """Sample one task's memory (see the module docstring for the exact rule).

    Args:
        examples: the task's full training split.
        fraction: share of the split to keep (2%).
        mode: ``"official"`` (uncapped, as released) or ``"capped"`` (at most
            ``max(1, n)``).
        seed: seed of a fresh generator, used when ``rng`` is None.
        rng: a generator shared across tasks (what :func:`build_memory` passes).
    """
    if mode not in BUFFER_MODES:
        raise ValueError(f"unknown memory mode {mode!r}; valid modes: {', '.join(BUFFER_MODES)}")
    n = memory_size(len(examples), fraction)
    if not examples:
        return []
    rng = rng if rng is not None else random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_label.setdefault(example.output, []).append(index)
    per_label = max(1, n // len(by_label))
    chosen: list[int] = []
    for indices in by_label.values():
        chosen.extend(rng.sample(indices, min(per_label, len(indices))))
    if len(chosen) < n:
        taken = set(chosen)
        remaining = [i for i in range(len(examples)) if i not in taken]
        chosen.extend(rng.sample(remaining, n - len(chosen)))
    cap = max(1, n)
    if mode == "capped" and len(chosen) > cap:
        keep = sorted(rng.sample(range(len(chosen)), cap))
        chosen = [chosen[k] for k in keep]
    return [examples[i] for i in chosen]


def memory_buffers(
    tasks_so_far: Mapping[str, Sequence[Example]],
    *,
    fraction: float = 0.02,
    mode: BufferMode = "official",
    seed: int = 42,
) -> dict[str, list[Example]]:
    """Each earlier task's memory, sampled in the mapping's order with one generator seeded ``seed``."""
    rng = random.Random(seed)
    return {
        name: memory_buffer(examples, fraction=fraction, mode=mode, rng=rng)
        for name, examples in tasks_so_far.items()
    }


def build_memory(
    tasks_so_far: Mapping[str, Sequence[Example]],
    *,
    fraction: float = 0.02,
    mode: BufferMode = "official",
    seed: int = 42,
) -> list[Example]:
    """The memory buffer M: :func:`memory_buffers` concatenated in task order.

    ``tasks_so_far`` maps each earlier task (in training order) to its full
    training split. Because the generator is shared and tasks are sampled in
    order, the memory for tasks 1..k is a prefix of the memory for tasks 1..k+1.
    """
    buffers = memory_buffers(tasks_so_far, fraction=fraction, mode=mode, seed=seed)
    return [example for buffer in buffers.values() for example in buffer]
