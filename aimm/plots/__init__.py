"""Figures of aimm: pure functions from run data (DataFrames / dicts) to plotly Figures.

Trajectory (spec §10): :func:`signals_figure`, :func:`interval_figure`,
:func:`forgetting_signal_figure`, :func:`training_figure`, :class:`LiveTrainingPlot`. Results:
:func:`task1_figure`, :func:`scores_heatmap`, :func:`metrics_bars`. Data preparation:
:func:`label_distribution_figure`, :func:`token_length_figure`. Whole runs:
:func:`run_figures`, :func:`comparison_figures`. Studies: :func:`method_ci_bars` (95% error
bars), :func:`seed_signals_figure`, :func:`seed_interval_figure` (one trace per seed). Output:
:func:`apply_paper_theme`, :func:`export` (HTML + PNG/PDF/SVG through kaleido and a local
Chromium; HTML only, with one warning, when there is no browser).
"""

from aimm.plots.live import LiveTrainingPlot, live_training_figure
from aimm.plots.builders import RunData, comparison_figures, load_run_data, run_figures
from aimm.plots.output import (
    BrowserNotFoundError,
    browser_or_none,
    export,
    export_figures,
    find_browser,
    usable_formats,
)
from aimm.plots.results import (
    label_distribution_figure,
    metrics_bars,
    scores_heatmap,
    task1_figure,
    token_length_figure,
)
from aimm.plots.study import method_ci_bars, seed_interval_figure, seed_signals_figure
from aimm.plots.theme import (
    KIND_COLORS,
    METHOD_COLORS,
    METHOD_NAMES,
    apply_paper_theme,
    is_no_data,
    method_color,
    method_label,
    no_data_figure,
)
from aimm.plots.trajectory import (
    forgetting_signal_figure,
    interval_figure,
    linear_fit,
    signals_figure,
    training_figure,
)

__all__ = [
    "BrowserNotFoundError", "KIND_COLORS", "LiveTrainingPlot", "METHOD_COLORS", "METHOD_NAMES",
    "RunData", "apply_paper_theme", "browser_or_none", "comparison_figures", "export", "export_figures",
    "find_browser", "forgetting_signal_figure", "interval_figure", "is_no_data",
    "label_distribution_figure", "linear_fit", "live_training_figure", "load_run_data",
    "method_ci_bars", "method_color", "method_label", "metrics_bars", "no_data_figure",
    "run_figures", "scores_heatmap", "seed_interval_figure", "seed_signals_figure",
    "signals_figure", "task1_figure", "token_length_figure", "training_figure",
    "usable_formats",
]
