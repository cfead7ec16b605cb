"""Figures of the training trajectory (spec §10): signals, merge interval, history loss, loss."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from aimm.plots.theme import (
    FORGETTING_COLOR,
    KIND_COLORS,
    LEARNING_COLOR,
    THRESHOLD_COLOR,
    apply_paper_theme,
    method_color,
    method_label,
    no_data_figure,
    set_meta,
)

X_INNER = "Inner step"
Y_FORGET = "Forgetting signal (memory loss)"
# two lines: one line is longer than a 5-inch figure is high, and the axis title gets cut off
Y_FORGET_RELEASE = "Forgetting signal<br>(memory loss ÷ grad. accum., release scale)"
Y_HISTORY = "History loss"
Y_HISTORY_RELEASE = "History loss<br>(÷ grad. accum., release scale)"
Y_LEARN = "Learning signal Λ"
Y_INTERVAL = "Merge interval S"
EVENTS_AXIS = "y3"  # hidden 0..1 axis overlaying y: merge events as full-height vertical lines


# ------------------------------------------------------------------------------------ helpers
def _frame(df: Any) -> pd.DataFrame:
    if df is None:
        return pd.DataFrame()
    return df if isinstance(df, pd.DataFrame) else pd.DataFrame(df)


def select_task(df: pd.DataFrame | None, task: Any) -> pd.DataFrame:
    """Rows of ``task`` (a task name, or a stage index when no task has that name)."""
    df = _frame(df)
    if df.empty or task is None:
        return df
    if "task" in df.columns and (df["task"].astype(str) == str(task)).any():
        return df[df["task"].astype(str) == str(task)]
    if isinstance(task, (int, np.integer)) and "stage" in df.columns:
        return df[df["stage"] == task]
    if "task" in df.columns:
        return df.iloc[0:0]
    return df


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df.columns:
        return pd.Series(dtype=float, index=df.index)
    return pd.to_numeric(df[column], errors="coerce")


def _has_release(df: pd.DataFrame) -> bool:
    return bool(_numeric(df, "forgetting_signal_release").notna().any())


def forgetting_signal(df: pd.DataFrame, release: bool | None = None) -> pd.Series:
    """The forgetting signal to plot: the release's scale (``forgetting_signal_release``, the raw
    loss / grad_accum the paper's figures show) where recorded, else the raw ``forgetting_signal``."""
    release = _has_release(df) if release is None else release
    return _numeric(df, "forgetting_signal_release" if release else "forgetting_signal")


def _kinds(merges: pd.DataFrame) -> pd.Series:
    """Merge kind per row (``merge`` where not recorded)."""
    if "kind" not in merges.columns:
        return pd.Series(["merge"] * len(merges), index=merges.index)
    return merges["kind"].fillna("merge").astype(str)


def merge_lambda(merges: pd.DataFrame) -> pd.Series:
    """Λ per merge: the ``lambda`` column (``lam``), else l1 / interval_before (spec §4)."""
    for col in ("lambda", "lam"):
        if col in merges.columns and _numeric(merges, col).notna().any():
            return _numeric(merges, col)
    if {"l1", "interval_before"} <= set(merges.columns):
        return _numeric(merges, "l1") / _numeric(merges, "interval_before").replace(0, np.nan)
    return pd.Series(np.nan, index=merges.index)


def _vlines(xs: list[float]) -> tuple[list, list]:
    x: list = []
    y: list = []
    for v in xs:
        x += [v, v, None]
        y += [0, 1, None]
    return x, y


def add_event_axis(fig: go.Figure) -> None:
    fig.update_layout(yaxis3=dict(overlaying="y", range=[0, 1], visible=False, fixedrange=True,
                                  showgrid=False))


def merge_event_traces(steps_x: pd.Series, kinds: pd.Series, hover: str = "merge at step %{x}",
                       showlegend: bool = True) -> list[go.Scatter]:
    """One trace of dotted full-height vertical lines per merge kind (on the hidden y3 axis)."""
    traces = []
    kinds = kinds.fillna("merge").astype(str) if len(kinds) else kinds
    for kind in sorted(set(kinds)) if len(kinds) else []:
        xs = [float(v) for v, k in zip(steps_x, kinds) if k == kind and pd.notna(v)]
        if not xs:
            continue
        x, y = _vlines(xs)
        traces.append(go.Scatter(
            x=x, y=y, yaxis=EVENTS_AXIS, mode="lines", name=f"merge ({kind})",
            line=dict(color=KIND_COLORS.get(kind, "#7F7F7F"), width=0.9, dash="dot"),
            hovertemplate=hover + f" ({kind})<extra></extra>", showlegend=showlegend,
            legendgroup="merges", legendrank=1000 + len(traces)))
    return traces


# ------------------------------------------------------------------------------------ signals
def signals_figure(steps: pd.DataFrame, merges: pd.DataFrame | None, task: Any,
                   title: str | None = None, show_threshold: bool = True) -> go.Figure:
    """The paper's Visualization figure for one task: forgetting signal (memory loss per inner
    step, markers, left axis), learning signal Λ per merge (line, right twin axis), merge events
    (dotted vertical lines coloured by kind) and the FS threshold (step line) where recorded."""
    s = select_task(steps, task)
    m = select_task(merges, task)
    title = f"{task}" if title is None else title
    release = _has_release(s)
    y_forget = Y_FORGET_RELEASE if release else Y_FORGET
    hist = forgetting_signal(s, release)
    has_hist = hist.notna().any()
    has_merges = not m.empty and "step" in m.columns
    if not has_hist and not has_merges:
        return no_data_figure(f"no data: no forgetting signal or merges for task {task!r}",
                              x_title=X_INNER, y_title=y_forget, title=title)
    fig = go.Figure()
    add_event_axis(fig)
    if has_merges:
        m = m.sort_values("step")
        for tr in merge_event_traces(m["step"], _kinds(m)):
            fig.add_trace(tr)
    if has_hist:
        ok = hist.notna()
        fig.add_trace(go.Scatter(
            x=s.loc[ok, "step"], y=hist[ok], mode="markers", name="Forgetting signal", legendrank=1,
            marker=dict(color=FORGETTING_COLOR, size=4, opacity=0.75, line=dict(width=0)),
            hovertemplate="step %{x}<br>memory loss %{y:.4f}<extra></extra>", yaxis="y"))
        thr = _numeric(s, "threshold_release" if release else "threshold")
        if show_threshold and thr.notna().any():
            fig.add_trace(go.Scatter(
                x=s["step"], y=thr, mode="lines", name="Threshold δ", yaxis="y", legendrank=3,
                line=dict(color=THRESHOLD_COLOR, width=1, dash="dash", shape="hv"),
                connectgaps=False, hovertemplate="step %{x}<br>δ %{y:.4f}<extra></extra>"))
    if has_merges:
        lam = merge_lambda(m)
        ok = lam.notna()
        if ok.any():
            fig.add_trace(go.Scatter(
                x=m.loc[ok, "step"], y=lam[ok], mode="lines+markers", name="Learning signal Λ",
                legendrank=2, yaxis="y2", line=dict(color=LEARNING_COLOR, width=1.4),
                marker=dict(color=LEARNING_COLOR, size=5, symbol="diamond"),
                hovertemplate="merge at step %{x}<br>Λ %{y:.4g}<extra></extra>"))
    fig.update_layout(
        title=title or None,
        xaxis=dict(title=X_INNER, rangemode="tozero"),
        yaxis=dict(title=dict(text=y_forget, font=dict(color=FORGETTING_COLOR)),
                   tickfont=dict(color=FORGETTING_COLOR)),
        yaxis2=dict(title=dict(text=Y_LEARN, font=dict(color=LEARNING_COLOR)), overlaying="y",
                    side="right", tickmode="auto", rangemode="tozero", showgrid=False,
                    tickfont=dict(color=LEARNING_COLOR), linecolor=LEARNING_COLOR,
                    tickcolor=LEARNING_COLOR),
    )
    set_meta(fig, aimm_aspect={"one": 0.85, "two": 0.45})  # room for a 2-3 row legend
    return apply_paper_theme(fig, "one")


def interval_series(s: pd.DataFrame, m: pd.DataFrame) -> tuple[pd.Series, pd.Series] | None:
    """(step, S) of one task's interval as a step line: the per-step ``interval`` column where
    recorded, else rebuilt from the merges (S before the first, S after each); None without data."""
    interval = _numeric(s, "interval")
    if interval.notna().any():
        ok = interval.notna()
        return s.loc[ok, "step"], interval[ok]
    if m.empty or not {"step", "interval_after"} <= set(m.columns):
        return None
    m = m.sort_values("step")
    first = _numeric(m, "interval_before").iloc[0] if "interval_before" in m.columns else np.nan
    x = pd.concat([pd.Series([0]), m["step"]], ignore_index=True)
    y = pd.concat([pd.Series([first]), _numeric(m, "interval_after")], ignore_index=True)
    last = _numeric(s, "step").max() if "step" in s.columns else np.nan
    if pd.notna(last) and last > x.iloc[-1]:
        x = pd.concat([x, pd.Series([last])], ignore_index=True)
        y = pd.concat([y, pd.Series([y.iloc[-1]])], ignore_index=True)
    return x, y


def interval_figure(steps: pd.DataFrame, merges: pd.DataFrame | None, task: Any,
                    title: str | None = None) -> go.Figure:
    """Merge interval S chosen by the controller over the inner steps of one task (step line),
    with the merges marked at their step and new interval."""
    s = select_task(steps, task)
    m = select_task(merges, task)
    title = f"{task}" if title is None else title
    series = interval_series(s, m)
    if series is None:
        return no_data_figure(f"no data: no merge interval for task {task!r}",
                              x_title=X_INNER, y_title=Y_INTERVAL, title=title)
    x, y = series
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="Interval S",
                             line=dict(color=LEARNING_COLOR, width=1.5, shape="hv"),
                             hovertemplate="step %{x}<br>S = %{y}<extra></extra>"))
    if not m.empty and "step" in m.columns:
        m = m.sort_values("step")
        kinds = _kinds(m)
        after = _numeric(m, "interval_after")
        for kind in sorted(set(kinds)):
            sel = (kinds == kind).to_numpy()
            fig.add_trace(go.Scatter(
                x=m["step"][sel], y=after[sel], mode="markers", name=f"merge ({kind})",
                marker=dict(color=KIND_COLORS.get(kind, "#7F7F7F"), size=5, symbol="circle-open",
                            line=dict(width=1.2)),
                hovertemplate=f"{kind} merge at step %{{x}}<br>new S = %{{y}}<extra></extra>"))
    top = float(np.nanmax(pd.to_numeric(pd.Series(y), errors="coerce"))) if len(y) else 1.0
    fig.update_layout(title=title or None, xaxis_title=X_INNER, xaxis_rangemode="tozero",
                      yaxis=dict(title=Y_INTERVAL, rangemode="tozero", tickformat="d",
                                 dtick=1 if np.isfinite(top) and top <= 6 else None))
    return apply_paper_theme(fig, "one")


def linear_fit(x: Any, y: Any) -> tuple[float, float] | None:
    """Ordinary least-squares line ``y = slope * x + intercept`` (None with < 2 distinct x)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def forgetting_signal_figure(runs: Mapping[str, pd.DataFrame], task: Any, title: str | None = None,
                        colors: Mapping[str, str] | None = None) -> go.Figure:
    """History (memory) loss per inner step of one task for several runs (e.g. seq_lora vs
    aimmerging): markers per run plus its least-squares line; the legend gives the slope.
    On the release's scale (loss / grad_accum) when every run recorded it, else raw."""
    title = f"{task}" if title is None else title
    fig = go.Figure()
    colors = dict(colors or {})
    tasks = {label: select_task(steps, task) for label, steps in (runs or {}).items()}
    with_hist = [s for s in tasks.values() if _numeric(s, "forgetting_signal").notna().any()]
    release = bool(with_hist) and all(_has_release(s) for s in with_hist)
    y_title = Y_HISTORY_RELEASE if release else Y_HISTORY
    for i, (label, s) in enumerate(tasks.items()):
        y = forgetting_signal(s, release)
        ok = y.notna()
        if not ok.any():
            continue
        x = _numeric(s, "step")[ok]
        y = y[ok]
        color = colors.get(label) or method_color(label, i)
        name = method_label(label)
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers", name=name, legendgroup=str(label),
            marker=dict(color=color, size=4, opacity=0.55, line=dict(width=0)),
            hovertemplate=f"{name}<br>step %{{x}}<br>memory loss %{{y:.4f}}<extra></extra>"))
        fit = linear_fit(x, y)
        if fit is not None:
            slope, intercept = fit
            xs = np.array([float(x.min()), float(x.max())])
            fig.add_trace(go.Scatter(
                x=xs, y=slope * xs + intercept, mode="lines", name=f"fit: slope {slope:+.2e}",
                legendgroup=str(label), line=dict(color=color, width=1.6),
                meta={"slope": slope, "intercept": intercept, "run": str(label)},
                hovertemplate=f"{name} fit<br>slope {slope:.3e}<extra></extra>"))
    if not fig.data:
        return no_data_figure(f"no data: no history loss for task {task!r}", x_title=X_INNER,
                              y_title=y_title, title=title)
    fig.update_layout(title=title or None, xaxis_title=X_INNER, yaxis_title=y_title,
                      xaxis_rangemode="tozero")
    return apply_paper_theme(fig, "one")


# ------------------------------------------------------------------------------------ training
def _merge_global_steps(steps: pd.DataFrame, merges: pd.DataFrame) -> pd.DataFrame:
    """Merges with a ``global_step`` column (looked up from steps by task/stage and step)."""
    m = merges.copy()
    if "global_step" in m.columns or m.empty or "step" not in m.columns:
        return m
    if steps.empty or not {"step", "global_step"} <= set(steps.columns):
        m["global_step"] = m["step"]
        return m
    key = "stage" if "stage" in steps.columns and "stage" in m.columns else "task"
    if key not in steps.columns or key not in m.columns:
        m["global_step"] = m["step"]
        return m
    lookup = steps[[key, "step", "global_step"]].drop_duplicates([key, "step"])
    return m.merge(lookup, on=[key, "step"], how="left")


def _stage_bounds(steps: pd.DataFrame) -> list[tuple[str, float, float]]:
    if steps.empty or not {"task", "global_step"} <= set(steps.columns):
        return []
    key = "stage" if "stage" in steps.columns else "task"
    out = []
    for _, g in steps.groupby(key, sort=False):
        out.append((str(g["task"].iloc[0]), float(g["global_step"].min()),
                    float(g["global_step"].max())))
    return sorted(out, key=lambda t: t[1])


def _training_layout(fig: go.Figure) -> None:
    add_event_axis(fig)
    # task names sit above the plot, so the legend goes to the right of this wide figure
    fig.update_layout(xaxis_title="Global inner step", yaxis_title="Loss",
                      legend=dict(orientation="v", x=1.01, xanchor="left", y=1, yanchor="top"))


def add_stage_boundary(fig: go.Figure, name: str, start: float, first: bool = False) -> None:
    """A thin vertical line where a stage starts and its task name just above the plot."""
    if not first:
        fig.add_shape(type="line", x0=start - 0.5, x1=start - 0.5, y0=0, y1=1, xref="x",
                      yref="paper", line=dict(color="#999999", width=0.8), layer="below")
    fig.add_annotation(x=start - 0.5, y=1, xref="x", yref="paper", text=name, showarrow=False,
                       xanchor="left", yanchor="bottom", font=dict(size=9, color="#555555"))


def training_figure(steps: pd.DataFrame, merges: pd.DataFrame | None = None,
                    title: str | None = None) -> go.Figure:
    """Training loss and history (memory) loss over the global inner step of a whole run, stage
    boundaries with task names, merge events as dotted vertical lines."""
    s = _frame(steps)
    m = _frame(merges)
    if s.empty or "global_step" not in s.columns:
        return no_data_figure("no data: no training steps", x_title="Global inner step",
                              y_title="Loss", title=title, width="two")
    s = s.sort_values("global_step")
    fig = go.Figure()
    _training_layout(fig)
    if not m.empty and "step" in m.columns:
        m = _merge_global_steps(s, m)
        for tr in merge_event_traces(m["global_step"], _kinds(m), hover="merge at global step %{x}"):
            fig.add_trace(tr)
    loss = _numeric(s, "loss")
    fig.add_trace(go.Scatter(x=s["global_step"], y=loss, mode="lines", name="Training loss",
                             legendrank=1,
                             line=dict(color="#333333", width=1.1),
                             hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>"))
    hist = _numeric(s, "forgetting_signal")
    if hist.notna().any():
        ok = hist.notna()
        fig.add_trace(go.Scatter(
            x=s.loc[ok, "global_step"], y=hist[ok], mode="markers", name="History loss", legendrank=2,
            marker=dict(color=FORGETTING_COLOR, size=3.5, opacity=0.7, line=dict(width=0)),
            hovertemplate="step %{x}<br>memory loss %{y:.4f}<extra></extra>"))
    for i, (name, start, _end) in enumerate(_stage_bounds(s)):
        add_stage_boundary(fig, name, start, first=(i == 0))
    fig.update_layout(title=title, margin_t=34 if title else 18)  # task names above the plot
    set_meta(fig, aimm_aspect={"one": 0.75, "two": 0.38})
    return apply_paper_theme(fig, "two")
