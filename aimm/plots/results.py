"""Figures of the results (scores matrix, metrics) and of the prepared data."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from aimm.plots.theme import (
    MULTITASK,
    PALETTE,
    apply_paper_theme,
    is_number,
    method_color,
    method_label,
    no_data_figure,
    set_meta,
)

METRIC_KEYS = (("OP", "OP"), ("BWT", "BWT"), ("FWT", "FWT"), ("forgetting", "Forgetting"))


def task1_figure(matrices: Mapping[str, pd.DataFrame], multitask: float | None = None,
                 title: str | None = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Score on the FIRST task after training on each task, one line per method (the paper's
    forgetting figure), plus a dashed "Multi-task" reference line when ``multitask`` is given."""
    colors = dict(colors or {})
    fig = go.Figure()
    order: list[str] = []
    for i, (label, matrix) in enumerate((matrices or {}).items()):
        if matrix is None or matrix.empty or len(matrix.columns) == 0:
            continue
        first = matrix.columns[0]
        col = pd.to_numeric(matrix[first], errors="coerce")
        ok = col.notna()
        if not ok.any():
            continue
        x = [str(v) for v in matrix.index[ok.to_numpy()]]
        order += [v for v in x if v not in order]
        color = colors.get(label) or method_color(label, i)
        name = method_label(label)
        fig.add_trace(go.Scatter(
            x=x, y=col[ok].to_numpy(), mode="lines+markers", name=name,
            line=dict(color=color, width=1.5), marker=dict(color=color, size=6),
            meta={"first_task": str(first)},
            hovertemplate=f"{name}<br>after %{{x}}<br>score on {first}: %{{y:.3f}}<extra></extra>"))
    if not fig.data:
        return no_data_figure("no data: no scores on task 1", x_title="After training on",
                              y_title="Score on task 1", title=title)
    if is_number(multitask):
        fig.add_trace(go.Scatter(x=[order[0], order[-1]], y=[float(multitask)] * 2, mode="lines",
                                 name=method_label(MULTITASK), meta={"multitask": float(multitask)},
                                 line=dict(color=method_color(MULTITASK), width=1.2, dash="dash"),
                                 hovertemplate=f"{method_label(MULTITASK)} %{{y:.3f}}<extra></extra>"))
    first_tasks = {tr.meta["first_task"] for tr in fig.data if tr.meta and "first_task" in tr.meta}
    y_title = "Score on task 1" + (f" ({next(iter(first_tasks))})" if len(first_tasks) == 1 else "")
    fig.update_layout(title=title, xaxis=dict(title="After training on", type="category",
                                              categoryorder="array", categoryarray=order),
                      yaxis=dict(title=y_title, rangemode="tozero"))
    return apply_paper_theme(fig, "one")


def scores_heatmap(matrix: pd.DataFrame, title: str | None = None) -> go.Figure:
    """scores[j][i] as a heatmap: rows after task j (top to bottom), columns task i, values
    written in the cells (blank where not evaluated), fixed 0-1 colour scale."""
    if matrix is None or matrix.empty:
        return no_data_figure("no data: empty scores matrix", x_title="Evaluated task",
                              y_title="After training on", title=title)
    z = matrix.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    x = [str(c) for c in matrix.columns]
    y = [str(r) for r in matrix.index]
    n = max(len(x), len(y))
    big = n > 8  # long sequences: two columns wide, values as integer percentages
    text = [["" if np.isnan(v) else (f"{100 * v:.0f}" if big else f"{v:.2f}") for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=y, text=text, texttemplate="%{text}", zmin=0, zmax=1, colorscale="Blues",
        xgap=1, ygap=1, hoverongaps=False, textfont=dict(size=9 if big else 10),
        colorbar=dict(thickness=8, len=1, outlinewidth=0, tickfont=dict(size=9), x=1.02,
                      xpad=0, title=dict(text="Score (%)" if big else "Score", side="right",
                                         font=dict(size=10)),
                      tickvals=[0, 0.25, 0.5, 0.75, 1] if big else None,
                      ticktext=["0", "25", "50", "75", "100"] if big else None),
        hovertemplate="after %{y}<br>on %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis=dict(title="Evaluated task", type="category", side="bottom",
                                              tickangle=-45 if len(x) > 4 else 0),
                      yaxis=dict(title="After training on", type="category", autorange="reversed"))
    fig.update_xaxes(showgrid=False, showline=False, ticks="")
    fig.update_yaxes(showgrid=False, showline=False, ticks="")
    set_meta(fig, aimm_aspect={"one": 0.85 if n <= 6 else 1.0, "two": 0.72 if big else 0.6})
    return apply_paper_theme(fig, "two" if big else "one")


def metrics_bars(metrics: Mapping[str, Mapping[str, Any]], title: str | None = None,
                 colors: Mapping[str, str] | None = None) -> go.Figure:
    """OP / BWT / FWT / forgetting per method as grouped bars (missing values skipped)."""
    colors = dict(colors or {})
    present = [(k, lab) for k, lab in METRIC_KEYS
               if any(is_number((m or {}).get(k)) for m in (metrics or {}).values())]
    fig = go.Figure()
    for i, (label, m) in enumerate((metrics or {}).items()):
        m = m or {}
        pairs = [(lab, float(m[k])) for k, lab in present if is_number(m.get(k))]
        if not pairs:
            continue
        name = method_label(label)
        fig.add_trace(go.Bar(
            x=[p[0] for p in pairs], y=[p[1] for p in pairs], name=name,
            marker=dict(color=colors.get(label) or method_color(label, i), line=dict(width=0)),
            hovertemplate=f"{name}<br>%{{x}} = %{{y:.3f}}<extra></extra>"))
    if not fig.data:
        return no_data_figure("no data: no metrics", y_title="Score", title=title)
    return grouped_bars_layout(fig, [lab for _, lab in present], title, "Score")


def grouped_bars_layout(fig, categories: list[str], title: str | None, y_title: str):
    """The metric bars' shared look: groups per metric in ``categories`` order, a zero line."""
    fig.add_hline(y=0, line=dict(color="black", width=0.8))
    fig.update_layout(title=title, barmode="group", bargap=0.25, bargroupgap=0.05,
                      xaxis=dict(title=None, type="category", categoryorder="array",
                                 categoryarray=categories),
                      yaxis=dict(title=y_title))
    fig.update_xaxes(showgrid=False)
    return apply_paper_theme(fig, "one")


# ------------------------------------------------------------------------------------ data prep
def label_distribution_figure(stats: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Examples per task (and split), stacked by output label. ``stats``: task, split, label,
    count. Up to 24 bars: one axis of (task, split) bars; more: one row per split. With at most
    12 labels the legend lists them and each label keeps its colour; with more, the segments of
    a bar are coloured by the label's rank within its task (hover names the label)."""
    if stats is None or stats.empty or not {"task", "label", "count"} <= set(stats.columns):
        return no_data_figure("no data: no label statistics", y_title="Examples", title=title,
                              width="two")
    from plotly.subplots import make_subplots

    df = stats.copy()
    df["label"] = df["label"].astype(str)
    df["task"] = df["task"].astype(str)
    df["count"] = pd.to_numeric(df["count"], errors="coerce").fillna(0)
    if "split" not in df.columns:
        df["split"] = ""
    df["split"] = df["split"].astype(str)
    tasks = list(dict.fromkeys(df["task"]))
    splits = list(dict.fromkeys(df["split"]))
    labels = list(dict.fromkeys(df["label"]))
    keys = [(t, sp) for t in tasks for sp in splits if ((df["task"] == t) & (df["split"] == sp)).any()]
    rows = len(splits) if len(splits) > 1 and len(keys) > 24 else 1
    multicat = rows == 1 and len(splits) > 1
    legend = len(labels) <= 12
    rank = {(t, lab): i for t, g in df.groupby("task", sort=False)
            for i, lab in enumerate(dict.fromkeys(g["label"]))}
    counts = df.groupby(["task", "split", "label"])["count"].sum()
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.04) if rows > 1 \
        else go.Figure()
    for r in range(rows):
        row_keys = [k for k in keys if rows == 1 or k[1] == splits[r]]
        for i, label in enumerate(labels):
            y = [float(counts.get((t, sp, label), 0)) for t, sp in row_keys]
            if not any(y):
                continue
            x = [[t for t, _ in row_keys], [sp for _, sp in row_keys]] if multicat \
                else [t for t, _ in row_keys]
            color = PALETTE[i % len(PALETTE)] if legend else \
                [PALETTE[rank.get((t, label), 0) % len(PALETTE)] for t, _ in row_keys]
            bar = go.Bar(x=x, y=y, name=label, legendgroup=label, showlegend=legend and r == 0,
                         marker=dict(color=color, line=dict(width=0)),
                         hovertemplate=f"label {label}<br>%{{x}}: %{{y}}<extra></extra>")
            if rows > 1:
                fig.add_trace(bar, row=r + 1, col=1)
            else:
                fig.add_trace(bar)
    fig.update_layout(title=title, barmode="stack", bargap=0.15)
    fig.update_xaxes(showgrid=False, type="multicategory" if multicat else "category")
    if rows > 1:
        for r, split in enumerate(splits):
            fig.update_yaxes(title_text=f"Examples ({split})", row=r + 1, col=1)
        fig.update_xaxes(tickangle=-45 if len(tasks) > 10 else 0, row=rows, col=1)
        set_meta(fig, aimm_aspect={"one": 1.2, "two": 0.25 + 0.17 * rows})
    else:
        fig.update_layout(yaxis_title="Examples")
        fig.update_xaxes(tickangle=-45 if len(keys) > 10 and not multicat else 0)
    return apply_paper_theme(fig, "two")


def token_length_figure(lengths: pd.DataFrame, title: str | None = None,
                        max_len: int | None = None) -> go.Figure:
    """Prompt length in tokens per task as box plots, one colour per split. ``lengths``: task,
    split, tokens. ``max_len`` draws the truncation limit."""
    if lengths is None or lengths.empty or not {"task", "tokens"} <= set(lengths.columns):
        return no_data_figure("no data: no token lengths", y_title="Tokens", title=title,
                              width="two")
    df = lengths.copy()
    df["task"] = df["task"].astype(str)
    if "split" not in df.columns:
        df["split"] = "all"
    split_colors = {"train": "#0072B2", "dev": "#E69F00", "test": "#009E73"}
    fig = go.Figure()
    for i, (split, sub) in enumerate(df.groupby("split", sort=False)):
        fig.add_trace(go.Box(x=sub["task"], y=pd.to_numeric(sub["tokens"], errors="coerce"),
                             name=str(split), boxpoints="outliers",
                             marker=dict(color=split_colors.get(str(split), PALETTE[i % len(PALETTE)]),
                                         size=2.5, opacity=0.6),
                             line=dict(width=1)))
    if max_len:
        fig.add_hline(y=max_len, line=dict(color="#CC0000", width=1, dash="dash"),
                      annotation_text=f"max input {max_len}", annotation_position="top left",
                      annotation_font_size=9)
    tasks = list(dict.fromkeys(df["task"]))
    fig.update_layout(title=title, boxmode="group", yaxis_title="Tokens",
                      xaxis=dict(type="category", categoryorder="array", categoryarray=tasks,
                                 tickangle=-45 if len(tasks) > 8 else 0))
    fig.update_xaxes(showgrid=False)
    return apply_paper_theme(fig, "two")
