"""Bad inputs fail early and clearly; SIGKILL anywhere resumes to identical metrics; NaN; determinism."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import nan_loss_at

from aimm.config import ConfigError, RunConfig
from aimm.training.engine import Engine, NonFiniteLossError, run
from aimm.runs import load_metrics, load_scores_matrix, load_trajectory, load_warnings


# ------------------------------------------------------------------ invalid parameters
@pytest.mark.parametrize("changes, needle", [
    ({"lr": -1e-4}, "lr=-0.0001: must be a positive number"),
    ({"batch_size": 0}, "batch_size=0: must be a positive integer"),
    ({"epochs": 0}, "epochs=0: must be a positive number"),
    ({"max_train": -5}, "max_train=-5"),
    ({"buffer_mode": "big"}, "buffer_mode='big'"),
    ({"method": "aimmergin"}, "did you mean 'aimmerging'"),
    ({"learning_rate": 1e-3}, "unknown parameter 'learning_rate'"),
    ({"method": "aimmerging", "method_options": {"min_interval": 10, "max_interval": 4}},
     "min_interval"),
    ({"method": "aimmerging", "method_options": {"intial_interval": 4}},
     "did you mean 'initial_interval'"),
    ({"benchmark": "standard_cl", "tasks": None, "order": 9}, "order=9"),
])
def test_invalid_hyperparameters_are_refused_by_name(tiny_config, changes, needle):
    from aimm.methods import build_method

    with pytest.raises(ConfigError, match=None) as err:
        build_method(tiny_config(**changes))  # the config's own fields, then the method's
    assert needle in str(err.value)


def test_unknown_task_names_the_missing_file(tiny_config, tiny_data):
    with pytest.raises(Exception) as err:
        run(tiny_config(tasks=["sst-2", "nosuchtask"]))
    assert "nosuchtask" in str(err.value) and "train" in str(err.value)


def test_run_dir_that_is_not_writable(tiny_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="a_file"):
        run(tiny_config(run_dir=str(blocker / "run")))


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "config.json missing"),
])
def test_model_path_errors(tiny_config, tmp_path, make, needle):
    with pytest.raises(ValueError, match=needle):
        run(tiny_config(model=str(make(tmp_path))))


def test_bad_data_fails_before_training_and_keeps_the_run_dir(tiny_config, tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    first = run(tiny_config(data_dir=str(data)))
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    (data / "data_longsequence" / "train" / "agnews_T5.json").write_text('[{"id": "x", "input": 1}]')
    with pytest.raises(Exception) as err:
        run(tiny_config(data_dir=str(data)))
    assert "agnews_T5.json: 0:" in str(err.value)
    after = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert before == after


def test_truncation_and_unseen_labels_are_recorded(tiny_config, tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    test_file = data / "data_longsequence" / "test" / "agnews_T5.json"
    records = json.loads(test_file.read_text())
    records[0]["output"] = "Science"
    test_file.write_text(json.dumps(records))
    run_dir = run(tiny_config(data_dir=str(data), max_input_len=12))
    warnings = " ".join(load_warnings(run_dir))
    assert "truncated" in warnings and "prompts to 12 tokens" in warnings
    assert "Science" in warnings


# ------------------------------------------------------------------ NaN


def test_nan_loss_stops_with_the_last_good_stage_intact(tiny_config):
    cfg = tiny_config(method="seq_lora")
    engine = Engine(cfg)
    engine.loss_hook = nan_loss_at(1, 2)
    with pytest.raises(NonFiniteLossError, match="step 2: training loss is nan"):
        engine.run()
    state = json.loads((Path(cfg.run_dir) / "state.json").read_text())
    assert state["completed"] == ["sst-2"]
    assert (Path(cfg.run_dir) / "stages" / "01_sst-2" / "adapter.safetensors").is_file()


def test_nan_loss_can_be_skipped_and_counted(tiny_config):
    engine = Engine(tiny_config(method="seq_lora", nan_policy="skip"))
    engine.loss_hook = nan_loss_at(1, 2)
    run_dir = engine.run()
    steps, _ = load_trajectory(run_dir)
    assert steps["skipped"].fillna(0).sum() == 1
    assert any("skipped 1 steps with a non-finite loss" in w for w in load_warnings(run_dir))
    assert load_metrics(run_dir)["complete"]


# ------------------------------------------------------------------ determinism
def test_same_seed_twice_gives_identical_results(tiny_config, tmp_path):
    opts = {"initial_interval": 2}
    a = run(tiny_config(method="aimmerging", method_options=opts, run_dir=str(tmp_path / "a")))
    b = run(tiny_config(method="aimmerging", method_options=opts, run_dir=str(tmp_path / "b")))
    pd.testing.assert_frame_equal(load_scores_matrix(a), load_scores_matrix(b))
    (sa, ma), (sb, mb) = load_trajectory(a), load_trajectory(b)
    pd.testing.assert_frame_equal(sa, sb)
    pd.testing.assert_frame_equal(ma, mb)


# ------------------------------------------------------------------ SIGKILL anywhere
def _cli(config_path: Path, crash: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("AIMM_CRASH_AT", None)
    if crash:
        env["AIMM_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "aimm.cli", "run", "--config", str(config_path)],
                          env=env, capture_output=True, text=True, timeout=300)


KILL_POINTS = ["train_step:3", "merge:2", "checkpoint_write:5", "eval:2", "stage_end:1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("kill")
    values = dict(benchmark="long_sequence", tasks=["sst-2", "agnews"], data_dir=str(tiny_data),
                  model="tiny-causal", max_train=16, max_test=4, batch_size=4, lr=1e-3,
                  max_input_len=64, eval_batch_size=8, memory_batch_size=4, buffer_fraction=0.25,
                  method="aimmerging", method_options={"initial_interval": 2},
                  checkpoint_every=1, progress=False)

    def config(name: str) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**values, "run_dir": str(root / name)}))
        return path

    result = _cli(config("reference"), None)
    assert result.returncode == 0, result.stderr
    return root, config


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_gives_the_uninterrupted_metrics(uninterrupted, point):
    root, config = uninterrupted
    name = "killed-" + point.replace(":", "-")
    cfg_path = config(name)
    killed = _cli(cfg_path, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (root / name / "metrics.json").is_file() or not load_metrics(root / name)["complete"]
    resumed = _cli(cfg_path, None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = root / "reference", root / name
    assert load_metrics(got) == load_metrics(ref)
    pd.testing.assert_frame_equal(load_scores_matrix(got), load_scores_matrix(ref))
    (s_ref, m_ref), (s_got, m_got) = load_trajectory(ref), load_trajectory(got)
    pd.testing.assert_frame_equal(s_got, s_ref)
    pd.testing.assert_frame_equal(m_got, m_ref)
    assert not list((got / "checkpoints").glob("*.tmp")) if (got / "checkpoints").exists() else True


# ------------------------------------------------------------------ crafted checkpoints
@pytest.fixture(scope="module")
def stopped_mid_stage(tmp_path_factory, tiny_data):
    """An uninterrupted seq_lora run, and the same run stopped by a NaN at stage 2's step 3: its
    within-stage checkpoint holds step 2 of the stage's 4. ``config(run_dir)`` gives the config."""
    root = tmp_path_factory.mktemp("crafted")
    values = dict(benchmark="long_sequence", tasks=["sst-2", "agnews"], data_dir=str(tiny_data),
                  model="tiny-causal", max_train=16, max_test=4, batch_size=4, epochs=1, lr=1e-3,
                  max_input_len=64, eval_batch_size=8, memory_batch_size=4, buffer_fraction=0.25,
                  method="seq_lora", checkpoint_every=1, progress=False)

    def config(run_dir: Path) -> RunConfig:
        return RunConfig.from_dict({**values, "run_dir": str(run_dir)})

    reference = run(config(root / "reference"))
    engine = Engine(config(root / "stopped"))
    engine.loss_hook = nan_loss_at(1, 3)
    with pytest.raises(NonFiniteLossError):
        engine.run()
    return root / "stopped", reference, config


def _resume_after(stopped_mid_stage, tmp_path, change=None) -> tuple[Path, Path, Path]:
    """A copy of the stopped run whose checkpoint ``change`` edits (re-encoded, so its sha256 is
    valid), resumed; returns the run dir, the checkpoint's path and the reference run."""
    from aimm.checkpoint import checkpoint_bytes, parse_checkpoint

    stopped, reference, config = stopped_mid_stage
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    ckpt = run_dir / "checkpoints" / "stage-02.safetensors"
    if change is not None:
        payload = parse_checkpoint(ckpt.read_bytes())
        assert payload["step"] == 2
        change(payload)
        ckpt.write_bytes(checkpoint_bytes(payload))
    assert run(config(run_dir)) == run_dir
    return run_dir, ckpt, reference


def _assert_restarted_like_the_reference(run_dir: Path, reference: Path) -> None:
    """Stage 2 ran all its 4 optimiser steps from its beginning: the uninterrupted run's results."""
    stage = json.loads((run_dir / "stages" / "02_agnews" / "stage.json").read_text())
    assert (stage["inner_steps"], stage["optimizer_steps"], stage["resumed_within_stage"]) == (4, 4, 0)
    steps, merges = load_trajectory(run_dir)
    assert steps.groupby("task")["step"].apply(list).to_dict() == {"sst-2": [1, 2, 3, 4],
                                                                   "agnews": [1, 2, 3, 4]}
    assert load_metrics(run_dir)["complete"]
    assert load_metrics(run_dir) == load_metrics(reference)
    pd.testing.assert_frame_equal(load_scores_matrix(run_dir), load_scores_matrix(reference))
    pd.testing.assert_frame_equal(steps, load_trajectory(reference)[0])


def _set_rng(key, value):
    return lambda ckpt: ckpt["rng"].__setitem__(key, value)


@pytest.mark.parametrize("change, needle", [
    (lambda ckpt: ckpt.__setitem__("optimizer", {}), "optimizer state is a dict of 0"),
    (_set_rng("torch", torch.zeros(3, dtype=torch.uint8)), "RNG state 'torch' refused (RuntimeError"),
    (_set_rng("python", ("x",)), "RNG state 'python' refused ("),
    (lambda ckpt: ckpt.__setitem__("step", 10**9), "step 1000000000 outside 1..4"),
], ids=["optimizer-empty", "torch-rng-3-bytes", "python-rng-bad", "step-1e9"])
def test_crafted_checkpoint_with_a_valid_sha256_is_reported_and_the_stage_restarts(
        stopped_mid_stage, tmp_path, change, needle):
    run_dir, ckpt, reference = _resume_after(stopped_mid_stage, tmp_path, change)
    reported = [w for w in load_warnings(run_dir)
                if w.startswith(f"{ckpt}: within-stage checkpoint not usable: ")]
    assert len(reported) == 1, load_warnings(run_dir)
    assert needle in reported[0] and "restarts from its beginning" in reported[0]
    assert "\n" not in reported[0]
    _assert_restarted_like_the_reference(run_dir, reference)


def test_a_restore_refused_half_way_stops_with_one_line_and_the_file_kept(stopped_mid_stage,
                                                                          tmp_path, monkeypatch):
    """Undoing a half-done restore would need copies of the whole training state (a full
    fine-tune's model): the run stops naming the file and the fix, and after that fix (delete
    it) the stage restarts and the run ends as an uninterrupted one."""
    from aimm.checkpoint import CheckpointError

    stopped, reference, config = stopped_mid_stage
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    ckpt = run_dir / "checkpoints" / "stage-02.safetensors"
    real = torch.optim.Optimizer.load_state_dict

    def load_then_refuse(self, state):  # the checkpoint's: the LoRA weights are in by now
        real(self, state)
        if len(self.state):
            raise RuntimeError("refused after loading")

    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", load_then_refuse)
    with pytest.raises(CheckpointError) as exc:
        run(config(run_dir))
    message = str(exc.value)
    assert message.startswith(f"{ckpt}: within-stage checkpoint refused half-way through its "
                              "restore (RuntimeError: refused after loading)")
    assert "delete the file and run again" in message and "\n" not in message
    assert ckpt.is_file()  # kept: the user decides
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", real)
    ckpt.unlink()
    assert run(config(run_dir)) == run_dir
    _assert_restarted_like_the_reference(run_dir, reference)


def _toy_checkpoint():
    """A checkpoint payload (as read back from its file) of 2 AdamW steps on two parameters, with
    a fresh optimiser and scheduler over the same parameters, as at a stage's start."""
    import random

    from aimm.checkpoint import capture_rng, checkpoint_bytes, parse_checkpoint

    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    payload = {"stage": 1, "step": 2, "lora": {"a": params[0].detach().clone()},
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "rng": capture_rng(random.Random(0)), "method": {},
               "steps": [{"step": 1}, {"step": 2}], "merges": [], "optimizer_steps": 2,
               "nonfinite": 0}
    fresh = torch.optim.AdamW(params, lr=1e-3)
    return (parse_checkpoint(checkpoint_bytes(payload)), fresh,
            torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 1.0))


def _edit(path: str, value):
    """A change setting ``ckpt[a][b]...`` (``path`` "a/b/..."; integer parts index lists/ids)."""
    def change(ckpt):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        target = ckpt
        for p in parents:
            target = target[p]
        target[last] = value(target[last]) if callable(value) else value
    return change


@pytest.mark.parametrize("change, needle", [
    (None, None),
    (_edit("optimizer", {}), "optimizer state is a dict of 0"),
    (_edit("optimizer/param_groups", []), "param_groups is a list of 0, expected a list of 1"),
    (_edit("optimizer/param_groups/0/params", [0]), "['params'] is a list of 1, expected a list of 2"),
    (_edit("optimizer/param_groups/0/lr", "x"), "['lr'] is 'x', expected a float"),
    (_edit("optimizer/param_groups/0/betas", [0.9, 0.99]), "['betas'] is a list of 2, expected a tuple"),
    (_edit("optimizer/param_groups/0/eps", 10**400), "['eps'] is 1000000000"),
    (_edit("optimizer/state/0/step", 10**400), "'step' is 1000000000"),
    (_edit("optimizer/state/0/exp_avg", torch.zeros(3, 2)),
     "parameter 0: 'exp_avg' is a tensor of shape (3, 2), not a finite tensor of shape (2, 3)"),
    (_edit("optimizer/state/1/exp_avg_sq", torch.full((4,), float("nan"))), "'exp_avg_sq' is a tensor"),
    (_edit("optimizer/state/1", lambda s: {"step": s["step"]}), "holds ['step'], the optimizer keeps"),
    (_edit("optimizer/state/7", {}), "parameter 7: no such parameter"),
    (_edit("scheduler", {}), "scheduler state keys differ"),
    (_edit("scheduler/last_epoch", "x"), "scheduler state['last_epoch'] is 'x', expected an int"),
    (_edit("scheduler/last_epoch", 3), "scheduler at step 3, the checkpoint at step 2"),
    (_edit("rng/torch", torch.zeros(3, dtype=torch.uint8)), "RNG state 'torch' refused (RuntimeError"),
    (_edit("rng/python", ("x",)), "RNG state 'python' refused ("),
    (_edit("rng/numpy", ("MT19937", np.zeros(3, dtype=np.uint32), 0, 0, 0.0)), "RNG state 'numpy' refused"),
    (_edit("rng/memory", [1, 2]), "RNG state 'memory' missing or of the wrong type"),
    (_edit("rng/cuda", "x"), "RNG state 'cuda' is not a list of byte tensors"),
    (_edit("step", 10**9), "step 1000000000 outside 1..4"),
    (_edit("step", 0), "step 0 outside 1..4"),
    (_edit("step", "2"), "field 'step' missing"),
    (_edit("stage", 5), "written for stage index 5, not this stage's 1"),
    (_edit("steps", [{"step": 1}]), "1 trajectory records for 2 steps"),
    (_edit("steps", [1, 2]), "trajectory or merge records are not all mappings"),
    (_edit("nonfinite", 3), "nonfinite 3 outside 0..2"),
    (_edit("optimizer_steps", 1), "optimizer_steps 1 < the 2 steps applied"),
])
def test_payload_problem_checks_the_structure_without_touching_any_state(change, needle):
    import random

    from aimm.checkpoint import payload_problem

    ckpt, optimizer, scheduler = _toy_checkpoint()
    if change is not None:
        change(ckpt)
    rng_before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    problem = payload_problem(ckpt, stage=1, total_steps=4, optimizer=optimizer, scheduler=scheduler)
    assert problem is None if needle is None else needle in (problem or ""), problem
    assert optimizer.state_dict()["state"] == {} and scheduler.last_epoch == 0  # untouched
    assert torch.equal(torch.get_rng_state(), rng_before[0]) and random.getstate() == rng_before[1]
    assert (np.random.get_state()[1] == rng_before[2]).all()
