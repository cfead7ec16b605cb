"""Memory buffer, truncation, task363 answer map and presets against transcriptions of the
release (WoodScene/AimMerging: utils/load_data.py, src/finetune_ours.py, src/generate_bwt.py,
src/eval_avgPerf_superni.py, scripts/run_train_*.sh)."""

from __future__ import annotations

import copy
import json
import os
import random
from collections import Counter

import pandas as pd
import pytest

from aimm.config import ConfigError, RunConfig
from aimm.data import load_tasks, memory_buffers
from aimm.encoding import encode_prompts, encode_targets
from aimm.training.engine import Engine, memory_records
from conftest import real_data_or_skip

STANDARD_CL_ORDER_1 = ["dbpedia", "amazon", "yahoo", "agnews"]  # dataset_order.py, dataset_id 4


# ------------------------------------------------------------------ release transcriptions
def release_load_memory_buffer(dataset_order, task_id, data_dir, sampling_ratio=2, random_seed=42,
                               task_data_of=None):
    """utils/load_data.py::load_memory_buffer, reading each file as load_dataset("json") does
    (records in file order); returns (task, id) pairs of the concatenated buffer.
    ``task_data_of(name)`` replaces the file read (to feed a subsample)."""
    state = random.getstate()
    random.seed(random_seed)
    try:
        buffer_data = []
        for i in range(task_id):
            if task_data_of is None:
                data_path = os.path.join(data_dir, "train", dataset_order[i] + "_T5.json")
                with open(data_path, encoding="utf-8") as f:
                    task_data = json.load(f)
            else:
                task_data = task_data_of(dataset_order[i])
            num_samples = int(len(task_data) * sampling_ratio / 100)
            outputs = [r["output"] for r in task_data]
            label_counts = Counter(outputs)
            num_classes = len(label_counts)
            samples_per_class = max(1, num_samples // num_classes)
            sampled_indices = []
            for label in label_counts:
                label_indices = [idx for idx, value in enumerate(outputs) if value == label]
                sampled_indices.extend(random.sample(label_indices, min(samples_per_class, len(label_indices))))
            if len(sampled_indices) < num_samples:
                remaining_indices = list(set(range(len(task_data))) - set(sampled_indices))
                sampled_indices.extend(random.sample(remaining_indices, num_samples - len(sampled_indices)))
            buffer_data.extend((dataset_order[i], task_data[k]["id"]) for k in sampled_indices)
        return buffer_data
    finally:
        random.setstate(state)


def t5_like(tokenizer):
    """A copy of ``tokenizer`` whose post-processor appends EOS, as T5's tokenizer does."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    eos = tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tok.eos_token_id)])
    return tok


# ------------------------------------------------------------------ memory buffer
def engine_for(**values):
    return Engine(RunConfig.from_dict({"method": "aimmerging", "progress": False, **values}))


def engine_buffers(engine, data):
    tasks = engine.cfg.task_names()
    return {stage.index: memory_records(engine._memory_for(stage, tasks, data))
            for stage in engine.method.stages(tasks)}


def test_engine_buffer_equals_the_release_on_standard_cl_order_1(tmp_path):
    root = real_data_or_skip()
    engine = engine_for(benchmark="standard_cl", order=1, max_train=None, data_dir=str(root),
                        run_dir=str(tmp_path / "r"))
    data = load_tasks(root, "standard_cl", STANDARD_CL_ORDER_1, max_train=None)
    got = engine_buffers(engine, data)
    assert got[0] == []
    for task_id in (1, 2, 3):
        release = release_load_memory_buffer(STANDARD_CL_ORDER_1, task_id, root / "data_longsequence")
        assert [(r["task"], r["id"]) for r in got[task_id]] == release
        assert len(release) == 20 * task_id
    # 1000 examples per file: the release preset's max_train=1000 is the whole file
    assert engine_buffers(engine_for(benchmark="standard_cl", order=1, max_train=1000,
                                     run_dir=str(tmp_path / "s")),
                          load_tasks(root, "standard_cl", STANDARD_CL_ORDER_1, max_train=1000)) == got


def test_max_train_runs_the_release_procedure_on_the_subsample(tmp_path):
    root = real_data_or_skip()
    engine = engine_for(benchmark="standard_cl", order=1, max_train=64, data_dir=str(root),
                        run_dir=str(tmp_path / "r"))
    data = load_tasks(root, "standard_cl", STANDARD_CL_ORDER_1, max_train=64)
    got = engine_buffers(engine, data)[3]

    def subsample(name):
        return [{"id": e.id, "output": e.output} for e in data[name].train]

    release = release_load_memory_buffer(STANDARD_CL_ORDER_1, 3, None, task_data_of=subsample)
    assert [(r["task"], r["id"]) for r in got] == release
    whole = release_load_memory_buffer(STANDARD_CL_ORDER_1, 3, root / "data_longsequence")
    assert release != whole  # not the whole-file buffer the release draws


def test_buffer_seed_not_the_training_seed_sets_the_buffer(tiny_config, tiny_data):
    data = load_tasks(tiny_data, "long_sequence", ["sst-2", "agnews"], max_train=16)
    base = engine_buffers(Engine(tiny_config(method="aimmerging")), data)
    assert engine_buffers(Engine(tiny_config(method="aimmerging", seed=7)), data) == base
    assert engine_buffers(Engine(tiny_config(method="aimmerging", buffer_seed=7)), data) != base


def test_every_stage_writes_memory_json_in_buffer_order(tiny_config, tiny_data):
    from aimm.training.engine import run

    run_dir = run(tiny_config(method="replay"))
    data = load_tasks(tiny_data, "long_sequence", ["sst-2", "agnews"], max_train=16)
    expected = memory_records(memory_buffers({"sst-2": data["sst-2"].train}, fraction=0.25, seed=42))
    assert json.loads((run_dir / "stages" / "01_sst-2" / "memory.json").read_text()) == []
    written = json.loads((run_dir / "stages" / "02_agnews" / "memory.json").read_text())
    assert written == expected and written and {r["task"] for r in written} == {"sst-2"}
    for stage in ("01_sst-2", "02_agnews"):  # a fresh schedule per task, first step at lr x 0
        assert pd.read_csv(run_dir / "stages" / stage / "steps.csv")["lr"].iloc[0] == 0.0


# ------------------------------------------------------------------ truncation
TEXTS = ["Classify the review. " + "very long text " * 40 + "\nAnswer:", "short one\nAnswer:"]


@pytest.fixture(scope="module")
def tokenizer():
    from aimm.models import load_tokenizer, smollm2_tokenizer_dir

    return load_tokenizer(smollm2_tokenizer_dir())


@pytest.mark.parametrize("max_length", [8, 33, 1024])
def test_release_truncation_equals_the_release_tokenizer_call(tokenizer, max_length):
    t5 = t5_like(tokenizer)  # finetune_ours.py: tokenizer(inputs, max_length=..., truncation=True)
    assert encode_prompts(tokenizer, TEXTS, is_seq2seq=True, max_input_len=max_length) == \
        t5(TEXTS, max_length=max_length, truncation=True)["input_ids"]
    assert encode_targets(tokenizer, TEXTS, is_seq2seq=True, max_target_len=max_length) == \
        t5(TEXTS, max_length=max_length, truncation=True)["input_ids"]
    assert encode_prompts(tokenizer, TEXTS, is_seq2seq=False, max_input_len=max_length) == \
        tokenizer(TEXTS, max_length=max_length, truncation=True)["input_ids"]


def test_no_truncation_at_evaluation_and_middle_cut_as_option(tokenizer):
    t5 = t5_like(tokenizer)  # generate_bwt.py: tokenizer(sample['input']) without max_length
    assert encode_prompts(tokenizer, TEXTS, is_seq2seq=True, max_input_len=None) == t5(TEXTS)["input_ids"]
    full = encode_prompts(tokenizer, TEXTS[:1], is_seq2seq=False, max_input_len=None)[0]
    middle = encode_prompts(tokenizer, TEXTS[:1], is_seq2seq=False, max_input_len=32,
                            truncation="middle")[0]
    assert middle == full[:24] + full[-8:]  # the "\nAnswer:" tail survives
    with pytest.raises(ValueError, match="choose one of release, middle"):
        encode_prompts(tokenizer, TEXTS, is_seq2seq=False, max_input_len=8, truncation="left")


def test_engine_evaluates_untruncated_under_release_and_cut_under_middle(tiny_config, monkeypatch,
                                                                         tmp_path):
    import aimm.evaluation as ev
    from aimm.training.engine import run

    seen = []
    original = ev.evaluate_task

    def spy(*args, **kwargs):
        seen.append((kwargs["max_input_len"], kwargs["truncation"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_task", spy)
    run(tiny_config(method="seq_lora", tasks=["sst-2"]))
    run(tiny_config(method="seq_lora", tasks=["sst-2"], truncation="middle",
                    run_dir=str(tmp_path / "middle")))
    assert seen == [(None, "release"), (64, "middle")]


# ------------------------------------------------------------------ scoring, presets, config
def test_task363_answer_map_is_an_option(monkeypatch):
    import aimm.evaluation as ev
    from aimm.data import Example

    examples = [Example(str(i), "x", ref) for i, ref in enumerate(["p", "n", "p", "n"])]
    answers = ["pos", " NEG", "p", "positive"]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: answers)
    kwargs = dict(is_seq2seq=True, metric="accuracy", labels=["p", "n"], max_new_tokens=4)
    spec = ev.evaluate_task(object(), object(), examples, **kwargs)
    release = ev.evaluate_task(object(), object(), examples,
                               answer_map=ev.RELEASE_ANSWER_MAPS["task363"], **kwargs)
    assert spec.score == 0.25 and release.score == 0.75  # eval_avgPerf_superni.py
    assert [r["scored_as"] for r in release.predictions] == ["p", "n", "p", "positive"]
    assert RunConfig().release_answer_map is False


def test_release_presets_use_8_by_4_and_cpu_presets_cap_the_warmup():
    from aimm.reproduce import PRESETS

    for name in ("standard_cl", "long_sequence", "superni"):
        extra = PRESETS[name]["extra"]
        assert (extra["batch_size"], extra["grad_accum"]) == (8, 4)  # run_train_*.sh: 32 / 8
        assert "max_warmup_fraction" not in extra
    for name in ("demo", "smoke"):
        assert PRESETS[name]["extra"]["max_warmup_fraction"] == 0.1


def test_release_defaults_and_bad_values_name_the_parameter():
    cfg = RunConfig()
    assert (cfg.max_warmup_fraction, cfg.truncation, cfg.buffer_seed, cfg.warmup_steps) == \
        (None, "release", 42, 50)
    # finetune_ours.py / run_train_*.sh / trainer.py defaults
    assert (cfg.lr, cfg.weight_decay, cfg.max_grad_norm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
            cfg.max_target_len, cfg.buffer_fraction, cfg.memory_batch_size, cfg.buffer_mode) == \
        (3e-4, 0.0, 1.0, 8, 32, 0.05, 128, 0.02, 32, "official")
    for values, message in [({"truncation": "left"}, "truncation='left': choose release or middle"),
                            ({"max_warmup_fraction": 2}, "max_warmup_fraction=2: must be null"),
                            ({"buffer_seed": -1}, "buffer_seed=-1: must be a non-negative integer")]:
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_dict(values)
