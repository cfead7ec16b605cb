"""Memory buffer of spec section 5: official (uncapped, as released) vs capped."""

import random
from collections import Counter

import pytest

from aimm.data import Example, build_memory, memory_buffer, memory_buffers, memory_size


def classification(n=1000, labels=("A", "B", "C", "D"), seed=0):
    rng = random.Random(seed)
    return [Example(f"c_{i}", f"in {i}", rng.choice(labels)) for i in range(n)]


def generation(n=1000, prefix="g"):
    return [Example(f"{prefix}_{i}", f"in {i}", f"unique output {i}") for i in range(n)]


def release_reference(tasks, sampling_ratio=2, random_seed=42):
    """Literal transcription of the release's utils/load_data.py::load_memory_buffer."""
    rnd = random.Random(random_seed)
    buffer = []
    for task_data in tasks:
        outputs = [e.output for e in task_data]
        num_samples = int(len(task_data) * sampling_ratio / 100)
        label_counts = Counter(outputs)
        samples_per_class = max(1, num_samples // len(label_counts))
        sampled = []
        for label in label_counts:
            label_indices = [idx for idx, value in enumerate(outputs) if value == label]
            sampled.extend(rnd.sample(label_indices, min(samples_per_class, len(label_indices))))
        if len(sampled) < num_samples:
            remaining = list(set(range(len(task_data))) - set(sampled))
            sampled.extend(rnd.sample(remaining, num_samples - len(sampled)))
        buffer.extend(task_data[i] for i in sampled)
    return buffer


def test_memory_size_is_exact_floor():
    assert [memory_size(n) for n in (1000, 975, 338, 250, 126, 49, 0)] == [20, 19, 6, 5, 2, 0, 0]
    with pytest.raises(ValueError):
        memory_size(10, 0)


@pytest.mark.parametrize("mode", ["official", "capped"])
def test_classification_gets_n_with_every_label(mode):
    data = classification()
    buf = memory_buffer(data, mode=mode)
    assert len(buf) == 20
    assert set(Counter(e.output for e in buf)) == {"A", "B", "C", "D"}
    assert min(Counter(e.output for e in buf).values()) >= 5  # 20 // 4 per label
    assert len(set(buf)) == 20


def test_many_labels_one_each_then_top_up():
    labels = [f"L{i}" for i in range(14)]  # dbpedia-like: 20 // 14 = 1 per label, then 6 more
    buf = memory_buffer(classification(labels=labels), mode="official")
    assert len(buf) == 20 and set(e.output for e in buf) == set(labels)


def test_generation_official_takes_whole_set_capped_takes_n():
    data = generation()
    official = memory_buffer(data, mode="official")
    assert official == data  # one per unique label = every example, in order: the release's defect
    capped = memory_buffer(data, mode="capped")
    assert len(capped) == 20 and len(set(capped)) == 20 and set(capped) <= set(data)


def test_small_task_official_one_per_label_capped_at_least_one():
    data = classification(n=30, labels=("x", "y", "z"))  # 2% of 30 = 0
    assert sorted(e.output for e in memory_buffer(data, mode="official")) == ["x", "y", "z"]
    assert len(memory_buffer(data, mode="capped")) == 1


def test_deterministic_under_seed_and_seed_matters():
    data = classification(n=500, labels=("p", "n"))
    assert memory_buffer(data, seed=42) == memory_buffer(data, seed=42)
    assert memory_buffer(data, seed=42) != memory_buffer(data, seed=7)
    assert memory_buffer(generation(), mode="capped", seed=1) == memory_buffer(generation(), mode="capped", seed=1)


def test_official_matches_the_release_algorithm_across_tasks():
    tasks = {"a": classification(seed=1), "b": generation(300, "b"), "c": classification(250, ("e", "c", "n"), 2),
             "d": classification(126, tuple("abcdefgh"), 3)}
    assert build_memory(tasks) == release_reference(list(tasks.values()))


def test_build_memory_concatenates_in_order_and_prefixes_are_stable():
    tasks = {"a": classification(seed=1), "b": generation(300, "b"), "c": classification(seed=2)}
    per_task = memory_buffers(tasks, mode="capped")
    assert [len(v) for v in per_task.values()] == [20, 6, 20]
    assert build_memory(tasks, mode="capped") == [e for v in per_task.values() for e in v]
    two = build_memory({k: tasks[k] for k in ("a", "b")})
    assert build_memory(tasks)[: len(two)] == two
    assert [len(v) for v in memory_buffers(tasks).values()] == [20, 300, 20]


def test_bad_mode_and_empty_task():
    with pytest.raises(ValueError, match="valid modes: official, capped"):
        memory_buffer(classification(), mode="all")
    assert memory_buffer([], mode="official") == []
