"""The engine under `accelerate launch` with 2 CPU processes (gloo): one decision for all ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from aimm.runs import load_metrics, load_trajectory


def test_two_processes_stay_consistent_and_only_rank0_writes(tiny_data, tmp_path):
    run_dir = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu is accelerate's multi-process launcher; without GPUs it runs gloo on the CPU
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "aimm.cli", "run",
           "--model", "tiny-causal", "--method", "aimmerging", "-o", "initial_interval=2",
           "--benchmark", "long_sequence", "--tasks", "sst-2,agnews", "--data-dir", str(tiny_data),
           "--max-train", "16", "--max-test", "4", "--batch-size", "4", "--run-dir", str(run_dir),
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = sorted((run_dir / "stages").glob("*/stage.json"))
    assert len(stages) == 2
    for path in stages:
        info = json.loads(path.read_text())
        assert info["processes"] == 2
        sums = info["lora_checksum_per_rank"]
        assert len(sums) == 2 and sums[0] == sums[1]  # identical weights on both ranks
    steps, merges = load_trajectory(run_dir)
    assert len(merges) >= 1  # the merge ran (on both ranks, else the checksums would differ)
    assert not steps.duplicated(["stage", "step"]).any()  # one writer
    assert load_metrics(run_dir)["complete"]
    assert not list(run_dir.rglob(".write-test*"))
