"""Aggregation of a study: per-run numbers -> summary per method and order, paired differences.

Two layers. :func:`read_results` reads the run directories listed in ``DIR/runs.csv`` (the only
I/O here, through :mod:`aimm.runs`). Everything else is pure, one small function per table:
:func:`runs_table` (one row per complete run, FWT against the single_task run of the same seed and
order), :func:`summary_table` (mean, sample std, Student-t 95% interval per method and order, plus
an ``all`` row per method over several orders), :func:`paired_table` (each method minus the
reference on the same seed and order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from aimm import metrics as cl
from aimm.methods import METHODS
from aimm.runs import load_metrics, load_scores_matrix, load_trajectory
from aimm.study.grid import read_runs_csv
from aimm.study.stats import estimate, paired_difference

METRICS = ("OP", "BWT", "FWT", "forgetting")
LOWER_IS_BETTER = {"forgetting"}
ALL = "all"
SINGLE_TASK = "single_task"


@dataclass
class RunResult:
    """What the aggregation needs from one run directory."""

    method: str
    seed: int
    order: str
    run_dir: str  # as listed in runs.csv (relative to the study folder)
    complete: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    matrix: pd.DataFrame = field(default_factory=pd.DataFrame)
    train_seconds: float = float("nan")
    eval_seconds: float = float("nan")
    merge_kinds: dict[str, int] = field(default_factory=dict)
    problem: str = ""  # why the run is not aggregated (missing, incomplete, unreadable)


# ------------------------------------------------------------------------------ reading
def _stage_seconds(run_dir: Path, stages_done: int | None) -> tuple[float, float]:
    """Train and eval seconds over the ``stage.json`` of the completed stages, the first
    ``stages_done`` (any other folder is an orphan a resume redoes: not read); RunDirError names
    a malformed one."""
    from aimm.integrity import read_stage_record

    train = evaluate = 0.0
    for path in sorted((run_dir / "stages").glob("*/stage.json")):
        number = path.parent.name.split("_", 1)[0]
        number = int(number) if number.isascii() and number.isdigit() else None
        if stages_done is not None and (number is None or number > stages_done):
            continue
        info = read_stage_record(path, number or 1)
        seconds = info.get("seconds", {})
        train += float(seconds.get("train", 0.0))
        evaluate += float(seconds.get("eval", 0.0))
    return train, evaluate


def read_run(path: Path, method: str, seed: int, order: str, run_dir: str) -> RunResult:
    """One run directory; a missing, incomplete or unreadable run says so in ``problem``."""
    result = RunResult(method=method, seed=int(seed), order=str(order), run_dir=run_dir)
    metrics_path = Path(path) / "metrics.json"
    if not metrics_path.is_file():
        result.problem = "not started" if not Path(path).is_dir() else "no results yet"
        return result
    try:
        result.metrics = load_metrics(path)
        result.complete = bool(result.metrics.get("complete"))
        if not result.complete:
            result.problem = (f"incomplete ({result.metrics.get('stages_done', 0)} stages done)")
            return result
        result.matrix = load_scores_matrix(path)
        result.train_seconds, result.eval_seconds = _stage_seconds(
            Path(path), result.metrics.get("stages_done"))
        if getattr(METHODS.get(method), "merges", False):
            _, merges = load_trajectory(path)
            kinds = merges["kind"].fillna("merge") if "kind" in merges.columns else \
                pd.Series(["merge"] * len(merges), dtype=object)
            result.merge_kinds = {str(k): int(v) for k, v in kinds.value_counts().items()}
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        result.complete = False
        result.problem = f"unreadable: {exc}"
    return result


def read_results(out: str | Path) -> list[RunResult]:
    """Every cell listed in ``DIR/runs.csv``, in that order."""
    table = read_runs_csv(out)
    return [read_run(row.path, row.method, row.seed, row.order, row.run_dir)
            for row in table.itertuples(index=False)]


def seed_trajectories(out: str | Path, method: str, order: str | int | None = None
                      ) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """``{"seed <s>": (steps, merges)}`` of one method's runs in a study (one order: the given one,
    else the first listed), for the per-seed overlays of :mod:`aimm.plots.study`."""
    table = read_runs_csv(out)
    mine = table[table["method"] == method]
    if mine.empty:
        return {}
    order = str(order) if order is not None else str(mine["order"].iloc[0])
    mine = mine[mine["order"].astype(str) == order]
    return {f"seed {row.seed}": load_trajectory(row.path) for row in mine.itertuples(index=False)
            if Path(row.path).is_dir()}


# ------------------------------------------------------------------------------ pure tables
def _has_fwt(method: str) -> bool:
    cls = METHODS.get(method)
    return cls is not None and not (cls.joint or cls.fresh_adapter_per_stage)


def forward_transfer(result: RunResult, single: RunResult | None) -> float:
    """FWT of a sequential run against the single_task run of the same seed and order (NaN when
    either is missing or the method has no FWT)."""
    if single is None or not _has_fwt(result.method) or result.matrix.empty:
        return float("nan")
    reference = single.metrics.get("single_task") or {}
    tasks = [str(c) for c in result.matrix.columns]
    if any(t not in reference or reference[t] is None for t in tasks):
        return float("nan")
    return cl.fwt(result.matrix.to_numpy(dtype=float), [float(reference[t]) for t in tasks])


def _number(value: Any) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def runs_table(results: list[RunResult]) -> pd.DataFrame:
    """One row per complete run: method, seed, order, run_dir, OP, BWT, [FWT], forgetting,
    train_seconds, eval_seconds, and for merging methods merges and merges_<kind>: a column per
    kind any method declares (``merge_kinds``) or recorded; a run's own kinds count (0 when none
    happened: AIMMerging's ``early``), another method's kinds are NaN.
    FWT is a column only when the grid has single_task runs."""
    done = [r for r in results if r.complete]
    singles = {(r.seed, r.order): r for r in done if r.method == SINGLE_TASK}
    with_fwt = any(r.method == SINGLE_TASK for r in results)
    declared = {r.method: tuple(getattr(METHODS.get(r.method), "merge_kinds", ())) for r in done}
    kinds = sorted({k for r in done for k in r.merge_kinds} | {k for ks in declared.values() for k in ks})
    rows = []
    for r in done:
        row: dict[str, Any] = {"method": r.method, "seed": r.seed, "order": r.order,
                               "run_dir": r.run_dir}
        for m in METRICS:
            if m == "FWT":
                if with_fwt:
                    row[m] = forward_transfer(r, singles.get((r.seed, r.order)))
                continue
            row[m] = _number(r.metrics.get(m))
        row["train_seconds"] = r.train_seconds
        row["eval_seconds"] = r.eval_seconds
        merging = bool(getattr(METHODS.get(r.method), "merges", False))
        row["merges"] = float(sum(r.merge_kinds.values())) if merging else float("nan")
        for k in kinds:  # the kinds the method declares (zeros too) and any it recorded
            own = merging and (k in declared[r.method] or k in r.merge_kinds)
            row[f"merges_{k}"] = float(r.merge_kinds.get(k, 0)) if own else float("nan")
        rows.append(row)
    columns = ["method", "seed", "order", "run_dir"] + [m for m in METRICS if m != "FWT" or with_fwt]
    columns += ["train_seconds", "eval_seconds", "merges"] + [f"merges_{k}" for k in kinds]
    return pd.DataFrame(rows, columns=columns)


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [m for m in METRICS if m in table.columns]


def _summary_row(method: str, order: str, group: pd.DataFrame, metrics: list[str],
                 merge_cols: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "order": order, "n": len(group)}
    for m in metrics:
        e = estimate(group[m].tolist())
        row.update({f"{m}_mean": e.mean, f"{m}_std": e.std,
                    f"{m}_ci95_low": e.ci_low, f"{m}_ci95_high": e.ci_high})
    for col in ("train_seconds", "eval_seconds", *merge_cols):
        values = pd.to_numeric(group[col], errors="coerce")
        row[f"{col}_mean"] = float(values.mean()) if values.notna().any() else float("nan")
    return row


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method and order, plus an ``all`` row per method when there are several orders.

    Columns: method, order, n; per metric M: M_mean, M_std (ddof 1; NaN for n < 2), M_ci95_low,
    M_ci95_high (Student t over the n runs); train_seconds_mean, eval_seconds_mean; merges_mean
    and merges_<kind>_mean (NaN for methods that do not merge).
    """
    metrics = metric_columns(table)
    merge_cols = [c for c in table.columns if c == "merges" or c.startswith("merges_")]
    rows = []
    methods = list(dict.fromkeys(table["method"]))
    orders = list(dict.fromkeys(table["order"].astype(str)))
    for method in methods:
        mine = table[table["method"] == method]
        for order in orders:
            group = mine[mine["order"].astype(str) == order]
            if len(group):
                rows.append(_summary_row(method, order, group, metrics, merge_cols))
        if len(orders) > 1:
            rows.append(_summary_row(method, ALL, mine, metrics, merge_cols))
    columns = ["method", "order", "n"] + [f"{m}_{s}" for m in metrics
                                          for s in ("mean", "std", "ci95_low", "ci95_high")]
    columns += [f"{c}_mean" for c in ("train_seconds", "eval_seconds", *merge_cols)]
    return pd.DataFrame(rows, columns=columns)


PAIRED_COLUMNS = ["method", "reference", "metric", "n", "diff_mean", "diff_ci95_low",
                  "diff_ci95_high", "wins", "losses"]


def paired_table(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Each method minus ``reference`` on the same seed and order, per metric. ``wins``: pairs in
    which the method is better (higher OP / BWT / FWT, lower forgetting); ``losses``: worse."""
    rows = []
    ref = table[table["method"] == reference]
    key = ["seed", "order"]
    for method in dict.fromkeys(table["method"]):
        if method == reference:
            continue
        pairs = table[table["method"] == method].merge(ref, on=key, suffixes=("", "_ref"))
        for m in metric_columns(table):
            d = paired_difference(pairs[m].tolist(), pairs[f"{m}_ref"].tolist(),
                                  higher_is_better=m not in LOWER_IS_BETTER)
            if d.estimate.n == 0:
                continue
            rows.append({"method": method, "reference": reference, "metric": m,
                         "n": d.estimate.n, "diff_mean": d.estimate.mean,
                         "diff_ci95_low": d.estimate.ci_low, "diff_ci95_high": d.estimate.ci_high,
                         "wins": d.wins, "losses": d.losses})
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def controller_table(runs: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
                     kinds: tuple[str, ...] = ()) -> pd.DataFrame:
    """What a merging method's controller did, per seed and task: merges by kind, the interval
    values S took (in order of appearance), and the largest forgetting signal ÷ threshold
    (``max_signal_ratio`` >= 1 means the forgetting threshold was reached at least once).

    ``runs``: ``{"seed 1": (steps, merges), ...}`` as :func:`seed_trajectories` returns;
    ``kinds``: merge kinds that get a column even when no run had one (the method's
    ``merge_kinds``: an ``early`` column of zeros is a finding).
    """
    rows = []
    kinds = sorted(set(kinds) | {str(k) for _, m in runs.values() if "kind" in m.columns
                    for k in m["kind"].dropna()})
    for label, (steps, merges) in runs.items():
        tasks = list(dict.fromkeys(steps["task"])) if "task" in steps.columns else []
        for task in tasks:
            s = steps[steps["task"] == task]
            m = merges[merges["task"] == task] if "task" in merges.columns else merges.iloc[0:0]
            row: dict[str, Any] = {"seed": label, "task": task, "merges": len(m)}
            for k in kinds:
                row[f"merges_{k}"] = int((m["kind"] == k).sum()) if "kind" in m.columns else 0
            if "interval" in s.columns and s["interval"].notna().any():
                values = s["interval"].dropna()
            elif {"interval_before", "interval_after"} <= set(m.columns):
                values = pd.concat([m["interval_before"].iloc[:1], m["interval_after"]])
            else:
                values = pd.Series(dtype=float)
            row["intervals"] = "->".join(str(int(v)) for v in dict.fromkeys(values))
            ratio = float("nan")
            if {"forgetting_signal", "threshold"} <= set(s.columns):
                h = pd.to_numeric(s["forgetting_signal"], errors="coerce")
                t = pd.to_numeric(s["threshold"], errors="coerce")
                r = (h / t.where(t > 0)).dropna()
                ratio = float(r.max()) if len(r) else ratio
            row["max_signal_ratio"] = ratio
            rows.append(row)
    return pd.DataFrame(rows)
