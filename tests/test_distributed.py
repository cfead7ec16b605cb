"""The engine under `accelerate launch` with 2 CPU processes (gloo): one decision for all ranks."""

from __future__ import annotations

import json

from aimm.runs import load_metrics, load_trajectory
from conftest import launch_failure, launch_two_processes


def test_two_processes_stay_consistent_and_only_rank0_writes(tiny_data, tmp_path):
    run_dir = tmp_path / "ddp"
    result = launch_two_processes(
        "-m", "aimm.cli", "run", "--model", "tiny-causal", "--method", "aimmerging",
        "-o", "initial_interval=2", "--benchmark", "long_sequence", "--tasks", "sst-2,agnews",
        "--data-dir", str(tiny_data), "--max-train", "16", "--max-test", "4", "--batch-size", "4",
        "--run-dir", str(run_dir), "--no-progress")
    assert result.returncode == 0, launch_failure(result.stderr)
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


def test_process_count_problem_names_the_mismatch_and_the_fix():
    from aimm.training.launch import process_count_problem

    assert process_count_problem({}, 1) is None
    assert process_count_problem({"WORLD_SIZE": "1"}, 1) is None
    assert process_count_problem({"WORLD_SIZE": "2"}, 2) is None
    message = process_count_problem({"WORLD_SIZE": "2"}, 1)
    assert "launched as 2 processes" in message and "has 1" in message
    assert "PartialState(cpu=True)" in message


def test_a_stale_accelerate_state_is_refused_on_every_rank(tiny_data, tmp_path):
    """A bare PartialState() before a CPU run left each rank a one-process accelerator, training
    alone and writing the same run dir (tests/scaleout_worker.py did this until 2026-12-07)."""
    run_dir = tmp_path / "stale"
    script = tmp_path / "stale_state.py"
    script.write_text(
        "import sys\n"
        "from accelerate import PartialState\n"
        "PartialState()\n"
        "from aimm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    result = launch_two_processes(
        str(script), "run", "--model", "tiny-causal", "--method", "seq_lora",
        "--benchmark", "long_sequence", "--tasks", "sst-2,agnews", "--data-dir", str(tiny_data),
        "--max-train", "8", "--max-test", "2", "--batch-size", "4", "--run-dir", str(run_dir),
        "--no-progress")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "aimm run: error:" in line]
    assert len(errors) == 2, launch_failure(result.stderr)  # one line from each rank
    assert all("launched as 2 processes (WORLD_SIZE)" in line and "has 1" in line for line in errors)
    # refused before anything was written: rank 0 removes the dir it made, rank 1 makes none
    assert not run_dir.exists()


def test_a_random_shape_model_is_built_on_the_gpu_only_in_a_one_process_gpu_run():
    import torch

    from aimm.models import load_model
    from aimm.training.launch import random_model_device

    assert random_model_device("cuda", world_size=1) == "cuda"
    assert random_model_device("cpu", world_size=1) is None
    assert random_model_device("cuda", world_size=2) is None  # every rank's GPU is cuda:0 yet
    assert random_model_device("auto", world_size=1) == ("cuda" if torch.cuda.is_available() else None)
    # the device is honoured (meta: built without memory), and the default stays the CPU
    model = load_model("random:smollm2-135m", random_device="meta").model
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.config.num_hidden_layers == 30
    tiny = load_model("tiny-causal", random_device="meta").model  # only random: specs move
    assert {p.device.type for p in tiny.parameters()} == {"cpu"}
