"""Notebook 03: the explorer over saved runs (ipywidgets; optional)."""

from __future__ import annotations

import contextlib
from pathlib import Path

SIGNALS = ("forgetting_signal", "loss", "lr", "threshold", "interval", "activations", "lambda")


def experiments(run_root: str | Path) -> dict[str, dict[str, Path]]:
    """Saved runs under ``run_root``: experiment (folder of runs) -> label -> run dir."""
    root = Path(run_root)
    out: dict[str, dict[str, Path]] = {}
    for cfg in sorted(root.glob("*/config.json")) + sorted(root.glob("*/*/config.json")):
        run = cfg.parent
        group = run.parent
        name = "." if group == root else str(group.relative_to(root))
        out.setdefault(name, {})[run.name] = run
    return out


def run_explorer(run_root: str | Path, initial: tuple[str, str] | None = None):
    """Dropdowns (run / method / task / signal) and a step-range slider over saved runs,
    redrawing a plotly FigureWidget. Returns the ``ipywidgets.VBox`` (its ``.figure``,
    ``.controls`` attributes hold the parts)."""
    import ipywidgets as W
    import plotly.graph_objects as go

    from aimm.runs import load_trajectory

    groups = experiments(run_root)
    if not groups:
        raise FileNotFoundError(f"{run_root}: no saved runs")
    cache: dict[Path, tuple] = {}

    def trajectory(path: Path):
        if path not in cache:
            cache[path] = load_trajectory(path)
        return cache[path]

    group0 = initial[0] if initial and initial[0] in groups else next(iter(groups))
    style, width = {"description_width": "56px"}, W.Layout(width="250px")
    run_dd = W.Dropdown(options=list(groups), value=group0, description="run", style=style,
                        layout=width)
    method_dd = W.Dropdown(options=list(groups[group0]), description="method", style=style,
                           layout=width)
    if initial and initial[1] in groups[group0]:
        method_dd.value = initial[1]
    task_dd = W.Dropdown(description="task", style=style, layout=width)
    signal_dd = W.Dropdown(description="signal", style=style, layout=width)
    slider = W.IntRangeSlider(description="steps", min=0, max=1, value=(0, 1), style=style,
                              continuous_update=False, layout=W.Layout(width="420px"))
    fig = go.FigureWidget()
    fig.update_layout(height=360, margin=dict(l=60, r=20, t=40, b=50), template="plotly_white",
                      xaxis_title="step", showlegend=False)
    busy = {"on": False}  # widget callbacks fire while we set options: ignore those

    @contextlib.contextmanager
    def updating():
        busy["on"] = True
        try:
            yield
        finally:
            busy["on"] = False

    def unless_updating(fn):
        """A widget callback that does nothing while we are setting options ourselves."""
        def callback(*_):
            if not busy["on"]:
                fn()
        return callback

    def current():
        return trajectory(groups[run_dd.value][method_dd.value])

    def refresh_methods(*_):
        with updating():
            method_dd.options = list(groups[run_dd.value])
        refresh_tasks()

    @unless_updating
    def refresh_tasks():
        with updating():
            steps, _ = current()
            tasks = list(dict.fromkeys(steps["task"])) if not steps.empty else []
            task_dd.options = tasks
            if tasks:
                task_dd.value = tasks[-1]
        refresh_signals()

    @unless_updating
    def refresh_signals():
        with updating():
            steps, merges = current()
            t_steps = steps[steps["task"] == task_dd.value] if not steps.empty else steps
            available = [s for s in SIGNALS
                         if s != "lambda" and s in t_steps and t_steps[s].notna().any()]
            if not merges.empty and "lambda" in merges and (merges["task"] == task_dd.value).any():
                available.append("lambda")
            keep = signal_dd.value
            signal_dd.options = available or ["loss"]
            signal_dd.value = keep if keep in signal_dd.options else signal_dd.options[0]
            n = int(t_steps["step"].max()) if not t_steps.empty else 1
            slider.max = max(n, 1)
            slider.min = 1 if n >= 1 else 0
            slider.value = (slider.min, slider.max)
        redraw()

    @unless_updating
    def redraw():
        steps, merges = current()
        sig, task = signal_dd.value, task_dd.value
        lo, hi = slider.value
        src = merges if sig == "lambda" else steps
        if src.empty or sig not in src:
            x, y = [], []
        else:
            d = src[(src["task"] == task) & (src["step"] >= lo) & (src["step"] <= hi)]
            d = d[d[sig].notna()]
            x, y = d["step"].tolist(), d[sig].tolist()
        with fig.batch_update():
            fig.data = []
            fig.add_scatter(x=x, y=y, mode="lines+markers" if sig == "lambda" else "markers",
                            marker=dict(size=5), name=sig)
            if sig != "lambda" and not merges.empty and (merges["task"] == task).any():
                m = merges[(merges["task"] == task) & (merges["step"] >= lo) & (merges["step"] <= hi)]
                fig.layout.shapes = [dict(type="line", xref="x", yref="paper", x0=s, x1=s, y0=0,
                                          y1=1, line=dict(color="rgba(200,0,0,0.25)", dash="dot"))
                                     for s in m["step"]]
            else:
                fig.layout.shapes = []
            fig.layout.title = f"{method_dd.value} · {task} · {sig}"
            fig.layout.yaxis.title = sig

    run_dd.observe(refresh_methods, "value")
    method_dd.observe(refresh_tasks, "value")
    task_dd.observe(refresh_signals, "value")
    signal_dd.observe(redraw, "value")
    slider.observe(redraw, "value")
    refresh_tasks()
    controls = W.HBox([W.VBox([run_dd, method_dd]), W.VBox([task_dd, signal_dd]), slider])
    box = W.VBox([controls, fig])
    box.figure, box.controls = fig, {"run": run_dd, "method": method_dd, "task": task_dd,
                                     "signal": signal_dd, "steps": slider}
    return box


__all__ = ["SIGNALS", "experiments", "run_explorer"]
