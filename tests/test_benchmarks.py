"""The speed benchmarks run end to end on tiny models and write well-formed JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_train_overhead_on_a_tiny_model_reports_runs_summary_and_ratios(tmp_path):
    from benchmarks import train_overhead

    out = tmp_path / "to.json"
    train_overhead.main([
        "--model", "tiny-causal", "--batch-size", "3", "--max-train", "12", "--task1-steps", "1",
        "--memory-batch-size", "4", "--initial-interval", "2", "--max-test", "1",
        "--prompt-tokens", "24", "--max-input-len", "64", "--repeats", "1",
        "--warmup-steps", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["partial"] is False
    env = data["environment"]
    for key in ("torch", "device", "torch_threads", "model", "dtype"):
        assert env[key] is not None, key
    assert data["model"] == "tiny-causal" and data["device"] == "cpu"
    variants = ["seq_lora", "aimmerging_release", "aimmerging_fast"]
    assert data["variants"] == variants
    assert [r["variant"] for r in data["runs"]] == variants
    for r in data["runs"]:
        assert r["inner_steps"] == 4  # 12 task-2 examples / batch 3
        assert r["optimizer_steps"] == r["inner_steps"] + r["outer_steps"]
        assert positive_finite(r["train_s"]) and positive_finite(r["s_per_optimizer_step"])
        assert len(r["step_s"]) == r["inner_steps"]
        assert positive_finite(r["peak_memory_bytes"])
    runs = {r["variant"]: r for r in data["runs"]}
    assert runs["seq_lora"]["probe_s"] == 0 and runs["seq_lora"]["merges"] == 0
    release = runs["aimmerging_release"]
    assert release["probe_s"] > 0 and release["merges"] >= 1 and release["rehearsal_s"] > 0
    assert release["memory_size"] >= 4  # the buffer fills a memory batch
    for v in variants[1:]:
        assert data["summary"][v]["n"] == 1
        r = data["ratios"][v]
        for key in ("time_per_optimizer_step", "stage2_train_time", "peak_memory",
                    "time_per_optimizer_step_median_of_repeats", "steady_time_per_optimizer_step"):
            assert positive_finite(r[key]), (v, key, r[key])


def test_train_overhead_summary_drops_the_warm_up_repeat_and_pairs_repeats():
    from benchmarks.train_overhead import summarize

    def run(variant, repeat, train, opt):
        return {"variant": variant, "repeat": repeat, "train_s": train, "optimizer_steps": opt,
                "s_per_optimizer_step": train / opt, "probe_s": 0, "rehearsal_s": 0}

    runs = [run("seq_lora", 0, 100.0, 10), run("aimmerging_fast", 0, 500.0, 10),
            run("seq_lora", 1, 10.0, 10), run("aimmerging_fast", 1, 12.0, 12)]
    summary, ratios = summarize(runs, ["seq_lora", "aimmerging_fast"], discard_first=True)
    assert summary["seq_lora"]["n"] == 1
    assert ratios["aimmerging_fast"]["stage2_train_time"] == pytest.approx(1.2)
    assert ratios["aimmerging_fast"]["time_per_optimizer_step"] == pytest.approx(1.0)
    summary, ratios = summarize(runs, ["seq_lora", "aimmerging_fast"], discard_first=False)
    assert ratios["aimmerging_fast"]["stage2_train_time_per_repeat"] == pytest.approx([5.0, 1.2])


def test_merge_ops_times_every_op_for_both_implementations(tmp_path):
    from benchmarks import merge_ops

    out = tmp_path / "mo.json"
    merge_ops.main(["--model", "tiny-causal", "--repeats", "3", "--warmup", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["model"] == "tiny-causal"
    assert data["n_tensors"] > 0 and data["n_params"] > 0
    assert data["max_abs_diff_fused"] < 1e-6 and data["l1_rel_diff"] < 1e-4
    ops = ("snapshot", "delta", "weighted_fusion", "apply_", "l1_norm", "merge_total")
    for impl in ("foreach", "naive"):
        for op in ops:
            assert positive_finite(data["median_s"][impl][op]), (impl, op)
    for op in ops:
        assert positive_finite(data["ratio_naive_over_foreach"][op]), op


@pytest.mark.slow  # ~1.5-2.5 min on a busy 2-core CPU: 5 Python start-ups of torch + transformers
def test_gpu_check_cpu_smoke_runs_every_sub_benchmark(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["engine_vs_hf_smollm2", "engine_vs_hf_qwen3", "eval_throughput_qwen3",
             "train_overhead_qwen3", "train_overhead_t5"]
    summary = json.loads((out / "summary.json").read_text())
    for name in names:
        assert summary["benchmarks"][name]["status"] == "ok", (name, proc.stderr[-3000:])
        data = json.loads((out / f"{name}.json").read_text())
        assert data.get("partial") in (None, False)
    assert json.loads((out / "preflight.json").read_text())["problems"] == []
    assert "total" in proc.stdout
    qwen = json.loads((out / "train_overhead_qwen3.json").read_text())
    assert qwen["discarded_first_repeat"] == {"eager": False}
    assert set(qwen["ratios"]) == {"aimmerging_release", "aimmerging_fast"}
    # issue #15's GPU goal: aimm compiled against plain compiled HF + PEFT, and compiled vs eager
    evh = json.loads((out / "engine_vs_hf_smollm2.json").read_text())
    runs = {r["trainer"]: r for r in evh["runs"]}
    assert list(runs) == ["aimm_compiled", "plain_compiled", "aimm", "plain"]
    for name, r in runs.items():  # the compiled trainers did compile (one graph each: no breaks)
        assert (r["compiled_graphs"] >= 1) == name.endswith("_compiled"), r
    assert evh["ratios"]["aimm_compiled/plain_compiled"]["goal"] == 1.2
    assert evh["flops_per_step"]["plain"]["head"] > evh["flops_per_step"]["aimm"]["head"]
    entry = summary["benchmarks"]["engine_vs_hf_smollm2"]
    assert set(entry["ms_per_step"]) == set(runs) and "aimm_compiled/aimm" in entry["ratios"]
    assert "aimm_compiled/plain_compiled" in proc.stdout


def test_gpu_check_help_is_its_whole_header_and_nothing_else():
    script = REPO / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    header = [line for line in script.read_text().splitlines()[1:]]
    header = header[:next(i for i, line in enumerate(header) if not line.startswith("#"))]
    assert proc.returncode == 0 and proc.stdout.splitlines() == header


# ------------------------------------------------------------------------------ prompt_scoring
def test_prompt_scoring_times_both_paths_and_they_agree(tmp_path, tiny_data):
    from benchmarks import prompt_scoring

    out = tmp_path / "ps.json"
    prompt_scoring.main(["--model", "tiny-causal", "--data-dir", str(tiny_data / "data_longsequence"),
                         "--task", "agnews", "--n", "4", "--stage", "1", "--prompt-length", "3",
                         "--batch-size", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["virtual_tokens"] == 6 and data["labels"] >= 2
    for strategy in ("packed", "full"):
        assert positive_finite(data["runs"][strategy]["best_wall_s"]), strategy
    assert positive_finite(data["speedup_packed_vs_full"])
    assert data["prediction_agreement"] == 1.0  # float32: the two paths differ by rounding only
    assert data["max_abs_logprob_diff"] < 1e-3 < data["mean_abs_logprob"]


# ------------------------------------------------------------------------------ engine_vs_hf
def test_engine_vs_hf_on_a_tiny_model_times_every_trainer(tmp_path):
    from benchmarks import engine_vs_hf

    out = tmp_path / "evh.json"
    engine_vs_hf.main(["--model", "tiny-causal", "--steps", "4", "--warmup-steps", "1",
                       "--repeats", "1", "--batch-size", "2", "--seq-len", "24",
                       "--gemm-seconds", "0.02", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["partial"] is False and data["model"] == "tiny-causal"
    assert data["ratios"]["aimm/trainer"]["verdict"] == "not resolved (fewer than 2 repeats)"
    assert data["trainer_args"]["optim"].endswith("ADAMW_TORCH_FUSED")  # Trainer's default
    assert data["data"]["uniform_length"] is True  # every sequence is exactly --seq-len tokens
    assert data["tokens_per_step"] == 2 * 24
    assert [r["trainer"] for r in data["runs"]] == ["aimm", "trainer", "trainer_target", "floor",
                                                    "aimm_attn32"]
    for r in data["runs"]:
        assert r["steps_done"] == 4, r  # the same number of optimiser steps for every trainer
        assert len(r["step_s"]) == 3 and positive_finite(r["s_per_step"])
    for name, s in data["summary"].items():
        for key in ("s_per_step", "tokens_per_s", "flops_per_step", "gemm_share"):
            assert positive_finite(s[key]), (name, key)
    flops = data["flops_per_step"]
    assert flops["aimm"]["head"] < flops["trainer"]["head"]  # LM head on the target tail only
    assert flops["aimm"]["total"] == flops["floor"]["total"] == flops["aimm_attn32"]["total"]
    assert positive_finite(data["gemm"]["flops_per_s"])
    for key in ("aimm/trainer", "aimm/trainer_target", "aimm/floor", "trainer/floor",
                "aimm_attn32/trainer", "aimm_attn32/aimm"):
        assert positive_finite(data["ratios"][key]["time_per_step"]), key
    assert data["ratios"]["aimm/trainer"]["goal"] == 0.8
    assert isinstance(data["ratios"]["aimm/floor"]["meets_goal"], bool)


def test_engine_vs_hf_ratios_and_step_times_on_hand_made_numbers():
    from benchmarks.engine_vs_hf import steady_step_times, summarize

    assert steady_step_times([0.0, 1.0, 3.0, 6.0, 10.0], warmup=2) == [2.0, 3.0, 4.0]
    assert steady_step_times([0.0, 1.0, 3.0], warmup=0) == [1.0, 2.0]

    def run(trainer, repeat, s):
        return {"trainer": trainer, "repeat": repeat, "s_per_step": s}

    runs = [run("aimm", 0, 1.0), run("trainer", 0, 2.0), run("floor", 0, 0.9),
            run("aimm", 1, 3.0), run("trainer", 1, 4.0), run("floor", 1, 2.0)]
    summary, ratios = summarize(runs, tokens_per_step=100.0,
                                flops={"aimm": 50.0, "trainer": 80.0, "floor": 50.0},
                                gemm_flops_per_s=100.0)
    assert summary["aimm"]["s_per_step"] == pytest.approx(2.0)
    assert summary["floor"]["s_per_step"] == pytest.approx(1.45)
    assert summary["aimm"]["tokens_per_s"] == pytest.approx(50.0)
    assert summary["aimm"]["gemm_share"] == pytest.approx(0.25)  # 50 FLOP / 2 s / 100 FLOP/s
    assert summary["trainer"]["n"] == 2
    r = ratios["aimm/trainer"]
    assert r["time_per_step"] == pytest.approx(2.0 / 3.0)
    assert r["per_repeat"] == pytest.approx([0.5, 0.75]) and r["median_of_repeats"] == pytest.approx(0.625)
    assert r["meets_goal"] is True
    assert ratios["aimm/floor"]["time_per_step"] == pytest.approx(2.0 / 1.45)
    assert ratios["aimm/floor"]["meets_goal"] is False
    assert "aimm/trainer_target" not in ratios  # not measured


def test_engine_vs_hf_gives_a_goal_verdict_only_when_the_interval_lies_on_one_side():
    from benchmarks.engine_vs_hf import goal_verdict, summarize
    from aimm.study.stats import estimate

    def run(trainer, repeat, s):
        return {"trainer": trainer, "repeat": repeat, "s_per_step": s}

    # the machine is twice as slow in repeat 1, the ratio the same: no spread between repeats
    runs = [run("aimm", 0, 1.0), run("trainer", 0, 1.4), run("aimm", 1, 2.0), run("trainer", 1, 2.8)]
    r = summarize(runs, 100.0, {"aimm": 1.0, "trainer": 1.0}, 1.0)[1]["aimm/trainer"]
    assert r["repeats"]["n"] == 2 and r["repeats"]["mean"] == pytest.approx(1 / 1.4)
    assert r["repeats"]["ci95"] == pytest.approx([1 / 1.4, 1 / 1.4])
    assert r["verdict"] == "met" and r["meets_goal"] is True
    # the point ratio meets the goal, the interval does not lie under it
    runs = [run("aimm", 0, 0.7), run("trainer", 0, 1.0), run("aimm", 1, 0.9), run("trainer", 1, 1.0)]
    r = summarize(runs, 100.0, {"aimm": 1.0, "trainer": 1.0}, 1.0)[1]["aimm/trainer"]
    assert r["meets_goal"] is True and r["verdict"] == "not resolved"

    assert goal_verdict(estimate([0.70, 0.72, 0.74]), 0.8) == "met"
    assert goal_verdict(estimate([0.85, 0.86, 0.87]), 0.8) == "not met"
    assert goal_verdict(estimate([0.71, 0.87, 0.93, 0.81, 0.76]), 0.8) == "not resolved"  # session 14
    assert goal_verdict(estimate([0.5]), 0.8) == "not resolved (fewer than 2 repeats)"


def test_lora_step_flops_on_hand_made_shapes_and_the_tiny_model():
    from benchmarks._flops import lora_step_flops, model_shapes

    shapes = {"body_params": 100, "head_params": 10, "lora_params": 5, "layers": 2, "attn_width": 4}
    f = lora_step_flops(shapes, batch=2, seq_len=3, head_positions=1)
    assert (f["body"], f["lora"], f["head"], f["attention"]) == (2400, 180, 80, 1728)
    assert f["total"] == 4388

    from peft import LoraConfig, get_peft_model

    from aimm.models import load_model

    model = get_peft_model(load_model("tiny-causal").model,
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    s = model_shapes(model)
    # tiny-causal: hidden 32, 4 heads x 8, 2 kv heads, MLP 64, 2 layers, vocabulary 49,152
    per_layer = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert s["body_params"] == 2 * per_layer
    assert s["head_params"] == 32 * 49152
    assert s["lora_params"] == 2 * (8 * (32 + 32) + 8 * (32 + 16))
    assert (s["layers"], s["attn_width"]) == (2, 32)


def test_engine_vs_hf_bad_input_is_one_line_and_exit_2(capsys):
    from benchmarks import engine_vs_hf

    with pytest.raises(SystemExit) as exc:
        engine_vs_hf.main(["--model", "tiny-causal", "--steps", "2", "--warmup-steps", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps 2" in err[0]


# ------------------------------------------------------------------------------ study_profile
def test_sections_count_exclusive_time_and_opaque_sections_absorb(monkeypatch):
    from benchmarks import _sections

    ticks = iter([0.0, 1.0, 4.0, 10.0])
    monkeypatch.setattr(_sections.time, "perf_counter", lambda: next(ticks))
    s = _sections.Sections()
    outer = s.enter("merge", opaque=False)  # t=0
    inner = s.enter("rehearsal")  # t=1, opaque
    assert s.enter("forward") is None  # absorbed: no clock read
    s.count_tokens(7)
    s.exit(None)
    s.exit(inner)  # t=4
    s.exit(outer)  # t=10
    totals = s.bucket_totals(0)
    assert totals["seconds"] == {"rehearsal": 3.0, "merge": 7.0}
    assert totals["tokens"] == {"rehearsal": 7}


def test_study_profile_stage_split_on_hand_made_numbers():
    from benchmarks.study_profile import stage_split

    split = stage_split({"seconds": {"forward": 1.5, "backward": 0.5, "eval": 1.0}, "calls": {},
                         "tokens": {"forward": 300, "eval": 600}}, wall=5.0)
    assert split["seconds"]["other"] == pytest.approx(2.0)
    assert split["share"]["forward"] == pytest.approx(0.3)
    assert split["train_tokens_per_s"] == pytest.approx(150.0)  # 300 / (1.5 + 0.5 + 0)
    assert split["eval_tokens_per_s"] == pytest.approx(600.0)
    assert split["eval_over_train_tokens_per_s"] == pytest.approx(4.0)


def test_study_profile_on_a_tiny_model_splits_a_stage_of_every_method(tmp_path):
    import torch

    import aimm.engine
    import aimm.util
    from benchmarks import study_profile

    backward, writer = torch.Tensor.backward, aimm.util.atomic_write_bytes
    out = tmp_path / "sp.json"
    study_profile.main([
        "--model", "tiny-causal", "--threads", "1", "--max-train", "12", "--batch-size", "3",
        "--memory-batch-size", "4", "--max-test", "2", "--eval-batch-size", "2",
        "--prompt-tokens", "24", "--max-input-len", "64", "-o", "aimmerging:initial_interval=2",
        "-o", "recurrent_kif:interval=2", "--ops", "same", "--top", "5", "--out", str(out)])
    # every hook is gone afterwards
    assert torch.Tensor.backward is backward and aimm.util.atomic_write_bytes is writer
    import aimm.training.artifacts

    assert aimm.training.artifacts.atomic_write_bytes is writer
    data = json.loads(out.read_text())
    assert data["partial"] is False
    assert list(data["methods"]) == ["seq_lora", "replay", "aimmerging", "recurrent_kif"]
    for method, r in data["methods"].items():
        assert r["hooks_missing"] == [], method
        assert [st["stage"] for st in r["stages"]] == [0, 1]
        assert r["stages"][0]["seconds"]["model_load"] > 0
        st = r["stages"][-1]
        sec = st["seconds"]
        for cat in ("forward", "backward", "optimizer", "eval", "data", "writes"):
            assert positive_finite(sec[cat]), (method, cat)
        assert sum(sec.values()) == pytest.approx(st["wall_s"], rel=1e-6)
        assert sum(s["wall_s"] for s in r["stages"]) == pytest.approx(r["run_wall_s"], rel=1e-6)
        assert positive_finite(st["eval_over_train_tokens_per_s"])
        timers = st["engine_timers"]
        for cat in ("probe", "rehearsal"):  # the hooks see what the engine's own timers see
            assert sec[cat] == pytest.approx(timers[cat], abs=0.02 + 0.1 * timers[cat])
        assert r["ops"]["top"] and positive_finite(r["ops"]["top"][0]["self_cpu_s"])
    for method in ("seq_lora", "replay"):
        sec = data["methods"][method]["stages"][-1]["seconds"]
        assert sec["probe"] == sec["rehearsal"] == sec["merge"] == 0
    aim = data["methods"]["aimmerging"]["stages"][-1]
    assert aim["merges"] >= 1 and aim["seconds"]["probe"] > 0 and aim["seconds"]["merge"] > 0
    kif = data["methods"]["recurrent_kif"]["stages"][-1]
    assert kif["merges"] >= 1 and kif["seconds"]["rehearsal"] > 0 and kif["seconds"]["probe"] == 0


def test_study_profile_bad_method_is_one_line_and_exit_2(capsys):
    from benchmarks import study_profile

    with pytest.raises(SystemExit) as exc:
        study_profile.main(["--methods", "seq_lora,nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--methods" in err[0] and "aimmerging" in err[0]


def test_train_overhead_gives_every_other_method_its_line(tmp_path):
    """`make bench` runs `--settings release,fast,methods`: every registered sequential method
    gets a run and a ratio to seq_lora, each on its own model (full fine-tuning, prompt tuning,
    adapter stacks and merge hooks must not leak into the next method's run)."""
    from benchmarks import train_overhead

    out = tmp_path / "to.json"
    train_overhead.main([
        "--model", "tiny-causal", "--batch-size", "3", "--max-train", "6", "--task1-steps", "1",
        "--memory-batch-size", "4", "--max-test", "1", "--prompt-tokens", "16",
        "--max-input-len", "48", "--repeats", "1", "--warmup-steps", "0",
        "--settings", "methods", "--out", str(out)])
    data = json.loads(out.read_text())
    others = train_overhead.other_methods()
    assert len(others) >= 15 and {"ewc", "olora", "seq_ft", "progprompt", "opcm"} <= set(others)
    assert data["variants"] == ["seq_lora", *others]
    for name in others:
        assert positive_finite(data["ratios"][name]["time_per_optimizer_step"]), name
        assert positive_finite(data["ratios"][name]["peak_memory"]), name


# ------------------------------------------------------------------------------ dtype_speed
def test_dtype_speed_times_both_dtypes_and_records_the_auto_choice(tmp_path, tiny_data):
    from aimm.hardware import auto_dtype
    from benchmarks import dtype_speed

    out = tmp_path / "dtype.json"
    dtype_speed.main(["--model", "tiny-causal", "--steps", "2", "--seq-len", "16", "--n-eval", "3",
                      "--task", "agnews", "--data-dir", str(tiny_data / "data_longsequence"),
                      "--gemm-seconds", "0.01", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["auto_chooses"] == auto_dtype("cpu")
    for name in ("float32", "bfloat16"):
        row = data["dtypes"][name]
        assert len(row["step_s"]) == 2 and all(positive_finite(s) for s in row["step_s"]), name
        assert positive_finite(row["gemm_flops_per_s"]) and positive_finite(row["eval_s"]), name
    assert all(positive_finite(v) for v in data["bf16_over_fp32"].values())
    assert data["environment"]["architecture"]


@pytest.mark.parametrize("args, named", [(["--steps", "0"], "--steps 0"),
                                         (["--dtypes", "float16"], "--dtypes float16"),
                                         (["--task", "nope"], "--task nope")])
def test_dtype_speed_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, named):
    from benchmarks import dtype_speed

    with pytest.raises(SystemExit) as exc:
        dtype_speed.main(["--model", "tiny-causal", "--data-dir", str(tmp_path),
                          "--out", str(tmp_path / "x.json"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0]
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------ attention_dtype
def test_attention_dtype_times_both_kernels_and_measures_both_attentions_against_float32(tmp_path):
    from benchmarks import attention_dtype

    out = tmp_path / "ad.json"
    attention_dtype.main(["--model", "tiny-causal", "--batch-size", "2", "--seq-len", "24",
                          "--reps", "2", "--n-eval", "3", "--eval-reps", "1", "--threads", "1",
                          "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["kernel_shape"]["seq_len"] == 24 and data["kernel_shape"]["batch"] == 2
    for dtype in ("bfloat16", "float32"):
        assert positive_finite(data["kernel"][dtype]["forward_ms"])
        assert positive_finite(data["kernel"][dtype]["backward_ms"])
    precision = data["precision"]
    assert positive_finite(precision["float32_model_loss"])
    for attention in ("model", "float32"):
        p = precision[f"bf16_model_attention_{attention}"]
        # bf16 rounding: close to the float32 model, but not equal to it
        assert 0 < p["grad_rel_diff"] < 0.1 and p["abs_loss_diff"] < 0.05, p
        assert positive_finite(data["label_scoring_s"][attention])
    assert data["label_scoring_s"]["n_prompts"] == 3


def test_attention_dtype_refuses_a_bad_size_in_one_line(capsys):
    from benchmarks import attention_dtype

    with pytest.raises(SystemExit) as exit_:
        attention_dtype.main(["--seq-len", "3"])
    assert exit_.value.code == 2
    assert "--seq-len 3: must be >= 16" in capsys.readouterr().err
