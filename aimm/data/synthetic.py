"""A small synthetic classification benchmark in the release layout.

For tests, smoke runs and speed measurements on machines without the real data (the GPU check
runs where ``../shared`` is not available). Each label has a cue word, so a model can learn it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYNTHETIC_TASKS = {
    "sst-2": (["positive", "negative"], ["good", "bad"]),
    "agnews": (["World", "Sports", "Business"], ["war", "goal", "stock"]),
    "rte": (["entailment", "not_entailment"], ["same", "differ"]),
}
FILLER = ["the", "a", "one", "this", "that", "some", "every", "other"]


def make_synthetic_benchmark(root: str | Path, *, n_train: int = 24, n_test: int = 6,
                             words: tuple[int, int] = (2, 6), seed: int = 0,
                             tasks: dict | None = None) -> Path:
    """Write ``data_longsequence/{train,dev,test}/<task>_T5.json`` under ``root``.

    ``words``: (min, max) filler words per sentence; raise it for longer prompts.
    """
    root = Path(root)
    rng = random.Random(seed)
    for task, (labels, cues) in (tasks or SYNTHETIC_TASKS).items():
        for split, n in (("train", n_train), ("dev", n_test), ("test", n_test)):
            records = []
            for i in range(n):
                k = i % len(labels)
                text = " ".join(rng.choice(FILLER) for _ in range(rng.randint(*words)))
                records.append({
                    "id": f"{task}_{split}_{i}",
                    "input": f"What is it? Option: {', '.join(labels)}.\n{text} {cues[k]}\nAnswer:",
                    "output": labels[k],
                })
            path = root / "data_longsequence" / split / f"{task}_T5.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return root
