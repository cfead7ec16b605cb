"""The notebooks' grid (methods x orders x seeds) as a study that :mod:`aimm.study` reads.

* notebook 02: :func:`write_study_index` writes ``runs.csv`` (method, seed, order, run_dir) and
  ``study.json`` (the reference method) into the output dir, the files ``aimm study`` writes, so
  ``aimm report --aggregate <output dir>`` and everything below work on a notebook grid too;
* notebook 03: :func:`seed_figures` (one method's signals and interval per task, one trace per
  seed) and :func:`controller_report` (per seed and task: merges by kind, the intervals S took,
  the largest forgetting signal / threshold);
* notebook 04: :func:`aggregate` (``summary.csv`` / ``summary.md`` / ``paired.csv``: mean, sample
  std and Student-t 95% interval per method and order) and :func:`study_figures` (bars with 95%
  error bars; the task-1 curve averaged over each method's runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from aimm.config import RunConfig
from aimm.methods import METHODS
from aimm.notebook.params import NotebookParams
from aimm.study.grid import CUSTOM, RUNS_CSV, read_runs_csv

DEFAULT_REFERENCE = "seq_lora"


def reference_method(methods: list[str]) -> str:
    """The method the paired differences compare with: seq_lora when in the grid, else the first."""
    return DEFAULT_REFERENCE if DEFAULT_REFERENCE in methods else methods[0]


def study_rows(cfgs: list[RunConfig], out_dir: str | Path) -> list[dict[str, Any]]:
    """``runs.csv`` rows of the planned runs: run_dir relative to ``out_dir`` (``..`` where the
    runs lie elsewhere), order ``custom`` for a custom task list."""
    rows = []
    for cfg in cfgs:
        order = CUSTOM if cfg.tasks else cfg.order
        run_dir = Path(os.path.relpath(Path(cfg.run_dir).resolve(), Path(out_dir).resolve()))
        rows.append({"method": cfg.method, "seed": cfg.seed, "order": order,
                     "run_dir": run_dir.as_posix()})
    return rows


def write_study_index(params: NotebookParams, cfgs: list[RunConfig]) -> Path:
    """``runs.csv`` and ``study.json`` of the grid into the output dir (every planned run, before
    any trains: the aggregation names the ones not finished)."""
    from aimm.runs import atomic_write_csv
    from aimm.study.report import write_settings

    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUNS_CSV
    atomic_write_csv(path, study_rows(cfgs, out))
    write_settings(out, {"methods": list(params.methods), "seeds": list(params.seeds),
                         "orders": params.orders, "source": "notebooks",
                         "reference": reference_method(list(params.methods))})
    return path


def study_index(params: NotebookParams) -> Path:
    """The output dir as a study folder: ``runs.csv`` is written from the parameters when
    notebook 02 has not written it (runs trained before, or elsewhere)."""
    from aimm.notebook.params import configs

    if not (params.out_dir / RUNS_CSV).is_file():
        write_study_index(params, configs(params))
    return params.out_dir


def several_seeds(params: NotebookParams) -> bool:
    return len(params.seeds) > 1


def _study(out_dir: str | Path) -> pd.DataFrame:
    return read_runs_csv(out_dir)


def merging_method(out_dir: str | Path) -> str | None:
    """The first method of the grid that merges (its class's ``merges`` fact)."""
    for m in dict.fromkeys(_study(out_dir)["method"]):
        if getattr(METHODS.get(m), "merges", False):
            return str(m)
    return None


def _orders(table: pd.DataFrame, method: str) -> list[str]:
    return list(dict.fromkeys(table.loc[table["method"] == method, "order"].astype(str)))


def seed_figures(out_dir: str | Path, method: str | None = None) -> dict[str, dict[str, Any]]:
    """Notebook 03's per-seed overlays of ``method`` (default: the first merging method), for
    every task after the first and every order: ``{"seed_signals": {"study_signals_<task>": fig},
    "seed_interval": {"study_interval_<task>": fig}}`` (``_o<order>`` appended with several orders).
    Empty sections when the grid has no merging method."""
    from aimm import plots
    from aimm.plots.theme import safe_key
    from aimm.study import seed_trajectories

    out: dict[str, dict[str, Any]] = {"seed_signals": {}, "seed_interval": {}}
    method = method or merging_method(out_dir)
    if method is None:
        return out
    orders = _orders(_study(out_dir), method)
    for order in orders:
        runs = seed_trajectories(out_dir, method, order)
        steps = [s for s, _ in runs.values() if "task" in s.columns]
        tasks = list(dict.fromkeys(t for s in steps for t in s["task"]))
        suffix = f"_o{order}" if len(orders) > 1 else ""
        name = plots.method_label(method)
        for task in tasks[1:]:
            key = f"{safe_key(task)}{suffix}"
            where = f"{task}" + (f" (order {order})" if suffix else "")
            out["seed_signals"][f"study_signals_{key}"] = plots.seed_signals_figure(
                runs, task, title=f"{name}, {len(runs)} seeds: {where}")
            out["seed_interval"][f"study_interval_{key}"] = plots.seed_interval_figure(
                runs, task, title=f"Merge interval, {len(runs)} seeds: {where}")
    return out


def controller_report(out_dir: str | Path, method: str | None = None) -> pd.DataFrame:
    """What ``method``'s controller (default: the first merging method) did in each run of the
    grid, per order, seed and task (:func:`aimm.study.controller_table`): merges by kind, the
    interval values S took, ``max_signal_ratio`` (largest forgetting signal / threshold; >= 1:
    the threshold was reached). Tasks without a controller (the first) are left out."""
    from aimm.study import controller_table, seed_trajectories

    method = method or merging_method(out_dir)
    if method is None:
        return pd.DataFrame()
    parts = []
    for order in _orders(_study(out_dir), method):
        table = controller_table(seed_trajectories(out_dir, method, order),
                                 kinds=getattr(METHODS.get(method), "merge_kinds", ()))
        if table.empty:
            continue
        table = table[table["merges"] > 0] if "merges" in table.columns else table
        parts.append(table.assign(method=method, order=order))
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    kinds = [c for c in table.columns if c.startswith("merges_")]
    table[kinds] = table[kinds].fillna(0).astype(int)  # a kind one order never saw
    first = ["method", "order", "seed", "task"]
    return table[first + [c for c in table.columns if c not in first]]


def aggregate_study(out_dir: str | Path):
    """Recompute and write ``summary.csv`` / ``summary.md`` / ``paired.csv`` from the grid's run
    directories (:func:`aimm.study.write_aggregate`); returns the :class:`aimm.study.Aggregate`."""
    from aimm.study import write_aggregate

    return write_aggregate(out_dir)


def has_intervals(summary: pd.DataFrame) -> bool:
    """Some method has two runs or more (a 95% interval exists)."""
    return not summary.empty and bool((pd.to_numeric(summary["n"], errors="coerce") >= 2).any())


def mean_matrices(runs: dict[str, Path]) -> dict[str, pd.DataFrame]:
    """method -> the element-wise mean of its runs' scores matrices (runs of one task order)."""
    from aimm.runs import load_config, load_scores_matrix

    groups: dict[str, list[pd.DataFrame]] = {}
    for d in runs.values():
        if (Path(d) / "scores_matrix.csv").is_file():
            groups.setdefault(load_config(d)["method"], []).append(load_scores_matrix(d))
    return {m: sum(ms[1:], ms[0]) / len(ms) for m, ms in groups.items() if ms}


def study_figures(agg, runs: dict[str, Path]) -> dict[str, Any]:
    """Notebook 04's figures of a grid: ``study_metrics_ci`` (OP / BWT / FWT / forgetting per
    method, mean with 95% error bars; the ``all`` rows with several orders) and
    ``study_task1_curve`` (score on task 1 after each task, mean over each method's runs; one
    order only)."""
    from aimm import plots

    figs: dict[str, Any] = {"study_metrics_ci": plots.method_ci_bars(
        agg.summary, title="Continual-learning metrics (mean, 95% CI)")}
    if agg.summary["order"].astype(str).nunique() == 1:
        n = int(pd.to_numeric(agg.summary["n"]).max())
        figs["study_task1_curve"] = plots.task1_figure(
            mean_matrices(runs), title=f"Score on the first task (mean of {n} runs)")
    return figs


__all__ = ["aggregate_study", "controller_report", "has_intervals", "mean_matrices",
           "merging_method", "reference_method", "seed_figures", "several_seeds", "study_figures",
           "study_index", "study_rows", "write_study_index"]
