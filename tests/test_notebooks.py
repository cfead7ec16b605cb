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
from aimm.reproduce import NOTEBOOK_DIR, NOTEBOOKS, PRESETS, preset_parameters, reproduce
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


def test_every_preset_is_valid_and_the_demo_is_small():
    for name in PRESETS:
        preset_parameters(name, data_dir=None)
    demo = preset_parameters("demo")
    assert demo["model"] == "smollm2-135m" and demo["methods"] == ["seq_lora", "aimmerging"]
    assert demo["max_train"] <= 64 and demo["interactive"] is False
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
