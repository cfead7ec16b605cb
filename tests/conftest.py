"""Shared fixtures: a tiny benchmark in the release layout and tiny-model run configs."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = (REPO.parent / "shared" / "benchmarks" / "aimm").resolve()

TINY_TASKS = {
    # task: (labels, words that make the label guessable)
    "sst-2": (["positive", "negative"], ["good", "bad"]),
    "agnews": (["World", "Sports", "Business"], ["war", "goal", "stock"]),
    "rte": (["entailment", "not_entailment"], ["same", "differ"]),
}


def make_tiny_benchmark(root: Path, n_train: int = 24, n_test: int = 6, seed: int = 0) -> Path:
    """Write a 3-task classification benchmark in the release layout under ``root``."""
    rng = random.Random(seed)
    for task, (labels, cues) in TINY_TASKS.items():
        for split, n in (("train", n_train), ("dev", n_test), ("test", n_test)):
            records = []
            for i in range(n):
                k = i % len(labels)
                words = " ".join(rng.choice(["the", "a", "one", "this"]) for _ in range(rng.randint(2, 6)))
                records.append({
                    "id": f"{task}_{split}_{i}",
                    "input": f"What is it? Option: {', '.join(labels)}.\n{words} {cues[k]}\nAnswer:",
                    "output": labels[k],
                })
            path = root / "data_longsequence" / split / f"{task}_T5.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_benchmark(tmp_path_factory.mktemp("bench"))


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A RunConfig factory for fast tiny-model runs on the tiny benchmark."""
    from aimm.config import RunConfig

    def make(**changes):
        values = dict(benchmark="long_sequence", tasks=["sst-2", "agnews"], data_dir=str(tiny_data),
                      model="tiny-causal", max_train=16, max_test=4, batch_size=4, epochs=1,
                      lr=1e-3, max_input_len=64, eval_batch_size=8, memory_batch_size=4,
                      buffer_fraction=0.25, run_dir=str(tmp_path / "run"), progress=False)
        values.update(changes)
        return RunConfig.from_dict(values)

    return make


def real_data_or_skip() -> Path:
    """The release benchmark; in CI its absence is a failure, elsewhere a skip."""
    path = Path(os.environ.get("AIMM_DATA") or REAL_DATA)
    if not (path / "data_longsequence").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"benchmark data missing at {path} (CI must have it)")
        pytest.skip(f"benchmark data not found at {path}")
    return path
