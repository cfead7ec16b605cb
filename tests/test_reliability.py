"""Bad inputs fail early and clearly; SIGKILL anywhere resumes to identical metrics; NaN; determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
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
