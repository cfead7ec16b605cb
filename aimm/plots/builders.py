"""The full set of figures of one run, or of a comparison of runs, from their run directories."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import pandas as pd
import plotly.graph_objects as go

from aimm.methods import METHODS
from aimm.plots.results import metrics_bars, scores_heatmap, task1_figure
from aimm.plots.theme import METHOD_COLORS, PALETTE, method_color, safe_key
from aimm.plots.trajectory import (
    _numeric,
    forgetting_signal_figure,
    interval_figure,
    select_task,
    signals_figure,
    training_figure,
)

#: methods without a "score on task 1 after each task" curve (joint or one adapter per task)
NOT_SEQUENTIAL = tuple(name for name, cls in METHODS.items() if not cls.sequential())


def is_joint(method: str) -> bool:
    """A joint-training (multi-task) method: its final scores are the Multi-task reference."""
    cls = METHODS.get(method)
    return cls is not None and cls.joint


@dataclass
class RunData:
    """Everything the figures need from one run directory (missing parts are empty)."""

    path: Path
    method: str = ""
    config: dict = field(default_factory=dict)
    steps: pd.DataFrame = field(default_factory=pd.DataFrame)
    merges: pd.DataFrame = field(default_factory=pd.DataFrame)
    matrix: pd.DataFrame = field(default_factory=pd.DataFrame)
    metrics: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """Trained tasks in stage order."""
        if self.steps.empty or "task" not in self.steps.columns:
            return [str(t) for t in self.config.get("tasks") or []]
        s = self.steps
        if "stage" in s.columns:
            s = s.sort_values(["stage", "step"] if "step" in s.columns else ["stage"])
        return [str(t) for t in dict.fromkeys(s["task"])]

    def has_history(self, task: str) -> bool:
        return bool(_numeric(select_task(self.steps, task), "forgetting_signal").notna().any())

    def has_merges(self, task: str) -> bool:
        return not select_task(self.merges, task).empty

    def has_interval(self, task: str) -> bool:
        return self.has_merges(task) or bool(
            _numeric(select_task(self.steps, task), "interval").notna().any())


def load_run_data(run_dir: str | Path) -> RunData:
    """Read a run directory with :mod:`aimm.runs`; unreadable parts stay empty."""
    from aimm import runs

    run_dir = Path(run_dir)
    data = RunData(path=run_dir)
    for attr, fn in (("config", runs.load_config), ("metrics", runs.load_metrics),
                     ("matrix", runs.load_scores_matrix)):
        try:
            setattr(data, attr, fn(run_dir))
        except (OSError, ValueError):
            pass
    try:
        data.steps, data.merges = runs.load_trajectory(run_dir)
    except (OSError, ValueError):
        pass
    data.method = str(data.config.get("method") or data.metrics.get("method") or "")
    return data


def multitask_score(run: RunData, first_task: str | None) -> float | None:
    """The ``mtl`` run's final score on ``first_task`` (its first column when absent): the
    Multi-task line of the task-1 curve."""
    m = run.matrix
    if m.empty:
        return None
    col = first_task if first_task in m.columns else m.columns[0]
    value = pd.to_numeric(m[col], errors="coerce").dropna()
    return float(value.iloc[-1]) if len(value) else None


def task1_curve(runs: Mapping[str, RunData], *, colors: Mapping[str, str] | None = None,
                titled: bool = False) -> go.Figure:
    """The score on the first task after each task of the sequential runs, with the Multi-task
    line of a joint-training run among ``runs`` (``titled``: a title naming the first task)."""
    sequential = {lab: r.matrix for lab, r in runs.items()
                  if r.method not in NOT_SEQUENTIAL and not r.matrix.empty}
    first = next((m.columns[0] for m in sequential.values() if len(m.columns)), None)
    joint = next((r for r in runs.values() if is_joint(r.method) and not r.matrix.empty), None)
    return task1_figure(sequential, multitask=multitask_score(joint, first) if joint else None,
                        colors=colors, title=f"Score on the first task ({first})" if titled else None)


def run_figures(run_dir: str | Path) -> dict[str, go.Figure]:
    """All figures of one run: ``signals_<task>``, ``interval_<task>``, ``forgetting_signal_<task>``
    (tasks with a forgetting signal / merges), ``training``, ``heatmap_<method>``,
    ``task1_curve`` and ``metrics_bars``."""
    run = load_run_data(run_dir)
    label = run.method or Path(run_dir).name
    figs: dict[str, go.Figure] = {}
    for task in run.tasks:
        key = safe_key(task)
        if run.has_history(task) or run.has_merges(task):
            figs[f"signals_{key}"] = signals_figure(run.steps, run.merges, task)
        if run.has_interval(task):
            figs[f"interval_{key}"] = interval_figure(run.steps, run.merges, task)
        if run.has_history(task):
            figs[f"forgetting_signal_{key}"] = forgetting_signal_figure({label: run.steps}, task)
    figs["training"] = training_figure(run.steps, run.merges)
    figs[f"heatmap_{safe_key(label)}"] = scores_heatmap(run.matrix, title=None)
    if run.method not in NOT_SEQUENTIAL and len(run.matrix) > 1:
        figs["task1_curve"] = task1_figure({label: run.matrix})
    if run.metrics:
        figs["metrics_bars"] = metrics_bars({label: run.metrics})
    return figs


def _run_colors(runs: Mapping[str, RunData]) -> dict[str, str]:
    """One colour per label: its method's colour, the first time that colour is used."""
    colors: dict[str, str] = {}
    used: set[str] = set()
    spare = iter(PALETTE * 4)
    for label, run in runs.items():
        color = method_color(label) if method_color(label) in METHOD_COLORS.values() else None
        color = color or METHOD_COLORS.get(run.method)
        if color is None or color in used:
            color = next(c for c in spare if c not in used)
        colors[label] = color
        used.add(color)
    return colors


def comparison_figures(run_dirs: Mapping[str, str | Path]) -> dict[str, go.Figure]:
    """Figures comparing runs (``{label: run_dir}``): ``task1_curve`` (with the Multi-task line
    from an ``mtl`` run), ``metrics_bars``, ``heatmap_<label>``, ``forgetting_signal_<task>`` (all
    runs with a forgetting signal) and ``signals_<task>`` / ``interval_<task>`` of the merging
    runs (``signals_<label>_<task>`` when there are several)."""
    runs = {str(label): load_run_data(d) for label, d in run_dirs.items()}
    colors = _run_colors(runs)
    figs: dict[str, go.Figure] = {}
    figs["task1_curve"] = task1_curve(runs, colors=colors)
    figs["metrics_bars"] = metrics_bars({lab: r.metrics for lab, r in runs.items() if r.metrics},
                                        colors=colors)
    for label, run in runs.items():
        figs[f"heatmap_{safe_key(label)}"] = scores_heatmap(run.matrix)
    tasks: list[str] = []
    for run in runs.values():
        tasks += [t for t in run.tasks if t not in tasks]
    for task in tasks:
        with_hist = {lab: r.steps for lab, r in runs.items() if r.has_history(task)}
        if with_hist:
            figs[f"forgetting_signal_{safe_key(task)}"] = forgetting_signal_figure(with_hist, task, colors=colors)
    merging = {lab: r for lab, r in runs.items() if not r.merges.empty}
    for label, run in merging.items():
        prefix = "" if len(merging) == 1 else f"{safe_key(label)}_"
        for task in run.tasks:
            if run.has_merges(task) or run.has_history(task):
                title = task if len(merging) == 1 else f"{label}: {task}"
                figs[f"signals_{prefix}{safe_key(task)}"] = signals_figure(run.steps, run.merges, task,
                                                                           title=title)
            if run.has_interval(task):
                title = task if len(merging) == 1 else f"{label}: {task}"
                figs[f"interval_{prefix}{safe_key(task)}"] = interval_figure(run.steps, run.merges, task,
                                                                             title=title)
    return figs


__all__ = ["RunData", "load_run_data", "run_figures", "comparison_figures", "task1_curve"]

