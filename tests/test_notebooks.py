"""The notebooks 01 -> 04 end to end with papermill (smoke preset: tiny model, tiny benchmark),
checked on what they wrote; and the parameter validation that guards them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from aimm import notebook
from aimm.config import ConfigError
from aimm.reproduce import NOTEBOOK_DIR, NOTEBOOKS, PRESETS, RESULTS, preset_parameters, reproduce
from conftest import browser_or_skip, make_tiny_benchmark

TASKS = ["sst-2", "agnews", "rte"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_tiny_benchmark(tmp_path_factory.mktemp("nb-bench"))


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, bench):
    """``reproduce("smoke")`` once for the module: (output dir, fig dir, seconds)."""
    root = tmp_path_factory.mktemp("nb-reproduce")
    start = time.perf_counter()
    out = reproduce("smoke", run_root=root / "runs", fig_dir=root / "Fig", data_dir=bench,
                    progress=False, log_output=False)
    return out, root / "Fig", time.perf_counter() - start


def _cells(nb_path: Path):
    return nbformat.read(nb_path, as_version=4).cells


# ------------------------------------------------------------------------------- the notebooks
@pytest.mark.slow
def test_every_notebook_ran_with_the_injected_parameters_and_no_error(reproduced):
    out, _, seconds = reproduced
    for name in NOTEBOOKS:
        cells = _cells(out / "notebooks" / name)
        injected = [c for c in cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1, name
        assert "smoke = True" in injected[0].source and "interactive = False" in injected[0].source
        errors = [o for c in cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.output_type == "error"]
        assert not errors, f"{name}: {errors}"
    summary = json.loads((out / "reproduce.json").read_text())
    assert list(summary["notebooks"]) == list(NOTEBOOKS)
    assert seconds < 240, f"smoke reproduction took {seconds:.0f}s"


@pytest.mark.slow
def test_runs_json_names_complete_runs_of_each_method(reproduced):
    out, _, _ = reproduced
    runs = json.loads((out / "runs.json").read_text())
    assert set(runs) == {"seq_lora-s42", "aimmerging-s42"}
    for label, run_dir in runs.items():
        run_dir = Path(run_dir)
        assert run_dir == out / label
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["complete"] is True and metrics["stages_done"] == 3
        config = json.loads((run_dir / "config.json").read_text())
        assert config["model"] == "tiny-causal" and config["tasks"] == TASKS
    # seq_lora records the forgetting signal (notebook 03 compares it with AIMMerging's)
    steps = pd.read_csv(out / "seq_lora-s42" / "stages" / "02_agnews" / "steps.csv")
    assert steps["forgetting_signal"].notna().all()
    merges = pd.read_csv(out / "aimmerging-s42" / "stages" / "02_agnews" / "merges.csv")
    assert len(merges) >= 1


@pytest.mark.slow
def test_data_statistics_table_describes_every_task_and_split(reproduced):
    out, _, _ = reproduced
    stats = pd.read_csv(out / "data_stats.csv")
    assert list(stats["task"].unique()) == TASKS
    sizes = {(r.task, r.split): r.examples for r in stats.itertuples()}
    assert sizes[("sst-2", "train")] == 24 and sizes[("rte", "test")] == 6
    assert dict(zip(stats["task"], stats["labels"])) == {"sst-2": 2, "agnews": 3, "rte": 2}
    assert (stats["tokens_mean"] > 5).all() and (stats["tokens_max"] >= stats["tokens_mean"]).all()
    labels = pd.read_csv(out / "label_counts.csv")
    assert set(labels.columns) == {"task", "split", "label", "count"}
    assert labels[(labels.task == "agnews") & (labels.split == "train")]["count"].sum() == 24
    assert (out / "data_stats.md").read_text().startswith("| task | split |")


@pytest.mark.slow
def test_metrics_table_matches_the_runs_in_csv_and_markdown(reproduced):
    out, _, _ = reproduced
    table = pd.read_csv(out / "metrics.csv")
    assert set(table["method"]) == {"seq_lora", "aimmerging"}
    assert {"OP", "BWT", "FWT", "forgetting"} <= set(table.columns)
    for row in table.itertuples():
        metrics = json.loads((out / row.run / "metrics.json").read_text())
        assert row.OP == pytest.approx(metrics["OP"])
        assert row.BWT == pytest.approx(metrics["BWT"])
    assert table.set_index("method").loc["aimmerging", "merges"] >= 2
    md = (out / "metrics.md").read_text().splitlines()
    assert md[0].startswith("| run | method | seed |") and len(md) == 2 + len(table)


def _figure_stems() -> list[str]:
    stems = ["data_labels", "data_token_lengths", "heatmap_seq_lora", "heatmap_aimmerging",
             "task1_curve", "metrics_bars"]
    for task in TASKS[1:]:
        stems += [f"signals_{task}", f"interval_{task}", f"forgetting_signal_{task}"]
    return stems


def assert_html_figures(fig_dir: Path) -> None:
    for stem in _figure_stems():
        html = fig_dir / f"{stem}.html"
        assert html.stat().st_size > 1000 and "plotly" in html.read_text()[:5_000_000], stem


@pytest.mark.slow
def test_every_figure_was_exported_as_html(reproduced):
    assert_html_figures(reproduced[1])


@pytest.mark.slow
@pytest.mark.browser
def test_every_figure_was_exported_as_png(reproduced):
    browser_or_skip()
    _, fig_dir, _ = reproduced
    for stem in _figure_stems():
        png = fig_dir / f"{stem}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000, stem


@pytest.mark.slow
def test_rerunning_the_training_notebook_resumes_instead_of_retraining(reproduced, bench):
    out, fig_dir, _ = reproduced
    adapter = out / "aimmerging-s42" / "stages" / "03_rte" / "adapter.safetensors"
    before = adapter.stat().st_mtime_ns
    reproduce("smoke", run_root=out.parent, fig_dir=fig_dir, data_dir=bench,
              notebooks=("02_sequential_training.ipynb",), progress=False, log_output=False)
    assert adapter.stat().st_mtime_ns == before
    cells = _cells(out / "notebooks" / "02_sequential_training.ipynb")
    text = "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)
    assert "after rte" not in text  # no stage was trained again


# ------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("params, message", [
    ({"methods": ["seq_lora", "aimmergin"]},
     "methods: unknown method 'aimmergin' (did you mean 'aimmerging'?)"),
    ({"max_trian": 10}, "unknown parameter 'max_trian' (did you mean 'max_train'?)"),
    ({"max_train": "64"}, "max_train='64': must be a positive integer"),
    ({"seeds": 42}, "seeds=42: must be a non-empty list"),
    ({"smoke": "yes"}, "smoke='yes': must be True or False"),
    ({"extra": {"batch_sise": 4}},
     "extra: unknown RunConfig field 'batch_sise' (did you mean 'batch_size'?)"),
    ({"extra": {"method": "replay"}}, "extra: 'method' is set by its own parameter"),
    ({"extra": {"batch_size": 0}}, "batch_size=0: must be a positive integer"),
    ({"method_options": {"aimmerging": {"initial_intervl": 4}}},
     "unknown option 'initial_intervl' (did you mean 'initial_interval'?)"),
    ({"method_options": {"replay": {}}}, "method_options: 'replay' is not one of methods"),
    ({"benchmark": "standard_cl", "order": 7}, "order=7: benchmark standard_cl has orders 1, 2, 3"),
])
def test_validate_parameters_names_the_problem(params, message):
    with pytest.raises(ConfigError) as err:
        notebook.validate_parameters(params)
    assert message in str(err.value)


def test_configs_lay_out_one_run_per_method_and_seed(tmp_path):
    p = notebook.validate_parameters({"methods": ["seq_lora", "replay", "aimmerging"],
                                      "seeds": [1, 2], "run_root": str(tmp_path), "run_name": "x",
                                      "extra": {"batch_size": 2}})
    cfgs = notebook.configs(p)
    assert [c.run_id for c in cfgs] == ["seq_lora-s1", "seq_lora-s2", "replay-s1", "replay-s2",
                                        "aimmerging-s1", "aimmerging-s2"]
    assert all(Path(c.run_dir) == tmp_path / "x" / c.run_id for c in cfgs)
    assert {c.method: c.record_forgetting_signal for c in cfgs} == {"seq_lora": True, "replay": True,
                                                         "aimmerging": False}
    assert all(c.batch_size == 2 and c.model == "smollm2-135m" for c in cfgs)
    assert notebook.run_dirs(p) == {c.run_id: Path(c.run_dir) for c in cfgs}
    smoke = notebook.configs(notebook.validate_parameters({"smoke": True}))
    assert {c.model for c in smoke} == {"tiny-causal"} and smoke[0].max_train == 16


def test_notebook_parameters_catch_a_name_injected_after_the_parameters_cell():
    ns = {"In": [], "notebook": notebook}
    before = set(ns) | {"_before"}
    ns.update(benchmark="superni", max_trian=3, _hidden=1)
    assert notebook.notebook_parameters(ns, before) == {"benchmark": "superni", "max_trian": 3}


def test_reproduce_help_names_every_preset_and_results_folder():
    # the help text is written out (importing the presets would load torch for `aimm --help`)
    from aimm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    actions = {a.dest: a.help for a in sub.choices["reproduce"]._actions}
    named = {w.strip("()") for w in actions["preset"].replace("|", " ").split()}
    assert set(PRESETS) <= named, set(PRESETS) - named
    for preset, folder in RESULTS.items():
        assert f"{preset}: {folder}" in actions["results_dir"]


def test_every_preset_is_valid_and_the_demo_is_small():
    for name in PRESETS:
        preset_parameters(name, data_dir=None)
    demo = preset_parameters("demo")
    assert demo["model"] == "smollm2-135m" and demo["methods"] == ["seq_lora", "aimmerging"]
    assert demo["max_train"] <= 128 and demo["interactive"] is False
    full = preset_parameters("superni")
    assert full["max_train"] == 1000 and full["max_test"] is None and full["epochs"] == 10
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        preset_parameters("dem")


def test_each_notebook_has_one_parameters_cell_and_no_outputs():
    for name in NOTEBOOKS:
        cells = _cells(NOTEBOOK_DIR / name)
        tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in cells if c.cell_type == "code"), f"{name} is committed with outputs"
        defined = {line.split("=")[0].strip() for line in tagged[0].source.splitlines()
                   if "=" in line and not line.startswith(("#", "_"))}
        assert defined == set(notebook.PARAMETER_NAMES), name


@pytest.mark.parametrize("params, message", [
    ({"methods": ["seq_lora", "aimmergin"]}, "did you mean 'aimmerging'?"),
    ({"max_trian": 10}, "unknown parameter 'max_trian' (did you mean 'max_train'?)"),
])
def test_papermill_run_with_a_mistyped_parameter_fails_before_training(tmp_path, params, message):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(NOTEBOOK_DIR / "02_sequential_training.ipynb"),
                            str(tmp_path / "02.ipynb"), kernel_name="python3",
                            parameters={"smoke": True, "interactive": False,
                                        "run_root": str(tmp_path / "runs"), **params},
                            progress_bar=False, cwd=str(NOTEBOOK_DIR.parent))
    assert "ConfigError" in str(err.value) and message in str(err.value)
    assert not (tmp_path / "runs").exists()  # nothing was trained


# ------------------------------------------------------------------------------- the explorer
@pytest.mark.slow
def test_explorer_redraws_for_each_control(reproduced):
    pytest.importorskip("ipywidgets")
    out, _, _ = reproduced
    box = notebook.run_explorer(out.parent, initial=("smoke", "aimmerging-s42"))
    c, fig = box.controls, box.figure
    assert c["run"].value == "smoke" and c["method"].value == "aimmerging-s42"
    assert list(c["task"].options) == TASKS and c["task"].value == "rte"
    assert "forgetting_signal" in c["signal"].options and "lambda" in c["signal"].options
    assert len(fig.data[0].x) == c["steps"].max
    c["signal"].value = "lambda"
    assert fig.data[0].name == "lambda" and len(fig.data[0].x) >= 1
    c["signal"].value = "loss"
    c["steps"].value = (2, 3)
    assert list(fig.data[0].x) == [2, 3]
    c["method"].value = "seq_lora-s42"
    assert "lambda" not in c["signal"].options and "forgetting_signal" in c["signal"].options
    c["task"].value = "sst-2"
    assert c["signal"].options and "forgetting_signal" not in c["signal"].options


# ------------------------------------------------------------------------------- tables / figures
@pytest.mark.slow
def test_metrics_table_takes_fwt_from_single_task_and_task1_curve_the_mtl_line(tmp_path, bench):
    p = notebook.validate_parameters({
        "benchmark": "long_sequence", "order": None, "tasks": ["sst-2", "agnews"], "smoke": True,
        "methods": ["seq_lora", "mtl", "single_task"], "data_dir": str(bench),
        "run_root": str(tmp_path), "run_name": "t", "interactive": False})
    runs = notebook.train_all(p)
    assert json.loads((tmp_path / "t" / "runs.json").read_text()) == {k: str(v) for k, v in runs.items()}
    table = notebook.metrics_table(runs).set_index("method")
    single = json.loads((runs["single_task-s42"] / "metrics.json").read_text())["single_task"]
    matrix = pd.read_csv(runs["seq_lora-s42"] / "scores_matrix.csv", index_col=0)
    expected = sum(matrix.iloc[i, i] - single[t] for i, t in enumerate(["sst-2", "agnews"])) / 2
    assert table.loc["seq_lora", "FWT"] == pytest.approx(expected)
    assert pd.isna(table.loc["mtl", "BWT"]) and table.loc["mtl", "OP"] >= 0
    figs = notebook.result_figures(runs, metrics=notebook.metrics_table(runs))
    assert {"heatmap_seq_lora", "heatmap_mtl", "heatmap_single_task", "task1_curve",
            "metrics_bars"} <= set(figs)
    names = [t.name for t in figs["task1_curve"].data]
    assert "Multi-task" in names and len(names) == 2  # seq_lora + the mtl line
    traj = notebook.trajectory_figures(runs)
    assert not traj["signals"] and set(traj["forgetting_signal"]) == {"forgetting_signal_agnews"}


# ------------------------------------------------------------------------------- the grid (#14)
STUDY_BENCH = {  # Standard CL order 1's task names, tiny synthetic data
    "dbpedia": (["Company", "Artist", "Athlete"], ["firm", "painter", "runner"]),
    "amazon": (["positive", "negative"], ["good", "bad"]),
    "yahoo": (["Sports", "Health"], ["match", "doctor"]),
    "agnews": (["World", "Sports", "Business"], ["war", "goal", "stock"]),
}
STUDY_METHODS = ["seq_lora", "replay", "aimmerging", "recurrent_kif"]


@pytest.fixture(scope="module")
def study_smoke(tmp_path_factory):
    """The ``study`` preset's smoke path (tiny model) with two seeds, once for the module:
    (output dir, fig dir, results dir)."""
    from aimm.data.synthetic import make_synthetic_benchmark

    root = tmp_path_factory.mktemp("nb-study")
    bench = make_synthetic_benchmark(root / "bench", tasks=STUDY_BENCH, n_train=16, n_test=4)
    out = reproduce("study", smoke=True, run_root=root / "runs", fig_dir=root / "Fig",
                    data_dir=bench, results_dir=root / "results", seeds=[1, 2], progress=False,
                    log_output=False)
    return out, root / "Fig", root / "results"


def _outputs_text(nb_path: Path) -> str:
    parts = []
    for c in _cells(nb_path):
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            parts.append(o.get("text", ""))
            parts.extend(str(v) for v in o.get("data", {}).values())
            assert o.output_type != "error", f"{nb_path.name}: {o.get('evalue')}"
    return "".join(parts)


@pytest.mark.slow
def test_study_smoke_runs_the_grid_of_two_seeds_as_aimm_study_lays_it_out(study_smoke):
    from aimm.study import read_runs_csv

    out, _, _ = study_smoke
    table = read_runs_csv(out)
    assert list(zip(table["method"], table["seed"])) == [(m, s) for m in STUDY_METHODS
                                                          for s in (1, 2)]
    assert set(table["order"]) == {"1"}
    for row in table.itertuples():
        assert row.path.resolve() == (out / f"{row.method}-o1-s{row.seed}").resolve()
        metrics = json.loads((row.path / "metrics.json").read_text())
        assert metrics["complete"] and metrics["stages_done"] == 4
    assert set(json.loads((out / "runs.json").read_text())) == set(
        f"{m}-o1-s{s}" for m in STUDY_METHODS for s in (1, 2))
    for name in NOTEBOOKS:  # no error in any notebook; the seeds were injected
        _outputs_text(out / "notebooks" / name)


@pytest.mark.slow
def test_study_smoke_summary_has_two_runs_per_method_and_their_mean(study_smoke):
    out, _, _ = study_smoke
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert list(summary.index) == STUDY_METHODS and (summary["n"] == 2).all()
    for method in STUDY_METHODS:
        ops = [json.loads((out / f"{method}-o1-s{s}" / "metrics.json").read_text())["OP"]
               for s in (1, 2)]
        row = summary.loc[method]
        assert row["OP_mean"] == pytest.approx(sum(ops) / 2)
        assert row["OP_std"] == pytest.approx(abs(ops[0] - ops[1]) / 2 ** 0.5)
        if ops[0] != ops[1]:
            assert row["OP_ci95_low"] < row["OP_mean"] < row["OP_ci95_high"]
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["method"]) == set(STUDY_METHODS) - {"seq_lora"}
    assert (paired["reference"] == "seq_lora").all() and (paired["n"] == 2).all()
    assert summary.loc["aimmerging", "merges_mean"] >= 3  # merges in every task
    text = _outputs_text(out / "notebooks" / "04_metrics.ipynb")
    assert "Study summary" in text and "Paired differences" in text


@pytest.mark.slow
def test_study_smoke_overlays_one_trace_per_seed_from_each_runs_trajectory(study_smoke):
    out, _, _ = study_smoke
    figs = notebook.seed_figures(out)
    tasks = list(STUDY_BENCH)[1:]
    assert set(figs["seed_signals"]) == {f"study_signals_{t}" for t in tasks}
    assert set(figs["seed_interval"]) == {f"study_interval_{t}" for t in tasks}
    for k, task in enumerate(tasks, start=2):
        fig = figs["seed_signals"][f"study_signals_{task}"]
        forgetting = {t.meta["seed"]: t for t in fig.data if t.meta["series"] == "forgetting"}
        assert set(forgetting) == {"seed 1", "seed 2"}
        for seed in (1, 2):
            steps = pd.read_csv(out / f"aimmerging-o1-s{seed}" / "stages" / f"0{k}_{task}" / "steps.csv")
            ok = steps["forgetting_signal"].notna()
            assert list(forgetting[f"seed {seed}"].y) == pytest.approx(list(steps.loc[ok, "forgetting_signal"]))
        interval = figs["seed_interval"][f"study_interval_{task}"]
        assert sorted(t.meta["seed"] for t in interval.data) == ["seed 1", "seed 2"]


@pytest.mark.slow
def test_study_smoke_controller_report_counts_each_seeds_merges(study_smoke):
    out, _, _ = study_smoke
    table = pd.read_csv(out / "controller.csv")
    assert list(zip(table["seed"], table["task"])) == [
        (f"seed {s}", t) for s in (1, 2) for t in list(STUDY_BENCH)[1:]]
    for row in table.itertuples():
        k = list(STUDY_BENCH).index(row.task) + 1
        merges = pd.read_csv(out / f"aimmerging-o1-{row.seed.replace('seed ', 's')}" / "stages"
                             / f"0{k}_{row.task}" / "merges.csv")
        assert row.merges == len(merges) >= 1
        assert row.merges == sum(getattr(row, c) for c in table.columns if c.startswith("merges_"))
        # the preset's S0: a preset's own method options win over the smoke defaults (S0 2)
        s0 = PRESETS["study"]["method_options"]["aimmerging"]["initial_interval"]
        assert str(row.intervals).split("->")[0] == str(s0)
        assert row.max_signal_ratio > 0


@pytest.mark.slow
def test_study_smoke_results_folder_holds_tables_figures_and_the_command(study_smoke):
    out, fig_dir, results = study_smoke
    names = {p.name for p in results.iterdir()}
    tasks = list(STUDY_BENCH)[1:]
    expected = {"summary.csv", "summary.md", "paired.csv", "controller.csv", "controller.md",
                "metrics.csv", "command.txt", "study_metrics_ci.html", "study_task1_curve.html"}
    expected |= {f"study_{kind}_{t}.html" for kind in ("signals", "interval") for t in tasks}
    assert expected <= names, expected - names
    assert not list(results.rglob("config.json"))  # never a run directory
    assert (results / "summary.csv").read_text() == (out / "summary.csv").read_text()
    command = (results / "command.txt").read_text()
    assert "command: aimm reproduce --preset study" in command and "--smoke" in command
    assert "wall time: " in command and "torch==" in command and "transformers==" in command
    params = json.loads(command.split("parameters: ", 1)[1])
    assert params["seeds"] == [1, 2] and params["orders"] == [1]
    # the HTML figures load plotly.js from its CDN (version-pinned, sha256 integrity): each is
    # the notebook's export with the inline bundle swapped for that one tag
    from plotly.offline import get_plotlyjs

    from aimm.evidence import plotlyjs_cdn_tag, share_plotlyjs

    tag = plotlyjs_cdn_tag()
    assert 'src="https://cdn.plot.ly/plotly-' in tag and 'integrity="sha256-' in tag
    for name in sorted(n for n in names if n.endswith(".html")):
        text = (results / name).read_text()
        assert len(text) < 1_000_000 and text.count(tag) == 1, name
        assert text == share_plotlyjs((fig_dir / name).read_text(), get_plotlyjs(), tag), name


def test_share_plotlyjs_replaces_only_an_inline_bundle():
    from aimm.evidence import share_plotlyjs

    bundle = "/* js */ var Plotly = 1;"
    html = f"<html><head><script>x=1</script><script>{bundle}</script></head><body>b</body></html>"
    tag = '<script src="cdn.js"></script>'
    assert share_plotlyjs(html, bundle, tag) == (
        '<html><head><script>x=1</script><script src="cdn.js"></script></head><body>b</body></html>')
    assert share_plotlyjs("<html><script src='cdn'></script></html>", bundle, tag) is None  # not inline
    assert share_plotlyjs(f"<p>{bundle}</p>", bundle, tag) is None  # not a script element
    assert share_plotlyjs(f"<script>y;{bundle}</script>", bundle, tag) is None  # more than the bundle


def test_orders_grid_names_runs_as_study_cells_and_validates(tmp_path):
    p = notebook.validate_parameters({"methods": ["seq_lora", "aimmerging"], "orders": [1, 2],
                                      "seeds": [3], "run_root": str(tmp_path), "run_name": "g"})
    cfgs = notebook.configs(p)
    assert [c.run_id for c in cfgs] == ["seq_lora-o1-s3", "seq_lora-o2-s3", "aimmerging-o1-s3",
                                        "aimmerging-o2-s3"]
    assert [c.task_names()[2] for c in cfgs[:2]] == ["yahoo", "agnews"]  # order 1 vs order 2
    for params, message in [({"orders": [1, 1]}, "orders: [1, 1] lists an order twice"),
                            ({"orders": [1], "tasks": ["dbpedia"]}, "orders and tasks: give one"),
                            ({"orders": [9]}, "benchmark standard_cl has orders 1, 2, 3"),
                            ({"orders": "1"}, "orders='1': must be a non-empty list")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            notebook.validate_parameters(params)


def test_study_index_is_read_by_aimm_study_from_another_output_dir(tmp_path):
    from aimm.study import read_runs_csv
    from aimm.study.report import read_settings

    p = notebook.validate_parameters({"methods": ["replay", "aimmerging"], "seeds": [1, 2],
                                      "run_root": str(tmp_path / "runs"), "run_name": "g",
                                      "output_dir": str(tmp_path / "elsewhere")})
    notebook.write_study_index(p, notebook.configs(p))
    table = read_runs_csv(tmp_path / "elsewhere")
    assert [p_.resolve() for p_ in table["path"]] == [
        (tmp_path / "runs" / "g" / f"{m}-s{s}").resolve() for m in ("replay", "aimmerging")
        for s in (1, 2)]
    assert list(table["order"]) == ["1"] * 4
    assert read_settings(tmp_path / "elsewhere")["reference"] == "replay"  # no seq_lora in the grid


@pytest.mark.slow
def test_train_all_skips_a_run_dir_another_process_holds(tmp_path, bench):
    import fcntl

    p = notebook.validate_parameters({
        "benchmark": "long_sequence", "order": None, "tasks": ["sst-2"], "smoke": True,
        "methods": ["seq_lora"], "seeds": [1, 2], "data_dir": str(bench),
        "run_root": str(tmp_path), "run_name": "t", "interactive": False})
    held = tmp_path / "t" / "seq_lora-s1"
    held.mkdir(parents=True)
    with open(held / "run.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running process holds it
        runs = notebook.train_all(p)
    assert list(runs) == ["seq_lora-s2"]
    assert not (held / "config.json").exists()  # untouched
    assert set(json.loads((tmp_path / "t" / "runs.json").read_text())) == {"seq_lora-s2"}
    assert len(pd.read_csv(tmp_path / "t" / "runs.csv")) == 2  # the whole grid is listed


def test_evidence_command_text_names_command_versions_and_wall_time():
    from aimm.evidence import command_text
    from aimm.reproduce import command_line

    cmd = command_line("study", run_root="runs", smoke=False, data_dir=None, results_dir="r x")
    assert cmd == "aimm reproduce --preset study --run-root runs --results-dir 'r x'"
    text = command_text(cmd, 3723.0, 0.0, {"01_data_prep.ipynb": {"seconds": 12.5}},
                        {"seeds": [1, 2, 3]},
                        {"packages": {"torch": "2.13.0", "kaleido": None}, "python": "3.11.7"})
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert lines["command"] == cmd and lines["wall time"] == "3723.0 s (62.0 min)"
    assert lines["packages"] == "torch==2.13.0" and lines["python"] == "3.11.7"
    assert lines["notebooks"] == "01_data_prep.ipynb 12.5 s"
    assert json.loads(lines["parameters"]) == {"seeds": [1, 2, 3]}


def test_evidence_counts_the_runs_own_timers_and_one_run_grids_get_their_figures(tmp_path):
    import time as _time

    from aimm.evidence import command_text, run_timers, write_results

    out = tmp_path / "out"
    runs = {}
    for name, stages in {"a-s1": [(10.0, 2.0, None), (20.0, 3.0, None)],
                         "b-s1": [(10.0, 2.0, "a-s1"), (40.0, 5.0, None)]}.items():
        runs[name] = str(tmp_path / name)
        for k, (train, ev, source) in enumerate(stages):
            stage = tmp_path / name / "stages" / f"0{k + 1}_t{k}"
            stage.mkdir(parents=True)
            info = {"seconds": {"train": train, "probe": 1.0, "rehearsal": 0.0, "eval": ev}}
            if source:
                info["first_stage_from"] = source
            (stage / "stage.json").write_text(json.dumps(info))
    out.mkdir()
    (out / "runs.json").write_text(json.dumps(runs))
    timers = run_timers(out)
    # b's first stage was copied from a's: counted once
    assert timers == {"runs": 2, "stages": 3, "train": 70.0, "probe": 3.0, "rehearsal": 0.0,
                      "eval": 10.0}
    assert run_timers(tmp_path / "nothing") is None
    text = command_text("aimm reproduce", 60.0, 0.0, {}, {}, {}, timers)
    line = dict(x.split(": ", 1) for x in text.splitlines())["run timers"]
    # the train timer holds probe and rehearsal: counted once
    assert line.startswith("2 runs, 3 stages trained: 80.0 s (1.3 min) (train 70.0 s, of which "
                           "probe 3.0 s and rehearsal 0.0 s; eval 10.0 s)")

    figs = tmp_path / "fig"
    figs.mkdir()
    started = _time.time() - 1
    for name in ("metrics_bars.png", "task1_curve.html", "heatmap_a.png"):
        (figs / name).write_text("x")
    written = {p.name for p in write_results(tmp_path / "r1", out, figs, "c", 1.0, started, {}, {})}
    assert {"metrics_bars.png", "task1_curve.html", "command.txt"} <= written
    assert "heatmap_a.png" not in written
    (figs / "study_metrics_ci.png").write_text("x")  # a study: its own figures only
    written = {p.name for p in write_results(tmp_path / "r2", out, figs, "c", 1.0, started, {}, {})}
    assert "study_metrics_ci.png" in written and "metrics_bars.png" not in written


def test_study_preset_is_the_issue_14_cpu_study():
    import math

    study = preset_parameters("study")
    assert study["benchmark"] == "standard_cl" and study["orders"] == [1]
    assert study["model"] == "smollm2-135m" and study["seeds"] == [1, 2, 3]
    assert study["methods"] == STUDY_METHODS
    assert study["max_test"] == 100 and study["extra"]["eval_mode"] == "label_scoring"
    assert study["extra"]["max_warmup_fraction"] == 0.1
    cfg = next(c for c in notebook.configs(study) if c.method == "aimmerging")
    steps = math.ceil(cfg.max_train * cfg.epochs / cfg.batch_size) // cfg.grad_accum
    assert steps >= 48  # every task after the first has at least 48 inner steps
    assert cfg.method_options == {"fast": True, "initial_interval": 4}  # fast signals, S0 4


def test_catalogue_preset_runs_every_registered_method_at_the_demo_sizes():
    from aimm.methods import METHODS

    demo, catalogue = preset_parameters("demo"), preset_parameters("catalogue")
    assert catalogue["methods"] == list(METHODS) and len(METHODS) >= 19
    for key in ("benchmark", "order", "model", "max_train", "max_test", "epochs", "seeds",
                "method_options"):
        assert catalogue[key] == demo[key], key
    assert catalogue["extra"] == {**demo["extra"], "record_forgetting_signal": False}
    assert RESULTS["catalogue"] == "results/catalogue-cpu"
    for cfg in notebook.configs(catalogue):  # every method validates with these sizes
        assert cfg.max_train == 128 and cfg.eval_mode == "label_scoring"


@pytest.mark.slow
def test_catalogue_smoke_runs_every_method_through_the_notebooks(tmp_path):
    """Every registered method through notebooks 01-04 (tiny model, tiny benchmark, the first two
    tasks of Standard CL order 1, as issue #16's acceptance asks): one run each, complete, and one
    summary row per method with its own train and eval seconds."""
    from aimm.data.synthetic import make_synthetic_benchmark
    from aimm.methods import METHODS

    two = {t: STUDY_BENCH[t] for t in ("dbpedia", "amazon")}
    bench = make_synthetic_benchmark(tmp_path / "bench", tasks=two, n_train=16, n_test=4)
    out = reproduce("catalogue", smoke=True, run_root=tmp_path / "runs", fig_dir=tmp_path / "Fig",
                    data_dir=bench, results_dir=tmp_path / "results", progress=False,
                    log_output=False, fig_formats=["html"], tasks=list(two))
    runs = json.loads((out / "runs.json").read_text())
    assert sorted(runs) == sorted(f"{m}-s42" for m in METHODS)
    for name in runs:
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["complete"], name
        stages = sorted(p.name for p in (out / name / "stages").iterdir())
        assert stages == (["01_all"] if name.startswith("mtl-") else
                          ["01_dbpedia", "02_amazon"]), (name, stages)
    summary = pd.read_csv(tmp_path / "results" / "summary.csv").set_index("method")
    assert sorted(summary.index) == sorted(METHODS) and (summary["n"] == 1).all()
    assert (summary["train_seconds_mean"] > 0).all() and (summary["eval_seconds_mean"] > 0).all()
    for name in NOTEBOOKS:  # no error in any notebook
        _outputs_text(out / "notebooks" / name)


def test_demo_preset_sizes_make_the_controller_act_even_with_forced_merges_only():
    """The demo's and the study's AIMMerging options and sizes, through the real controller, in
    the worst case for the number of merges: a flat forgetting signal (never reaches 2x its mean:
    forced merges only, two intervals apart) and a learning signal that keeps falling (the
    interval grows). Every task after the first still gets five merges and a changed interval."""
    for preset in ("demo", "study"):
        assert_controller_acts_with_forced_merges_only(preset)


def assert_controller_acts_with_forced_merges_only(preset: str) -> None:
    import math

    from aimm.merging import MergeController

    params = preset_parameters(preset)
    cfg = next(c for c in notebook.configs(params) if c.method == "aimmerging")
    assert cfg.eval_mode == "label_scoring"
    steps = math.ceil(cfg.max_train * cfg.epochs / cfg.batch_size) // cfg.grad_accum
    from aimm.methods import build_method

    controller = build_method(cfg).options.make_controller()
    assert isinstance(controller, MergeController)
    for step in range(1, steps + 1):
        if controller.observe(step, 1.0):
            controller.next_interval_after_merge(step, 100.0 / step)  # falling Lambda
    events = controller.events
    assert len(events) >= 5 and all(e.kind == "forced" for e in events)
    assert len({events[0].interval_before, *(e.interval_after for e in events)}) >= 2


def test_reproduce_runs_a_preset_that_names_no_figure_formats(tmp_path, tiny_data):
    """The demo preset leaves ``fig_formats`` to the notebook default; reproduce() must fill it
    (a KeyError here once broke `make demo` before any notebook ran)."""
    from aimm.notebook.params import NotebookParams

    out = reproduce("demo", run_root=tmp_path / "runs", fig_dir=tmp_path / "fig",
                    data_dir=tiny_data, notebooks=(), log_output=False)
    summary = json.loads((out / "reproduce.json").read_text())
    kept = summary["parameters"]["fig_formats"]
    assert "html" in kept and set(kept) | set(summary["skipped_formats"]) == set(
        NotebookParams().fig_formats)
