"""Notebooks 03 and 04: trajectory and result figures, the metrics table, tables and export."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from aimm.methods import METHODS
from aimm.notebook.training import display_labels, run_method, runs_of


def first_method(runs: dict[str, Path], fact: str) -> str | None:
    """The method of the first run whose method class has ``fact``: ``"merges"`` (a merging
    method) or ``"baseline"`` (sequential, not merging: the forgetting-signal reference)."""
    for d in runs.values():
        cls = METHODS.get(run_method(d))
        if cls is not None and (cls.merges if fact == "merges" else cls.sequential() and not cls.merges):
            return cls.name
    return None


def trajectory_figures(runs: dict[str, Path], merging_method: str | None = None,
                       baseline_method: str | None = None) -> dict[str, dict[str, Any]]:
    """Notebook 03's figures (spec §10) for every task after the first:
    ``{"signals": {...}, "interval": {...}, "forgetting_signal": {...}}``, keyed by file stem.

    Signals and interval come from the first run of ``merging_method`` (default: the first run
    of a merging method); the history-loss panels put the first ``baseline_method`` run (default:
    a sequential method that does not merge, trained with ``record_forgetting_signal``) against it, with
    linear fits. Sections without the runs they need are empty.
    """
    from aimm import plots
    from aimm.plots.theme import safe_key

    out: dict[str, dict[str, Any]] = {"signals": {}, "interval": {}, "forgetting_signal": {}}
    merging_method = merging_method or first_method(runs, "merges")
    baseline_method = baseline_method or first_method(runs, "baseline")
    first = {m: next(iter(runs_of(runs, m).values()), None)
             for m in (baseline_method, merging_method) if m is not None}
    data = {m: plots.load_run_data(d) for m, d in first.items() if d is not None}
    if not data:
        return out
    merging = data.get(merging_method)
    for task in (merging or data[baseline_method]).tasks[1:]:
        key = safe_key(task)
        if merging is not None:
            out["signals"][f"signals_{key}"] = plots.signals_figure(
                merging.steps, merging.merges, task,
                title=f"{plots.method_label(merging_method)}: {task}")
            out["interval"][f"interval_{key}"] = plots.interval_figure(
                merging.steps, merging.merges, task, title=f"Merge interval: {task}")
        out["forgetting_signal"][f"forgetting_signal_{key}"] = plots.forgetting_signal_figure(
            {m: r.steps for m, r in data.items()}, task, title=f"History loss: {task}")
    return out


def result_figures(runs: dict[str, Path], metrics: Any = None) -> dict[str, Any]:
    """Notebook 04's figures, keyed by file stem: ``heatmap_<label>`` per run, ``task1_curve``
    (score on task 1 after each task; the Multi-task line from an ``mtl`` run) and
    ``metrics_bars`` (from ``metrics``, a :func:`metrics_table`, else each run's metrics.json)."""
    from aimm import plots
    from aimm.plots.builders import task1_curve
    from aimm.plots.theme import safe_key

    labels = display_labels(runs)
    data = {label: plots.load_run_data(d) for label, d in labels.items()}
    figs: dict[str, Any] = {
        f"heatmap_{safe_key(label)}": plots.scores_heatmap(
            r.matrix, title=f"{plots.method_label(label)}: scores[j][i]")
        for label, r in data.items()}
    figs["task1_curve"] = task1_curve(data, titled=True)
    if metrics is None:
        bars = {lab: r.metrics for lab, r in data.items() if r.metrics}
    else:
        table = metrics.set_index("run")
        inverse = {str(d): lab for lab, d in labels.items()}
        bars = {inverse.get(str(runs[r]), r): {k: table.loc[r, k] for k in ("OP", "BWT", "FWT", "forgetting")}
                for r in table.index if r in runs}
    figs["metrics_bars"] = plots.metrics_bars(bars, title="Continual-learning metrics")
    return figs


def metrics_table(runs: dict[str, Path]):
    """One row per run: method, seed, stages done, OP, BWT, FWT, forgetting, merges.

    FWT is filled from a ``single_task`` run among ``runs`` (same seed if there is one) for the
    sequential methods; ``mtl`` has OP only.
    """
    import pandas as pd

    from aimm.metrics import fwt
    from aimm.notebook.params import method_fact
    from aimm.plots.builders import NOT_SEQUENTIAL
    from aimm.runs import load_config, load_metrics, load_scores_matrix

    singles: dict[int, list[float]] = {}
    infos = {}
    for label, d in runs.items():
        cfg = load_config(d)
        m = load_metrics(d) if (Path(d) / "metrics.json").is_file() else {}
        infos[label] = (cfg, m)
        if method_fact(cfg["method"], "fresh_adapter_per_stage") and m.get("single_task"):
            singles[cfg["seed"]] = list(m["single_task"].values())
    rows = []
    for label, d in runs.items():
        cfg, m = infos[label]
        fwt_value = m.get("FWT")
        if fwt_value is None and singles and cfg["method"] not in NOT_SEQUENTIAL \
                and m.get("complete"):
            single = singles.get(cfg["seed"]) or next(iter(singles.values()))
            matrix = load_scores_matrix(d)
            try:
                fwt_value = fwt(matrix.to_numpy(), single)
            except (ValueError, IndexError):
                fwt_value = None
        merges = m.get("merges_per_stage") or {}
        rows.append({"run": label, "method": cfg["method"], "seed": cfg["seed"],
                     "stages_done": m.get("stages_done"), "complete": m.get("complete"),
                     "OP": m.get("OP"), "BWT": m.get("BWT"), "FWT": fwt_value,
                     "forgetting": m.get("forgetting"), "merges": sum(merges.values())})
    return pd.DataFrame(rows)


def to_markdown(df, floatfmt: str = ".4f") -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    import math

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() else format(v, floatfmt).rstrip("0").rstrip(".")
        return str(v).replace("|", "\\|")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(df, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """``<name>.csv`` and ``<name>.md`` in ``out_dir``."""
    from aimm.runs import atomic_write_text

    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    atomic_write_text(csv_path, df.to_csv(index=False))
    atomic_write_text(md_path, to_markdown(df))
    return csv_path, md_path


def export_all(figures: dict[str, Any], fig_dir: str | Path, formats: Iterable[str] | None = None,
               prefix: str = "", width: str | None = None) -> list[Path]:
    """Export each figure as ``<fig_dir>/<prefix><name>.<fmt>`` (:func:`aimm.plots.export_figures`,
    the many-figure form of :func:`aimm.plots.export`: one browser start). ``formats`` empty:
    nothing is written. Returns the files written."""
    from aimm import plots

    formats = list(("html", "png", "pdf", "svg") if formats is None else formats)
    if not formats or not figures:
        return []
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    named = {f"{prefix}{name}": fig for name, fig in figures.items()}
    written = plots.export_figures(named, fig_dir, formats=formats, width=width)
    return [p for paths in written.values() for p in paths]


__all__ = ["export_all", "first_method", "metrics_table", "result_figures", "to_markdown",
           "trajectory_figures", "write_table"]
