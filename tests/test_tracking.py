"""``--log-with tensorboard``: the event files hold every step, merge and task; the running
metrics are those of the scores matrix; bad tracker names end in one line."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from aimm.cli import main
from aimm.metrics import cl_metrics
from aimm.runs import load_trajectory
from aimm.tracking import flatten, running_metrics


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out: dict[str, dict[str, list]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            out.setdefault(run, {})[tag] = [(e.step, e.value) for e in mux.Scalars(run, tag)]
    return out, mux


@pytest.mark.slow
def test_tensorboard_logs_every_step_merge_and_task(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["run", "--method", "aimmerging", "-o", "initial_interval=2", "--benchmark",
            "long_sequence", "--tasks", "sst-2,agnews", "--data-dir", str(tiny_data), "--model",
            "tiny-causal", "--max-train", "16", "--max-test", "4", "--batch-size", "4",
            "--max-input-len", "64", "--eval-batch-size", "8", "--run-dir", str(run_dir),
            "--no-progress", "--log-with", "tensorboard", "--log-with", "tensorboard"]
    assert main(argv) == 0
    scalars, mux = _scalars(run_dir / "logs")
    assert set(scalars) == {"tensorboard/run"}, sorted(scalars)  # logs/tensorboard/<run id>
    main_run = scalars["tensorboard/run"]
    steps, merges = load_trajectory(run_dir)
    assert [s for s, _ in main_run["train/loss"]] == list(steps["global_step"])
    assert [v for _, v in main_run["train/loss"]] == pytest.approx(list(steps["loss"]), rel=1e-6)
    assert len(main_run["train/lr"]) == len(steps)
    forgetting = steps.dropna(subset=["forgetting_signal"])
    assert len(forgetting) > 0 and len(main_run["signal/forgetting"]) == len(forgetting)
    assert len(main_run["signal/threshold"]) == steps["threshold"].notna().sum()
    assert len(main_run["signal/interval"]) == steps["interval"].notna().sum()
    assert len(merges) >= 1 and len(main_run["merge/lambda"]) == len(merges)
    assert [v for _, v in main_run["merge/w_in"]] == pytest.approx(list(merges["w_in"]))
    matrix = pd.read_csv(run_dir / "scores_matrix.csv", index_col=0)
    assert [s for s, _ in main_run["scores/sst-2"]] == [1, 2]
    assert [s for s, _ in main_run["scores/agnews"]] == [2]
    assert main_run["scores/agnews"][0][1] == pytest.approx(matrix.loc["agnews", "agnews"])
    assert [s for s, _ in main_run["metrics/OP"]] == [1, 2]
    assert main_run["metrics/OP"][-1][1] == pytest.approx(
        pd.read_json(run_dir / "metrics.json", typ="series")["OP"])
    assert [s for s, _ in main_run["metrics/BWT"]] == [2]  # BWT needs two tasks
    texts = mux.Runs()["tensorboard/run"]["tensors"]
    assert "merge/kind/text_summary" in texts
    from tensorboard.plugins.hparams import plugin_data_pb2

    starts = [plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
              for tags in mux.PluginRunToTagToContent("hparams").values()
              for tag, content in tags.items() if tag == "_hparams_/session_start_info"]
    assert len(starts) == 1  # the run config as hyper-parameters
    hparams = starts[0].hparams
    assert hparams["method"].string_value == "aimmerging" and hparams["batch_size"].number_value == 4
    assert hparams["method_options.initial_interval"].number_value == 2


def test_running_metrics_are_those_of_the_matrix_so_far():
    rows = [{"stage": 0, "eval_task": "a", "score": 0.5},
            {"stage": 1, "eval_task": "a", "score": 0.25}, {"stage": 1, "eval_task": "b", "score": 0.75},
            {"stage": 2, "eval_task": "a", "score": 0.0}, {"stage": 2, "eval_task": "b", "score": 0.5},
            {"stage": 2, "eval_task": "c", "score": 1.0}]
    got = running_metrics(rows[:3])
    want = cl_metrics([[0.5, math.nan], [0.25, 0.75]])
    assert got == {"metrics/OP": want["OP"], "metrics/BWT": want["BWT"],
                   "metrics/forgetting": want["forgetting"]}
    assert got["metrics/BWT"] == pytest.approx(-0.25)
    assert running_metrics(rows)["metrics/OP"] == pytest.approx(0.5)
    assert running_metrics(rows[:1]) == {"metrics/OP": 0.5}  # BWT/forgetting: NaN with T=1
    joint = [{"stage": 0, "eval_task": t, "score": s} for t, s in (("a", 0.2), ("b", 0.4))]
    assert running_metrics(joint) == {"metrics/OP": pytest.approx(0.3)}
    assert flatten({"a": 1, "o": {"x": None, "y": [1]}}) == {"a": 1, "o.x": "None", "o.y": "[1]"}


def test_log_with_names_the_problem(tmp_path, capsys):
    assert main(["run", "--log-with", "tensorbord", "--run-dir", str(tmp_path / "r")]) == 2
    assert "--log-with 'tensorbord': choose from tensorboard, mlflow, wandb" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_mlflow_logs_into_a_local_file_store_read_back_with_its_client(tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    argv = ["run", "--method", "aimmerging", "-o", "initial_interval=2", "--benchmark",
            "long_sequence", "--tasks", "sst-2,agnews", "--data-dir", str(tiny_data), "--model",
            "tiny-causal", "--max-train", "16", "--max-test", "4", "--batch-size", "4",
            "--max-input-len", "64", "--eval-batch-size", "8", "--run-dir", str(run_dir),
            "--no-progress", "--log-with", "mlflow"]
    assert main(argv) == 0
    client = MlflowClient(tracking_uri=(run_dir / "logs" / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "aimm"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["method"] == "aimmerging"
    assert run.data.params["method_options.initial_interval"] == "2"
    steps, merges = load_trajectory(run_dir)
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == list(steps["global_step"])
    assert [m.value for m in loss] == pytest.approx(list(steps["loss"]), rel=1e-6)
    assert len(merges) >= 1
    assert len(client.get_metric_history(run.info.run_id, "merge/lambda")) == len(merges)
    op = client.get_metric_history(run.info.run_id, "metrics/OP")
    assert op[-1].value == pytest.approx(pd.read_json(run_dir / "metrics.json", typ="series")["OP"])
