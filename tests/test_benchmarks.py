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
    names = ["eval_throughput_qwen3", "train_overhead_qwen3", "train_overhead_t5"]
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
