"""Live training plot: an engine callback that draws into a plotly FigureWidget."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from aimm.plots.theme import FORGETTING_COLOR, apply_paper_theme, set_meta
from aimm.plots.trajectory import (
    EVENTS_AXIS,
    _training_layout,
    _vlines,
    add_stage_boundary,
    training_figure,
)


def live_training_figure(title: str | None = None) -> go.FigureWidget:
    """An empty FigureWidget laid out like :func:`training_figure` (traces: training loss,
    history loss, merges); :class:`LiveTrainingPlot` fills it."""
    fig = go.Figure()
    _training_layout(fig)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="Training loss",
                             line=dict(color="#333333", width=1.1)))
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="History loss",
                             marker=dict(color=FORGETTING_COLOR, size=3.5, opacity=0.7)))
    fig.add_trace(go.Scatter(x=[], y=[], yaxis=EVENTS_AXIS, mode="lines", name="merge",
                             line=dict(color="#888888", width=0.9, dash="dot"),
                             hoverinfo="skip"))
    fig.update_layout(title=title, margin_t=34)  # the title shows the scores after each stage
    set_meta(fig, aimm_aspect={"one": 0.75, "two": 0.38})
    apply_paper_theme(fig, "two")
    return go.FigureWidget(fig)


class LiveTrainingPlot:
    """Engine callback that draws the training into a FigureWidget while it runs.

    ``aimm.training.engine.run(cfg, callbacks=[plot])``; show ``plot.widget`` in the notebook. Points are
    buffered and sent to the widget every ``every`` steps in one ``batch_update``. Without a
    widget frontend (papermill, plain Python) it still works; use :meth:`figure` for a static copy.
    """

    def __init__(self, every: int = 10, title: str | None = None,
                 widget: go.FigureWidget | None = None) -> None:
        self.every = max(1, int(every))
        self.widget = widget if widget is not None else live_training_figure(title)
        self.steps: list[dict] = []
        self.merges: list[dict] = []
        self.stage_scores: list[dict] = []
        self._x: list[float] = []
        self._loss: list[float] = []
        self._hx: list[float] = []
        self._hy: list[float] = []
        self._merge_x: list[float] = []
        self._pending = 0
        self._last: dict | None = None
        self._stage_starts: dict[Any, tuple[str, float]] = {}

    @property
    def fig(self) -> go.FigureWidget:
        return self.widget

    def _ipython_display_(self) -> None:  # pragma: no cover - notebook display
        from IPython.display import display

        display(self.widget)

    # engine callbacks
    def on_step(self, record: dict) -> None:
        rec = dict(record)
        self.steps.append(rec)
        gs = rec.get("global_step", len(self.steps))
        stage = rec.get("stage", rec.get("task"))
        if stage not in self._stage_starts:
            self._stage_starts[stage] = (str(rec.get("task", stage)), float(gs))
        self._x.append(gs)
        self._loss.append(rec.get("loss"))
        hist = rec.get("forgetting_signal")
        if hist is not None and np.isfinite(hist):
            self._hx.append(gs)
            self._hy.append(hist)
        self._last = rec
        self._pending += 1
        if self._pending >= self.every:
            self.flush()

    def on_merge(self, event: dict) -> None:
        ev = dict(event)
        # merges arrive before the step's own record: global = stage offset + step in stage
        last = self._last
        if last is not None and last.get("stage") == ev.get("stage", last.get("stage")):
            offset = last.get("global_step", 0) - last.get("step", 0)
        else:
            offset = last.get("global_step", 0) if last is not None else 0
        ev.setdefault("global_step", offset + ev.get("step", 0))
        self.merges.append(ev)
        self._merge_x.append(ev["global_step"])

    def on_stage_end(self, stage: Any, rows: list[dict] | None = None) -> None:
        name = getattr(stage, "name", str(stage))
        scores = {r.get("eval_task"): r.get("score") for r in rows or []}
        self.stage_scores.append({"stage": name, **scores})
        self.flush()
        index = getattr(stage, "index", None)
        start = self._stage_starts.get(index, self._stage_starts.get(name))
        if start is not None:
            with self.widget.batch_update():
                add_stage_boundary(self.widget, name, start[1], first=not self.stage_scores[:-1])
                if scores:
                    txt = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if v is not None)
                    self.widget.layout.title = f"after {name}: {txt}"

    def flush(self) -> None:
        """Send the buffered points to the widget (one batched update)."""
        self._pending = 0
        with self.widget.batch_update():
            self.widget.data[0].x, self.widget.data[0].y = list(self._x), list(self._loss)
            self.widget.data[1].x, self.widget.data[1].y = list(self._hx), list(self._hy)
            self.widget.data[2].x, self.widget.data[2].y = _vlines(self._merge_x)

    # results
    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return pd.DataFrame(self.steps), pd.DataFrame(self.merges)

    def figure(self) -> go.Figure:
        """The static :func:`training_figure` of what has been seen so far."""
        steps, merges = self.frames()
        return training_figure(steps, merges)
