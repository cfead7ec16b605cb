"""Experiment trackers (``--log-with tensorboard|mlflow|wandb``): an engine callback that logs a
run through ``accelerate``'s trackers into ``<run dir>/logs/``.

Logged, at the run's global inner step unless said otherwise:

* per inner step: ``train/loss``, ``train/lr`` and, when the method records them,
  ``signal/forgetting`` (the history loss), ``signal/threshold``, ``signal/interval``,
  ``signal/activations``;
* per merge: ``merge/lambda`` (Λ), ``merge/w_in``, ``merge/w_out``, ``merge/interval_after`` and
  ``merge/kind`` (text);
* per task, at step k (the k-th stage): ``scores/<task>`` (the scores row) and the running
  metrics ``metrics/OP``, ``metrics/BWT``, ``metrics/forgetting`` over the tasks so far;
* the run config as hyper-parameters (nested options flattened to ``a.b`` keys).

Where: TensorBoard ``logs/tensorboard/<run id>/`` (``tensorboard --logdir <run dir>/logs``);
MLflow a local file store ``logs/mlruns`` (no server); W&B offline mode in ``logs/wandb``
unless ``WANDB_MODE`` says otherwise (no account). The engine calls it on the main process only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

from aimm.config import ConfigError

#: tracker -> the package it needs
TRACKERS: dict[str, str] = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
STEP_SIGNALS = {"forgetting_signal": "signal/forgetting", "threshold": "signal/threshold",
                "interval": "signal/interval", "activations": "signal/activations"}
MERGE_VALUES = {"lambda": "merge/lambda", "w_in": "merge/w_in", "w_out": "merge/w_out",
                "interval_after": "merge/interval_after"}


def check_trackers(names: Iterable[str]) -> list[str]:
    """Known, installed tracker names (duplicates dropped); else :class:`ConfigError`."""
    import importlib.util

    out: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--log-with {name!r}: choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"--log-with {name}: the '{TRACKERS[name]}' package is not installed "
                              f"(pip install {TRACKERS[name]})")
        if name not in out:
            out.append(name)
    return out


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Hyper-parameters for every tracker: nested dicts as ``a.b``; lists and None as text."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def running_metrics(rows: list[dict]) -> dict[str, float]:
    """OP / BWT / forgetting over the stages so far, from the engine's score rows."""
    from aimm.metrics import cl_metrics

    stages = sorted({r["stage"] for r in rows})
    tasks = list(dict.fromkeys(r["eval_task"] for r in sorted(rows, key=lambda r: r["stage"])))
    score = {(r["stage"], r["eval_task"]): r["score"] for r in rows}
    last = stages[-1]
    if len(stages) != len(tasks) or any((s, t) not in score for i, s in enumerate(stages)
                                        for t in tasks[:i + 1]):
        # not one stage per task (joint or per-task adapters): the mean of the last row
        latest = [r["score"] for r in rows if r["stage"] == last]
        return {"metrics/OP": sum(latest) / len(latest)}
    matrix = [[score.get((s, t), float("nan")) for t in tasks] for s in stages]
    metrics = cl_metrics(matrix)
    return {f"metrics/{k}": v for k, v in metrics.items() if _number(v) is not None}


class Tracking:
    """Engine callback logging to the named trackers; :meth:`finish` closes them."""

    def __init__(self, names: Iterable[str], run_dir: str | Path, config: dict[str, Any]) -> None:
        self.names = check_trackers(names)
        self.run_dir = Path(run_dir)
        self.logs = self.run_dir / "logs"
        self.config = config
        self.trackers: list = []
        self.rows: list[dict] = []
        self.offset = 0  # global step of the current stage's step 0
        self.started = False

    # ---------------------------------------------------------------- set-up
    def _start(self) -> None:
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        self.started = True
        run_name = self.run_dir.name
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            if name == "tensorboard":
                tracker = TensorBoardTracker(run_name, self.logs / "tensorboard")
            elif name == "mlflow":
                import mlflow

                store = self.logs / "mlruns"
                # a local file store, no server: MLflow 3 keeps it in maintenance mode and
                # refuses it unless told (a database store would need SQLAlchemy + a server-side
                # schema migration for a single run's log)
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri(store.resolve().as_uri())
                tracker = MLflowTracker(experiment_name="aimm", logging_dir=str(store),
                                        run_name=run_name)
            else:
                os.environ.setdefault("WANDB_MODE", "offline")
                tracker = WandBTracker("aimm", name=run_name, dir=str(self.logs))
            tracker.start()
            tracker.store_init_configuration(flatten(self.config))
            self.trackers.append(tracker)
        scores = self.run_dir / "scores.csv"
        if scores.is_file():  # a resumed run: the rows of the stages done before
            import pandas as pd

            self.rows = pd.read_csv(scores).to_dict("records")

    def _log(self, values: dict[str, Any], step: int) -> None:
        if not self.started:
            self._start()
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=step)

    # ---------------------------------------------------------------- engine hooks
    def on_step(self, record: dict) -> None:
        self.offset = record["global_step"] - record["step"]
        values = {"train/loss": _number(record.get("loss")), "train/lr": _number(record.get("lr"))}
        values.update({tag: _number(record.get(key)) for key, tag in STEP_SIGNALS.items()})
        self._log({k: v for k, v in values.items() if v is not None}, record["global_step"])

    def on_merge(self, event: dict) -> None:
        values: dict[str, Any] = {tag: _number(event.get(key)) for key, tag in MERGE_VALUES.items()}
        values = {k: v for k, v in values.items() if v is not None}
        if event.get("kind"):
            values["merge/kind"] = str(event["kind"])
        self._log(values, self.offset + int(event["step"]))

    def on_stage_end(self, stage, rows: list[dict]) -> None:
        self.rows = [r for r in self.rows if r["stage"] != stage.index] + list(rows)
        values = {f"scores/{r['eval_task']}": _number(r["score"]) for r in rows}
        if self.rows:
            values.update(running_metrics(self.rows))
        self._log({k: v for k, v in values.items() if v is not None}, stage.index + 1)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


__all__ = ["TRACKERS", "Tracking", "check_trackers", "flatten", "running_metrics"]
