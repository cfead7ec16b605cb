"""Paper look of every figure: fonts, sizes, colours, the empty-data figure."""

from __future__ import annotations

import math
import re
from typing import Any

import plotly.graph_objects as go

from aimm.methods import METHODS

# Okabe-Ito (colour-blind safe); one colour per method everywhere: the methods' own facts.
METHOD_COLORS: dict[str, str] = {name: cls.color for name, cls in METHODS.items()}
METHOD_NAMES: dict[str, str] = {name: cls.display_name for name, cls in METHODS.items()}
#: the joint-training (upper bound) method: the "Multi-task" line of the task-1 curve
MULTITASK: str | None = next((name for name, cls in METHODS.items() if cls.joint), None)
# colour of a merge event by its kind (controller: early / planned / forced; Recurrent-KIF: fixed)
KIND_COLORS: dict[str, str] = {
    "early": "#E69F00",
    "planned": "#009E73",
    "forced": "#CC79A7",
    "fixed": "#7F7F7F",
}
FORGETTING_COLOR = "#0072B2"
LEARNING_COLOR = "#D55E00"
THRESHOLD_COLOR = "#7F7F7F"
PALETTE = ["#56B4E9", "#F0E442", "#882255", "#44AA99", "#999933", "#AA4499", "#332288",
           "#117733", "#88CCEE", "#DDCC77", "#CC6677", "#AA4466"]

FONT_FAMILY = "Times New Roman, Times, Liberation Serif, Nimbus Roman, serif"
FONT_SIZE = 11
WIDTHS = {"one": 336, "two": 672}  # 3.5 in / 7 in at 96 px per inch
ASPECT = {"one": 0.75, "two": 0.42}  # height / width unless the figure asks otherwise
GRID_COLOR = "#E6E6E6"
LEGEND_ROW_PX = 19  # one row of the legend above the plot (font FONT_SIZE - 1)
ROOMY_LEGEND_ROWS = 3  # legend rows the builders' aspects leave room for; more grow the figure


def method_label(name: str) -> str:
    """Display name of a method key (``aimmerging`` -> ``AIMMerging``); other labels unchanged."""
    return METHOD_NAMES.get(str(name), str(name))


def method_color(name: str, fallback_index: int = 0) -> str:
    """Colour of a method key, of a label containing one (``aimmerging-eval``), or a fallback."""
    name = str(name)
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    for key, display in METHOD_NAMES.items():
        if name == display:
            return METHOD_COLORS[key]
    lower = name.lower()
    hits = [k for k in METHOD_COLORS if k in lower]
    if hits:
        return METHOD_COLORS[max(hits, key=len)]
    return PALETTE[fallback_index % len(PALETTE)]


def safe_key(text: Any) -> str:
    """A file-name-like key part: ``sst-2`` stays, ``a b/c`` -> ``a_b_c``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def is_number(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def set_meta(fig: go.Figure, **values: Any) -> go.Figure:
    meta = dict(fig.layout.meta) if isinstance(fig.layout.meta, dict) else {}
    meta.update(values)
    fig.layout.meta = meta
    return fig


def get_meta(fig: go.Figure, key: str, default: Any = None) -> Any:
    meta = fig.layout.meta
    return meta.get(key, default) if isinstance(meta, dict) else default


def _axis_style(title_standoff: int = 4) -> dict[str, Any]:
    return dict(showgrid=True, gridcolor=GRID_COLOR, gridwidth=0.6, zeroline=False,
                showline=True, linecolor="black", linewidth=0.8, ticks="outside", ticklen=3,
                tickwidth=0.8, tickcolor="black", automargin=True,
                title=dict(standoff=title_standoff, font=dict(size=FONT_SIZE)),
                tickfont=dict(size=FONT_SIZE - 1))


def paper_template() -> go.layout.Template:
    """The paper look as a plotly template: settings a figure makes itself take precedence."""
    axis = _axis_style()
    return go.layout.Template(layout=dict(
        font=dict(family=FONT_FAMILY, size=FONT_SIZE, color="black"),
        paper_bgcolor="white", plot_bgcolor="white", colorway=list(METHOD_COLORS.values()) + PALETTE,
        margin=dict(l=8, r=8, t=8, b=8, pad=0),
        legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="left", x=0,
                    bgcolor="rgba(255,255,255,0)", borderwidth=0, font=dict(size=FONT_SIZE - 1),
                    itemwidth=30, tracegroupgap=2),
        title=dict(font=dict(size=FONT_SIZE + 1), x=0, xanchor="left", xref="paper",
                   y=1, yref="container", yanchor="top", pad=dict(t=4, l=2)),
        hoverlabel=dict(font=dict(family=FONT_FAMILY)),
        xaxis=axis, yaxis=axis,
    ))


PAPER_TEMPLATE = paper_template()


def apply_paper_theme(fig: go.Figure, width: str | None = "one", height: int | None = None) -> go.Figure:
    """Style ``fig`` for a paper (in place; returns it).

    ``width``: ``"one"`` (one column, 3.5 in = 336 px at 96 dpi) or ``"two"`` (7 in = 672 px);
    ``None`` keeps the width the figure was built for. ``height`` defaults to the figure's own
    aspect (set by the builders) or 0.75 / 0.42 of the width. Serif font, white background, light
    grid, compact margins, legend in a row above the plotting area so it never covers data. The
    style is a template, so what a figure sets itself (no grid, a coloured axis) is kept, and
    theming twice (e.g. again by :func:`export`) gives the same figure.
    """
    width = width or get_meta(fig, "aimm_width", "one")
    if width not in WIDTHS:
        raise ValueError(f"width={width!r}: choose 'one' (one column) or 'two' (two columns)")
    px = WIDTHS[width]
    rows = legend_rows(fig, px)
    extra = max(0, rows - ROOMY_LEGEND_ROWS) * LEGEND_ROW_PX  # many methods: a taller figure
    if height is None:
        aspect = (get_meta(fig, "aimm_aspect") or {}).get(width, ASPECT[width])
        height = int(round(px * aspect)) + extra
    fig.update_layout(template=PAPER_TEMPLATE, width=px, height=height, autosize=False)
    title_room = 24 if fig.layout.title.text else 8
    if extra:  # the legend's rows in the top margin: plotly's own push stops short and overlaps
        fig.layout.margin.t = title_room + rows * LEGEND_ROW_PX
    elif fig.layout.margin.t is None:  # room for the title above the legend
        fig.layout.margin.t = title_room
    set_meta(fig, aimm_width=width)
    return fig


def legend_rows(fig: go.Figure, px: int) -> int:
    """Rows of ``fig``'s legend when it lies in a row above the plot (the paper look), at
    ``px`` wide: its entries over the columns that fit (estimated from the longest name);
    0 for a legend placed elsewhere or hidden."""
    legend = fig.layout.legend
    if fig.layout.showlegend is False or legend.orientation == "v" or (
            legend.y is not None and legend.y < 1):
        return 0
    names = [str(t.name) for t in fig.data if t.name and t.showlegend is not False]
    if not names:
        return 0
    item_px = 40 + 0.5 * (FONT_SIZE - 1) * max(len(n) for n in names)  # symbol, gap, text
    columns = max(1, int(px // item_px))
    return math.ceil(len(names) / columns)


def no_data_figure(message: str = "no data", *, x_title: str | None = None,
                   y_title: str | None = None, title: str | None = None,
                   width: str = "one") -> go.Figure:
    """An empty figure that says why (instead of raising on empty inputs)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=FONT_SIZE + 1, color="#555555"))
    fig.update_layout(title=title)
    fig.update_xaxes(title=x_title, showticklabels=False)
    fig.update_yaxes(title=y_title, showticklabels=False)
    set_meta(fig, aimm_no_data=True)
    return apply_paper_theme(fig, width)


def is_no_data(fig: go.Figure) -> bool:
    """True for a figure made by :func:`no_data_figure`."""
    return bool(get_meta(fig, "aimm_no_data", False))
