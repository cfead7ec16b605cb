"""Figures of a study (``aimm study``): method bars with 95% error bars from the summary table, and
per-seed overlays of one method's trajectory (signals, interval) for one task. Pure: DataFrames in,
plotly Figure out; :func:`aimm.study.seed_trajectories` reads the per-seed input from a study."""

from __future__ import annotations

import math
from typing import Any, Mapping

import pandas as pd
import plotly.graph_objects as go

from aimm.plots.results import METRIC_KEYS, grouped_bars_layout
from aimm.plots.theme import (
    PALETTE,
    apply_paper_theme,
    is_number,
    method_color,
    method_label,
    no_data_figure,
    set_meta,
)
from aimm.plots.trajectory import (
    X_INNER,
    Y_FORGET,
    Y_INTERVAL,
    Y_LEARN,
    _numeric,
    interval_series,
    merge_lambda,
    select_task,
)

Trajectories = Mapping[str, tuple[pd.DataFrame, pd.DataFrame]]  # label -> (steps, merges)


def seed_color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _pick_order(summary: pd.DataFrame, order: Any) -> pd.DataFrame:
    orders = [str(o) for o in dict.fromkeys(summary["order"].astype(str))]
    if order is None:
        order = "all" if "all" in orders else (orders[0] if orders else None)
    return summary[summary["order"].astype(str) == str(order)]


def method_ci_bars(summary: pd.DataFrame, order: Any = None, title: str | None = None,
                   colors: Mapping[str, str] | None = None) -> go.Figure:
    """OP / BWT / FWT / forgetting per method as grouped bars of the mean over runs, with the 95%
    interval (``M_ci95_low`` .. ``M_ci95_high``) as error bars where there are two runs or more.

    ``summary``: the table of :func:`aimm.study.summary_table` (``summary.csv``); ``order``: which
    rows (default ``all`` when present, else the first order)."""
    if summary is None or summary.empty or not {"method", "order"} <= set(summary.columns):
        return no_data_figure("no data: empty study summary", y_title="Score", title=title)
    rows = _pick_order(summary, order)
    present = [(k, lab) for k, lab in METRIC_KEYS if f"{k}_mean" in rows.columns
               and pd.to_numeric(rows[f"{k}_mean"], errors="coerce").notna().any()]
    colors = dict(colors or {})
    fig = go.Figure()
    for i, (_, row) in enumerate(rows.iterrows()):
        method = str(row["method"])
        pairs = [(k, lab) for k, lab in present if is_number(row.get(f"{k}_mean"))]
        if not pairs:
            continue
        means = [float(row[f"{k}_mean"]) for k, _ in pairs]
        lows = [row.get(f"{k}_ci95_low") for k, _ in pairs]
        highs = [row.get(f"{k}_ci95_high") for k, _ in pairs]
        up = [float(h) - m if is_number(h) else None for h, m in zip(highs, means)]
        down = [m - float(lo) if is_number(lo) else None for lo, m in zip(lows, means)]
        has_ci = any(v is not None for v in up)
        name = method_label(method)
        n = int(row["n"]) if is_number(row.get("n")) else 0
        ci_text = [f"[{float(lo):.3f}, {float(h):.3f}]" if is_number(lo) and is_number(h) else "n < 2"
                   for lo, h in zip(lows, highs)]
        fig.add_trace(go.Bar(
            x=[lab for _, lab in pairs], y=means, name=name, customdata=ci_text,
            marker=dict(color=colors.get(method) or method_color(method, i), line=dict(width=0)),
            error_y=dict(type="data", symmetric=False, array=up, arrayminus=down, visible=has_ci,
                         thickness=1, width=3, color="black"),
            meta={"method": method, "n": n},
            hovertemplate=f"{name} (n={n})<br>%{{x}} = %{{y:.3f}}<br>95% CI %{{customdata}}<extra></extra>"))
    if not fig.data:
        return no_data_figure("no data: no metrics in the study summary", y_title="Score", title=title)
    return grouped_bars_layout(fig, [lab for _, lab in present], title, "Score (mean, 95% CI)")


def seed_signals_figure(runs: Trajectories, task: Any, title: str | None = None,
                        show_threshold: bool = True) -> go.Figure:
    """One method's signals on one task, one colour per seed: the forgetting signal (memory loss
    per inner step, markers, left axis), its threshold δ (dashed) and the learning signal Λ per
    merge (diamonds, right axis). ``runs``: ``{"seed 1": (steps, merges), ...}``."""
    title = f"{task}" if title is None else title
    fig = go.Figure()
    for i, (label, (steps, merges)) in enumerate((runs or {}).items()):
        s, m = select_task(steps, task), select_task(merges, task)
        color, label = seed_color(i), str(label)
        hist = _numeric(s, "forgetting_signal")
        if hist.notna().any():
            ok = hist.notna()
            fig.add_trace(go.Scatter(
                x=s.loc[ok, "step"], y=hist[ok], mode="markers", name=f"{label}: forgetting",
                legendgroup=label, meta={"seed": label, "series": "forgetting"},
                marker=dict(color=color, size=4, opacity=0.7, line=dict(width=0)),
                hovertemplate=f"{label}<br>step %{{x}}<br>memory loss %{{y:.4f}}<extra></extra>"))
            thr = _numeric(s, "threshold")
            if show_threshold and thr.notna().any():
                fig.add_trace(go.Scatter(
                    x=s["step"], y=thr, mode="lines", name=f"{label}: δ", legendgroup=label,
                    showlegend=False, meta={"seed": label, "series": "threshold"},
                    line=dict(color=color, width=0.9, dash="dash", shape="hv"),
                    hovertemplate=f"{label}<br>step %{{x}}<br>δ %{{y:.4f}}<extra></extra>"))
        if not m.empty and "step" in m.columns:
            m = m.sort_values("step")
            lam = merge_lambda(m)
            ok = lam.notna()
            if ok.any():
                fig.add_trace(go.Scatter(
                    x=m.loc[ok, "step"], y=lam[ok], mode="lines+markers", name=f"{label}: Λ",
                    legendgroup=label, yaxis="y2", meta={"seed": label, "series": "learning"},
                    line=dict(color=color, width=1.1), marker=dict(color=color, size=5,
                                                                   symbol="diamond"),
                    hovertemplate=f"{label}<br>merge at step %{{x}}<br>Λ %{{y:.4g}}<extra></extra>"))
    if not fig.data:
        return no_data_figure(f"no data: no signals for task {task!r} in any seed",
                              x_title=X_INNER, y_title=Y_FORGET, title=title)
    fig.update_layout(title=title or None, xaxis=dict(title=X_INNER, rangemode="tozero"),
                      yaxis=dict(title=Y_FORGET),
                      yaxis2=dict(title=Y_LEARN, overlaying="y", side="right", showgrid=False,
                                  rangemode="tozero"))
    set_meta(fig, aimm_aspect={"one": 0.9, "two": 0.45})
    return apply_paper_theme(fig, "one")


def seed_interval_figure(runs: Trajectories, task: Any, title: str | None = None) -> go.Figure:
    """The merge interval S over the inner steps of one task, one step line per seed."""
    title = f"{task}" if title is None else title
    fig = go.Figure()
    top = 0.0
    for i, (label, (steps, merges)) in enumerate((runs or {}).items()):
        series = interval_series(select_task(steps, task), select_task(merges, task))
        if series is None:
            continue
        x, y = series
        label = str(label)
        top = max(top, float(pd.to_numeric(y, errors="coerce").max()))
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines", name=label, meta={"seed": label, "series": "interval"},
            line=dict(color=seed_color(i), width=1.4, shape="hv"),
            hovertemplate=f"{label}<br>step %{{x}}<br>S = %{{y}}<extra></extra>"))
    if not fig.data:
        return no_data_figure(f"no data: no merge interval for task {task!r} in any seed",
                              x_title=X_INNER, y_title=Y_INTERVAL, title=title)
    fig.update_layout(title=title or None, xaxis_title=X_INNER, xaxis_rangemode="tozero",
                      yaxis=dict(title=Y_INTERVAL, rangemode="tozero", tickformat="d",
                                 dtick=1 if math.isfinite(top) and top <= 6 else None))
    return apply_paper_theme(fig, "one")
