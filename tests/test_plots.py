"""aimm.plots: figures from synthetic run data, export, and the figures of a real tiny run."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from aimm import plots
from aimm.plots import output as export_mod
from conftest import browser_or_skip

TASKS = ["dbpedia", "amazon", "yahoo", "agnews"]


# ------------------------------------------------------------------------------ synthetic data
def synthetic_run(n_steps: int = 40, slope: float = -0.01, seed: int = 0):
    """steps / merges of an aimmerging run over two tasks, as load_trajectory returns them."""
    rng = np.random.default_rng(seed)
    steps, merges = [], []
    g = 0
    for stage, task in enumerate(["dbpedia", "amazon"]):
        interval, last = 4, 0
        for step in range(1, n_steps + 1):
            g += 1
            rec = {"task": task, "stage": stage, "step": step, "global_step": g,
                   "loss": 2.0 - 0.01 * g + rng.normal(0, 0.01), "lr": 1e-3}
            if stage == 1:
                rec.update(forgetting_signal=1.0 + slope * step + rng.normal(0, 0.001),
                           threshold=np.nan if step - last <= 2 else 2.1, activations=0,
                           interval=interval, planned_step=last + interval)
                if step - last >= interval:
                    before, interval = interval, min(16, interval * 2) if step > 10 else interval
                    merges.append({"task": task, "stage": stage, "step": step,
                                   "lambda": 1.0 / step, "l1": interval / step,
                                   "interval_before": before, "interval_after": interval,
                                   "outer_steps": before, "w_in": 0.6, "w_out": 0.4,
                                   "activations": 1, "kind": "planned" if step < 20 else "forced"})
                    rec["merged"] = 1
                    last = step
            steps.append(rec)
    return pd.DataFrame(steps), pd.DataFrame(merges)


def synthetic_matrix(decay: float) -> pd.DataFrame:
    m = pd.DataFrame(np.nan, index=pd.Index(TASKS, name="after_task"), columns=TASKS)
    for j in range(len(TASKS)):
        for i in range(j + 1):
            m.iloc[j, i] = round(0.9 - decay * (j - i), 4)
    return m


def by_name(fig: go.Figure) -> dict[str, go.BaseTraceType]:
    return {tr.name: tr for tr in fig.data}


def assert_no_data(fig: go.Figure) -> None:
    assert isinstance(fig, go.Figure)
    assert plots.is_no_data(fig)
    assert any("no data" in a.text for a in fig.layout.annotations)
    assert len(fig.data) == 0


# ------------------------------------------------------------------------------ theme
def test_theme_widths_font_and_colours():
    fig = plots.apply_paper_theme(go.Figure(go.Scatter(x=[1], y=[1])), "one")
    assert fig.layout.width == 336 and 180 <= fig.layout.height <= 300
    assert "Times" in fig.layout.template.layout.font.family
    assert fig.layout.template.layout.plot_bgcolor == "white"
    plots.apply_paper_theme(fig, "two")
    assert fig.layout.width == 672
    with pytest.raises(ValueError, match="one"):
        plots.apply_paper_theme(fig, "three")
    assert set(plots.METHOD_COLORS) >= {"seq_lora", "replay", "mtl", "single_task",
                                        "aimmerging", "recurrent_kif"}
    assert len(set(plots.METHOD_COLORS.values())) == len(plots.METHOD_COLORS)
    assert plots.method_color("aimmerging-eval") == plots.METHOD_COLORS["aimmerging"]


def test_theme_keeps_figure_settings():
    """Theming again (as export does) keeps what a builder set on purpose."""
    fig = plots.scores_heatmap(synthetic_matrix(0.1))
    assert fig.layout.xaxis.showgrid is False
    plots.apply_paper_theme(fig, "two")
    assert fig.layout.xaxis.showgrid is False and fig.layout.width == 672


# ------------------------------------------------------------------------------ trajectory figures
def test_signals_figure():
    steps, merges = synthetic_run()
    fig = plots.signals_figure(steps, merges, "amazon")
    tr = by_name(fig)
    fs, ls = tr["Forgetting signal"], tr["Learning signal Λ"]
    assert fs.type == "scatter" and fs.mode == "markers" and fs.yaxis in (None, "y")
    amazon = steps[steps.task == "amazon"]
    np.testing.assert_allclose(fs.y, amazon.forgetting_signal)
    np.testing.assert_array_equal(fs.x, amazon.step)
    assert ls.mode == "lines+markers" and ls.yaxis == "y2"
    np.testing.assert_allclose(ls.y, merges["lambda"])
    np.testing.assert_array_equal(ls.x, merges.step)
    # the twin axis
    assert fig.layout.yaxis2.overlaying == "y" and fig.layout.yaxis2.side == "right"
    assert fig.layout.xaxis.title.text == "Inner step"
    assert fig.layout.yaxis.title.text == "Forgetting signal (memory loss)"
    assert fig.layout.yaxis2.title.text == "Learning signal Λ"
    # merge events: one trace per kind, one vertical segment per merge
    kinds = {k: v for k, v in tr.items() if k.startswith("merge (")}
    assert set(kinds) == {"merge (planned)", "merge (forced)"}
    xs = [x for t in kinds.values() for x in t.x if x is not None]
    assert sorted(set(xs)) == sorted(merges.step.astype(float))
    assert all(t.yaxis == "y3" for t in kinds.values())
    thr = tr["Threshold δ"]
    assert thr.line.shape == "hv"
    # task 1 of the run has no signals
    assert_no_data(plots.signals_figure(steps, merges, "dbpedia"))


def test_signals_figure_lambda_from_l1_and_no_merges():
    steps, merges = synthetic_run()
    kif = merges.drop(columns=["lambda"]).assign(kind="fixed")
    fig = plots.signals_figure(steps, kif, "amazon")
    np.testing.assert_allclose(by_name(fig)["Learning signal Λ"].y, kif.l1 / kif.interval_before)
    assert "merge (fixed)" in by_name(fig)
    fig = plots.signals_figure(steps, pd.DataFrame(), "amazon")  # seq_lora with probe history
    assert "Forgetting signal" in by_name(fig) and "Learning signal Λ" not in by_name(fig)
    assert fig.layout.yaxis2.overlaying == "y"


def test_interval_figure():
    steps, merges = synthetic_run()
    fig = plots.interval_figure(steps, merges, "amazon")
    line = by_name(fig)["Interval S"]
    assert line.line.shape == "hv"
    np.testing.assert_array_equal(line.y, steps[steps.task == "amazon"].interval)
    assert fig.layout.yaxis.title.text == "Merge interval S"
    assert fig.layout.xaxis.title.text == "Inner step"
    marks = [t for t in fig.data if t.name.startswith("merge (")]
    assert sum(len(t.x) for t in marks) == len(merges)
    # from merges only (no interval column)
    fig = plots.interval_figure(steps.drop(columns=["interval"]), merges, "amazon")
    line = by_name(fig)["Interval S"]
    assert line.x[0] == 0 and line.y[0] == merges.interval_before.iloc[0]
    assert list(line.y[1:len(merges) + 1]) == list(merges.interval_after)
    assert_no_data(plots.interval_figure(steps, merges, "dbpedia"))


def test_forgetting_signal_figures_plot_the_release_scale_and_say_so():
    steps, merges = synthetic_run()
    steps["forgetting_signal_release"] = steps["forgetting_signal"] / 4  # the release's probe: loss / 4
    steps["threshold_release"] = steps["threshold"] / 4
    amazon = steps[steps.task == "amazon"]
    fig = plots.signals_figure(steps, merges, "amazon")
    np.testing.assert_allclose(by_name(fig)["Forgetting signal"].y, amazon.forgetting_signal / 4)
    np.testing.assert_allclose(by_name(fig)["Threshold δ"].y, amazon.threshold / 4)
    assert "release scale" in fig.layout.yaxis.title.text
    hist = plots.forgetting_signal_figure({"aimmerging": steps}, "amazon")
    np.testing.assert_allclose(hist.data[0].y, amazon.forgetting_signal / 4)
    assert "release scale" in hist.layout.yaxis.title.text
    raw, _ = synthetic_run(seed=3)  # a run without the column: both plotted raw, axis says so
    mixed = plots.forgetting_signal_figure({"aimmerging": steps, "seq_lora": raw}, "amazon")
    np.testing.assert_allclose(mixed.data[0].y, amazon.forgetting_signal)
    assert mixed.layout.yaxis.title.text == "History loss"


def test_forgetting_signal_figure_fits_the_slope():
    a, _ = synthetic_run(slope=-0.01, seed=1)
    b, _ = synthetic_run(slope=0.02, seed=2)
    fig = plots.forgetting_signal_figure({"aimmerging": a, "seq_lora": b}, "amazon")
    scatters = [t for t in fig.data if t.mode == "markers"]
    fits = [t for t in fig.data if t.mode == "lines"]
    assert [t.name for t in scatters] == ["AIMMerging", "SeqLoRA"]
    assert len(fits) == 2
    slopes = {t.meta["run"]: t.meta["slope"] for t in fits}
    assert slopes["aimmerging"] == pytest.approx(-0.01, abs=2e-4)
    assert slopes["seq_lora"] == pytest.approx(0.02, abs=2e-4)
    # the legend shows the slope
    shown = float(re.search(r"slope ([-+0-9.e]+)", fits[0].name).group(1))
    assert shown == pytest.approx(-0.01, abs=2e-4)
    assert scatters[0].marker.color == plots.METHOD_COLORS["aimmerging"]
    assert fits[0].line.color == plots.METHOD_COLORS["aimmerging"]
    # exact line
    x = np.arange(10.0)
    exact = pd.DataFrame({"task": "t", "step": x, "forgetting_signal": 3 * x + 1})
    fit = [t for t in plots.forgetting_signal_figure({"replay": exact}, "t").data if t.mode == "lines"][0]
    assert fit.meta["slope"] == pytest.approx(3) and fit.meta["intercept"] == pytest.approx(1)
    assert_no_data(plots.forgetting_signal_figure({}, "amazon"))
    assert_no_data(plots.forgetting_signal_figure({"x": a}, "dbpedia"))


def test_training_figure_and_live_plot():
    steps, merges = synthetic_run()
    fig = plots.training_figure(steps, merges)
    tr = by_name(fig)
    np.testing.assert_allclose(tr["Training loss"].y, steps.loss)
    np.testing.assert_array_equal(tr["Training loss"].x, steps.global_step)
    assert "History loss" in tr
    # merges placed at their global step (stage offset 40)
    xs = {x for t in fig.data if t.name.startswith("merge (") for x in t.x if x is not None}
    assert xs == set((merges.step + 40).astype(float))
    assert {a.text for a in fig.layout.annotations} == {"dbpedia", "amazon"}
    assert fig.layout.width == 672
    assert_no_data(plots.training_figure(pd.DataFrame()))

    live = plots.LiveTrainingPlot(every=7)
    assert isinstance(live.widget, go.FigureWidget)
    merge_steps = {(r.task, r.step) for r in merges.itertuples()}
    for rec in steps.to_dict("records"):
        if (rec["task"], rec["step"]) in merge_steps:  # the engine reports the merge first
            row = merges[(merges.task == rec["task"]) & (merges.step == rec["step"])]
            live.on_merge(row.iloc[0].to_dict())
        live.on_step({k: v for k, v in rec.items() if not (isinstance(v, float) and np.isnan(v))})
        if rec["step"] == 40:
            class Stage:  # noqa: D401 - the engine's Stage
                index, name = rec["stage"], rec["task"]
            live.on_stage_end(Stage, [{"eval_task": rec["task"], "score": 0.5}])
    w = live.widget
    assert len(w.data[0].x) == len(steps)
    assert len(w.data[1].x) == steps.forgetting_signal.notna().sum()
    assert {x for x in w.data[2].x if x is not None} == set(merges.step + 40)
    assert "after amazon" in w.layout.title.text
    static = live.figure()
    assert isinstance(static, go.Figure) and len(static.data) >= 3


# ------------------------------------------------------------------------------ result figures
def test_task1_figure():
    mats = {"seq_lora": synthetic_matrix(0.2), "aimmerging": synthetic_matrix(0.05)}
    fig = plots.task1_figure(mats, multitask=0.88)
    tr = by_name(fig)
    assert list(tr["SeqLoRA"].x) == TASKS
    np.testing.assert_allclose(tr["SeqLoRA"].y, mats["seq_lora"]["dbpedia"])
    np.testing.assert_allclose(tr["AIMMerging"].y, mats["aimmerging"]["dbpedia"])
    assert tr["AIMMerging"].line.color == plots.METHOD_COLORS["aimmerging"]
    mt = tr["Multi-task"]
    assert mt.line.dash == "dash" and set(mt.y) == {0.88}
    assert fig.layout.yaxis.title.text.startswith("Score on task 1")
    assert len(plots.task1_figure(mats).data) == 2  # no multitask line
    assert_no_data(plots.task1_figure({}))
    assert_no_data(plots.task1_figure({"x": pd.DataFrame()}))


def test_scores_heatmap():
    m = synthetic_matrix(0.1)
    fig = plots.scores_heatmap(m, title="AIMMerging")
    (hm,) = fig.data
    assert hm.type == "heatmap" and hm.zmin == 0 and hm.zmax == 1
    z = np.array(hm.z, dtype=float)
    np.testing.assert_allclose(z, m.to_numpy(), equal_nan=True)
    assert list(hm.x) == TASKS and list(hm.y) == TASKS
    assert hm.text[0][1] == "" and hm.text[1][0] == "0.80"
    assert fig.layout.yaxis.autorange == "reversed"
    assert_no_data(plots.scores_heatmap(pd.DataFrame()))


def test_metrics_bars():
    metrics = {"seq_lora": {"OP": 0.5, "BWT": -0.2, "FWT": None, "forgetting": 0.25},
               "aimmerging": {"OP": 0.7, "BWT": -0.05, "FWT": 0.01, "forgetting": 0.06,
                              "merges_per_stage": {"a": 1}},
               "mtl": {"OP": 0.8, "method": "mtl"}}
    fig = plots.metrics_bars(metrics)
    tr = by_name(fig)
    assert [t.type for t in fig.data] == ["bar"] * 3
    assert list(tr["SeqLoRA"].x) == ["OP", "BWT", "Forgetting"]
    assert list(tr["SeqLoRA"].y) == [0.5, -0.2, 0.25]
    assert list(tr["AIMMerging"].x) == ["OP", "BWT", "FWT", "Forgetting"]
    assert list(tr["Multi-task"].x) == ["OP"]
    assert fig.layout.barmode == "group"
    assert_no_data(plots.metrics_bars({}))
    assert_no_data(plots.metrics_bars({"x": {"OP": None}}))


def test_data_prep_figures():
    stats = pd.DataFrame([
        {"task": t, "split": s, "label": lab, "count": c}
        for t, labs in (("sst-2", ["positive", "negative"]), ("agnews", ["World", "Sports"]))
        for s in ("train", "test") for lab, c in zip(labs, (10, 5))])
    fig = plots.label_distribution_figure(stats)
    assert fig.layout.barmode == "stack"
    assert {t.name for t in fig.data} == {"positive", "negative", "World", "Sports"}
    assert sum(sum(t.y) for t in fig.data) == stats["count"].sum()
    lengths = pd.DataFrame({"task": ["a"] * 6 + ["b"] * 6, "split": ["train", "test"] * 6,
                            "tokens": np.arange(12)})
    fig = plots.token_length_figure(lengths, max_len=8)
    assert [t.type for t in fig.data] == ["box", "box"]
    assert {t.name for t in fig.data} == {"train", "test"}
    assert sorted(np.concatenate([t.y for t in fig.data])) == list(range(12))
    assert_no_data(plots.label_distribution_figure(pd.DataFrame()))
    assert_no_data(plots.token_length_figure(pd.DataFrame(columns=["task", "split", "tokens"])))


# ------------------------------------------------------------------------------ export
def test_export_writes_html_png_pdf_svg(tmp_path):
    browser_or_skip()
    steps, merges = synthetic_run()
    fig = plots.signals_figure(steps, merges, "amazon")
    paths = plots.export(fig, tmp_path / "fig" / "signals_amazon", width="two")
    assert [p.name for p in paths] == ["signals_amazon.html", "signals_amazon.png",
                                       "signals_amazon.pdf", "signals_amazon.svg"]
    data = {p.suffix: p.read_bytes() for p in paths}
    assert data[".png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert data[".pdf"][:5] == b"%PDF-"
    assert b"<svg" in data[".svg"][:500]
    html = data[".html"].decode()
    assert "Learning signal" in html and len(html) > 1_000_000  # plotly.js embedded
    assert not re.search(r"<script[^>]*src=", html)  # nothing fetched: works offline
    # PNG size: two-column width (672 px) x scale 3
    assert int.from_bytes(data[".png"][16:20], "big") == 672 * 3
    assert fig.layout.width == 336  # the figure itself is not changed
    assert not list((tmp_path / "fig").glob("*.tmp"))


def test_export_without_browser_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(export_mod, "BROWSER_CANDIDATES", ())
    monkeypatch.setattr(export_mod, "_choreographer_find", lambda: None)
    fig = plots.metrics_bars({"aimmerging": {"OP": 0.5}})
    with pytest.raises(plots.BrowserNotFoundError, match="apt-get install chromium"):
        plots.export(fig, tmp_path / "bars", formats=("html", "png"), missing_browser="raise")
    assert not (tmp_path / "bars.html").exists()  # nothing written
    # HTML alone needs no browser
    assert plots.export(fig, tmp_path / "bars", formats=("html",))[0].is_file()
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "nope"))
    with pytest.raises(plots.BrowserNotFoundError, match="BROWSER_PATH"):
        plots.find_browser()


def test_export_without_browser_writes_html_and_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(export_mod, "BROWSER_CANDIDATES", ())
    monkeypatch.setattr(export_mod, "_choreographer_find", lambda: None)
    monkeypatch.setitem(export_mod._warned, "static_skipped", False)
    fig = plots.metrics_bars({"aimmerging": {"OP": 0.5}})
    paths = plots.export(fig, tmp_path / "a")  # default formats: html, png, pdf, svg
    assert [p.name for p in paths] == ["a.html"] and paths[0].stat().st_size > 1000
    written = plots.export_figures({"b": fig, "c": fig}, tmp_path, formats=("png", "html"))
    assert {k: [p.name for p in v] for k, v in written.items()} == {"b": ["b.html"], "c": ["c.html"]}
    assert plots.usable_formats(["svg"]) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one warning per process, however many exports
    assert "HTML only" in err[0] and "PNG/PDF/SVG were skipped" in err[0]
    assert "make setup" in err[0] and "apt-get install chromium" in err[0] and "BROWSER_PATH" in err[0]
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(ValueError, match="missing_browser='maybe'"):
        plots.export(fig, tmp_path / "d", missing_browser="maybe")


# ------------------------------------------------------------------------------ real tiny run
def test_run_figures_of_a_tiny_run(tiny_config):
    from aimm.training.engine import run

    cfg = tiny_config(method="aimmerging", method_options={"initial_interval": 2}, record_forgetting_signal=True)
    live = plots.LiveTrainingPlot(every=3)
    run_dir = run(cfg, callbacks=[live])
    figs = plots.run_figures(run_dir)
    for key in ("signals_agnews", "interval_agnews", "forgetting_signal_agnews", "training",
                "heatmap_aimmerging", "task1_curve", "metrics_bars"):
        assert key in figs, sorted(figs)
        assert not plots.is_no_data(figs[key]), key
        assert len(figs[key].data) > 0, key
    sig = by_name(figs["signals_agnews"])
    assert len(sig["Forgetting signal"].x) > 0 and len(sig["Learning signal Λ"].x) > 0
    assert "signals_sst-2" not in figs  # task 1: plain LoRA, no signals
    assert len(live.widget.data[0].x) == len(plots.load_run_data(run_dir).steps)
    comp = plots.comparison_figures({"aimmerging": run_dir})
    assert {"task1_curve", "metrics_bars", "heatmap_aimmerging", "signals_agnews"} <= set(comp)


def _cielab(hex_color: str) -> tuple[float, float, float]:
    """sRGB hex -> CIELAB (D65)."""
    r, g, b = (int(hex_color.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4))
    lin = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in (r, g, b)]
    x = (0.4124 * lin[0] + 0.3576 * lin[1] + 0.1805 * lin[2]) / 0.95047
    y = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    z = (0.0193 * lin[0] + 0.1192 * lin[1] + 0.9505 * lin[2]) / 1.08883
    f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in (x, y, z)]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def test_every_two_methods_differ_visibly_in_colour():
    # one figure shows all methods (the catalogue): two colours closer than CIE76 dE 15 read as
    # one in print (DARE (linear)'s yellow was dE ~5 from Recurrent-KIF's orange)
    import itertools
    import math

    from aimm.methods import METHODS

    close = [(a, b, round(math.dist(_cielab(METHODS[a].color), _cielab(METHODS[b].color)), 1))
             for a, b in itertools.combinations(METHODS, 2)
             if math.dist(_cielab(METHODS[a].color), _cielab(METHODS[b].color)) < 15]
    assert not close, close


def test_a_long_legend_above_the_plot_gets_its_own_room():
    # 20 methods in a one-column figure: the legend's rows go into a taller top margin instead of
    # over the data (plotly's own margin push stops short); a short legend leaves the figure as it was
    short = plots.apply_paper_theme(go.Figure([go.Scatter(x=[1], y=[1], name="a")]), "one")
    many = go.Figure([go.Scatter(x=[1], y=[1], name=f"method number {i}") for i in range(20)])
    plots.apply_paper_theme(many, "one")
    rows = plots.theme.legend_rows(many, 336)
    assert rows >= 10  # two columns of long names at most
    assert many.layout.margin.t >= rows * plots.theme.LEGEND_ROW_PX
    assert many.layout.height - short.layout.height == (rows - plots.theme.ROOMY_LEGEND_ROWS) * \
        plots.theme.LEGEND_ROW_PX
    assert short.layout.margin.t == 8
    before = (many.layout.height, many.layout.margin.t)
    plots.apply_paper_theme(many, "one")  # theming twice changes nothing
    assert (many.layout.height, many.layout.margin.t) == before
    side = go.Figure([go.Scatter(x=[1], y=[1], name=f"m{i}") for i in range(20)])
    side.update_layout(legend=dict(orientation="v", x=1.01, y=1))
    plots.apply_paper_theme(side, "one")
    assert plots.theme.legend_rows(side, 336) == 0 and side.layout.height == short.layout.height
