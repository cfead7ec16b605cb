"""aimm study: statistics, aggregation of hand-made run dirs, the CLI, a tiny grid killed and
resumed, failed / in-use cells, and the study figures."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from aimm.cli import main
from aimm.metrics import cl_metrics
from aimm.plots import is_no_data, method_ci_bars, seed_interval_figure, seed_signals_figure
from aimm.study import aggregate, estimate, paired_difference, read_results, t_quantile
from aimm.study.stats import t_cdf

# Student-t 0.975 quantiles from published tables (df: value)
T975 = {1: 12.7062047, 2: 4.30265273, 3: 3.18244631, 4: 2.77644511, 5: 2.57058184,
        9: 2.26215716, 29: 2.04522964, 100: 1.98397152}
NAN = float("nan")


# ------------------------------------------------------------------ pure statistics
@pytest.mark.parametrize("df, expected", sorted(T975.items()))
def test_t_quantile_matches_published_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-7)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-7)


def test_t_cdf_closed_forms():
    assert t_cdf(0.0, 7) == 0.5
    assert t_cdf(2.0, 1) == pytest.approx(0.5 + math.atan(2.0) / math.pi, abs=1e-12)  # Cauchy
    assert t_cdf(1.0, 2) == pytest.approx(0.5 + 1.0 / (2 * math.sqrt(3.0)), abs=1e-12)
    assert t_quantile(0.995, 5) == pytest.approx(4.03214298, abs=1e-7)


def test_estimate_mean_sample_std_and_t_interval():
    e = estimate([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(5 / 3)
    half = T975[3] * std / 2
    assert (e.n, e.mean) == (4, 2.5)
    assert e.std == pytest.approx(std, rel=1e-12)
    assert (e.ci_low, e.ci_high) == (pytest.approx(2.5 - half, rel=1e-8), pytest.approx(2.5 + half, rel=1e-8))
    one = estimate([0.7, None, NAN])  # non-finite values are dropped
    assert one.n == 1 and one.mean == 0.7 and all(math.isnan(v) for v in (one.std, one.ci_low, one.ci_high))
    assert estimate([]).n == 0 and math.isnan(estimate([]).mean)


def test_paired_difference_counts_wins_by_direction():
    d = paired_difference([0.5, 0.4, 0.3, None], [0.4, 0.4, 0.5, 0.1])
    assert d.estimate.n == 3 and d.estimate.mean == pytest.approx((0.1 + 0.0 - 0.2) / 3)
    assert (d.wins, d.losses) == (1, 1)  # the tie counts as neither
    f = paired_difference([0.1, 0.3], [0.2, 0.2], higher_is_better=False)  # forgetting: lower wins
    assert (f.wins, f.losses) == (1, 1)
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0], [1.0, 2.0])


# ------------------------------------------------------------------ hand-made study folder
TASKS = ["t1", "t2"]


def write_run(root: Path, name: str, method: str, matrix: list[list[float]], *, train: float = 1.0,
              merge_kinds: dict[str, int] | None = None, complete: bool = True) -> str:
    """A run directory as the engine writes it (only the files the aggregation reads)."""
    run = root / "runs" / name
    stages = ["t1", "t2"]
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": method, "tasks": TASKS}))
    pd.DataFrame(matrix, index=pd.Index(stages, name="after_task"), columns=TASKS).to_csv(
        run / "scores_matrix.csv")
    if method == "single_task":
        metrics = {"OP": (matrix[0][0] + matrix[1][1]) / 2,
                   "single_task": {"t1": matrix[0][0], "t2": matrix[1][1]}}
    else:
        metrics = cl_metrics(matrix)
    metrics.update(method=method, complete=complete, stages_done=2 if complete else 1)
    (run / "metrics.json").write_text(json.dumps(metrics))
    for k, stage in enumerate(stages):
        d = run / "stages" / f"{k + 1:02d}_{stage}"
        d.mkdir(parents=True)
        (d / "stage.json").write_text(json.dumps({"name": stage, "seconds": {"train": train, "eval": 0.5}}))
        kinds = (merge_kinds or {}) if k == 1 else {}
        rows = [{"task": stage, "step": i + 1, "kind": kind}
                for kind, n in kinds.items() for i in range(n)]
        (d / "merges.csv").write_text(pd.DataFrame(rows).to_csv(index=False) if rows else "")
    return f"runs/{name}"


@pytest.fixture
def hand_study(tmp_path):
    """seq_lora, aimmerging, single_task x seeds 1-3 x orders 1-2, with known numbers."""
    rows = []

    def add(method, seed, order, matrix, **kw):
        rel = write_run(tmp_path, f"{method}-o{order}-s{seed}", method, matrix, **kw)
        rows.append({"method": method, "seed": seed, "order": order, "run_dir": rel})

    for order in (1, 2):
        for s in (1, 2, 3):
            b_seq = 0.2 + 0.1 * s if order == 1 else 0.5
            b_aim = 0.3 + 0.15 * s if order == 1 else 0.1 + 0.2 * s
            add("seq_lora", s, order, [[0.8, NAN], [b_seq, 0.6]], train=s)
            add("aimmerging", s, order, [[0.8, NAN], [b_aim, 0.6]], train=2 * s,
                merge_kinds={"forced": 1, "planned": s})
            add("single_task", s, order, [[0.7 - 0.05 * s, NAN], [NAN, 0.5]])
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    return tmp_path


def row(summary, method, order):
    sel = summary[(summary["method"] == method) & (summary["order"] == order)]
    assert len(sel) == 1, f"{method}/{order}: {len(sel)} rows"
    return sel.iloc[0]


def test_summary_mean_std_t_interval_and_the_all_row(hand_study):
    agg = aggregate(read_results(hand_study), "seq_lora")
    s = agg.summary
    assert list(s.columns[:3]) == ["method", "order", "n"]
    assert [(m, o) for m, o in zip(s["method"], s["order"])] == [
        (m, o) for m in ("seq_lora", "aimmerging", "single_task") for o in ("1", "2", "all")]
    # seq_lora order 1: OP = (0.2 + 0.1 s + 0.6) / 2 = 0.45, 0.5, 0.55
    r = row(s, "seq_lora", "1")
    half = T975[2] * 0.05 / math.sqrt(3)
    assert r["n"] == 3
    assert r["OP_mean"] == pytest.approx(0.5) and r["OP_std"] == pytest.approx(0.05)
    assert r["OP_ci95_low"] == pytest.approx(0.5 - half) and r["OP_ci95_high"] == pytest.approx(0.5 + half)
    assert r["BWT_mean"] == pytest.approx(-0.4) and r["forgetting_mean"] == pytest.approx(0.4)
    # FWT against the single_task run of the same seed and order: ((0.8 - (0.7 - 0.05 s)) + 0.1) / 2
    assert r["FWT_mean"] == pytest.approx(np.mean([0.1 + 0.025 * s for s in (1, 2, 3)]))
    assert r["train_seconds_mean"] == pytest.approx(4.0) and r["eval_seconds_mean"] == pytest.approx(1.0)
    assert math.isnan(r["merges_mean"])
    # the all row: every seed x order
    a = row(s, "seq_lora", "all")
    op_all = [0.45, 0.5, 0.55, 0.55, 0.55, 0.55]
    assert a["n"] == 6 and a["OP_mean"] == pytest.approx(np.mean(op_all))
    assert a["OP_std"] == pytest.approx(np.std(op_all, ddof=1))
    assert a["OP_ci95_high"] - a["OP_mean"] == pytest.approx(T975[5] * np.std(op_all, ddof=1) / math.sqrt(6))
    # merges by kind, for the merging method only
    m = row(s, "aimmerging", "all")
    assert (m["merges_mean"], m["merges_forced_mean"], m["merges_planned_mean"]) == (3.0, 1.0, 2.0)
    # a declared kind that never happened is a 0, not a missing column; no column for a kind no
    # method of the grid has (Recurrent-KIF's "fixed")
    assert m["merges_early_mean"] == 0.0 and "merges_fixed_mean" not in m
    # single_task: OP only (no BWT / FWT of its own)
    st = row(s, "single_task", "1")
    assert not math.isnan(st["OP_mean"]) and math.isnan(st["BWT_mean"]) and math.isnan(st["FWT_mean"])


def test_merge_kind_columns_come_from_each_method_s_declared_kinds(tmp_path):
    from aimm.study.aggregate import runs_table

    rows = []
    for method, kinds in (("aimmerging", {"forced": 2, "planned": 3}), ("recurrent_kif", {"fixed": 6}),
                          ("seq_lora", None)):
        rel = write_run(tmp_path, f"{method}-s1", method, [[0.8, NAN], [0.5, 0.6]], merge_kinds=kinds)
        rows.append({"method": method, "seed": 1, "order": 1, "run_dir": rel})
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    table = runs_table(read_results(tmp_path)).set_index("method")
    kinds = ["merges_early", "merges_fixed", "merges_forced", "merges_planned"]
    assert [c for c in table.columns if c.startswith("merges_")] == kinds
    got = table[kinds].astype(object).where(table[kinds].notna(), None)
    assert got.loc["aimmerging"].tolist() == [0.0, None, 2.0, 3.0]  # early 0: declared, none happened
    assert got.loc["recurrent_kif"].tolist() == [None, 6.0, None, None]
    assert got.loc["seq_lora"].tolist() == [None] * 4 and math.isnan(table.loc["seq_lora", "merges"])
    assert table.loc["aimmerging", "merges"] == 5 and table.loc["recurrent_kif", "merges"] == 6


def test_paired_differences_against_the_reference(hand_study):
    p = aggregate(read_results(hand_study), "seq_lora").paired
    assert list(p.columns) == ["method", "reference", "metric", "n", "diff_mean", "diff_ci95_low",
                               "diff_ci95_high", "wins", "losses"]
    op = p[(p["method"] == "aimmerging") & (p["metric"] == "OP")].iloc[0]
    # order 1: diff = 0.075, 0.1, 0.125; order 2: diff = -0.1, 0, +0.1
    diffs = [0.05 + 0.025 * s for s in (1, 2, 3)] + [-0.1, 0.0, 0.1]
    assert op["reference"] == "seq_lora" and op["n"] == 6
    assert op["diff_mean"] == pytest.approx(np.mean(diffs))
    half = T975[5] * np.std(diffs, ddof=1) / math.sqrt(6)
    assert op["diff_ci95_low"] == pytest.approx(np.mean(diffs) - half)
    assert (op["wins"], op["losses"]) == (4, 1)
    forg = p[(p["method"] == "aimmerging") & (p["metric"] == "forgetting")].iloc[0]
    assert (forg["wins"], forg["losses"]) == (4, 1)  # less forgetting is a win
    assert set(p["method"]) == {"aimmerging", "single_task"}
    assert set(p[p["method"] == "single_task"]["metric"]) == {"OP"}


def test_fwt_only_with_single_task_and_incomplete_runs_are_noted(hand_study):
    table = pd.read_csv(hand_study / "runs.csv")
    table = table[table["method"] != "single_task"]
    write_run(hand_study, "seq_lora-o1-s4", "seq_lora", [[0.8, NAN], [0.1, 0.6]], complete=False)
    table.loc[len(table) + 100] = ["seq_lora", 4, 1, "runs/seq_lora-o1-s4"]
    table.to_csv(hand_study / "runs.csv", index=False)
    agg = aggregate(read_results(hand_study), "seq_lora")
    assert not any(c.startswith("FWT") for c in agg.summary.columns)
    assert not (agg.paired["metric"] == "FWT").any()
    assert row(agg.summary, "seq_lora", "1")["n"] == 3
    assert any("seq_lora-o1-s4: incomplete (1 stages done)" in n for n in agg.notes)


def test_report_aggregate_prints_and_writes_the_tables(hand_study, capsys):
    assert main(["report", "--aggregate", str(hand_study)]) == 0
    out = capsys.readouterr().out
    assert "| seq_lora | all | 6 | 0.525 ± " in out and "Paired differences" in out
    summary = pd.read_csv(hand_study / "summary.csv", dtype={"order": str})
    assert row(summary, "aimmerging", "all")["merges_mean"] == 3.0
    assert pd.read_csv(hand_study / "paired.csv").shape[0] > 0
    assert (hand_study / "summary.md").read_text() == out


def test_report_aggregate_on_a_folder_that_is_no_study(tmp_path, capsys):
    assert main(["report", "--aggregate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs.csv missing" in err[0]


# ------------------------------------------------------------------ CLI input checks
@pytest.mark.parametrize("argv, needle", [
    (["--methods", "seq_lora,aimmergin", "--seeds", "1"], "did you mean 'aimmerging'"),
    (["--methods", "seq_lora", "--seeds", "1,x"], "--seeds: 'x' is not an integer"),
    (["--methods", "seq_lora", "--seeds", "1,1"], "--seeds: 1 given more than once"),
    (["--methods", "seq_lora", "--seeds", "1,01"], "--seeds: 1 given more than once (as 1, 01)"),
    (["--methods", "seq_lora", "--seeds", "1", "--orders", "4,04"],
     "--orders: 4 given more than once (as 4, 04)"),
    (["--methods", "ties", "--seeds", "1", "-o", "density=5"],
     "method_options: density=5: must be a number in [0.0, 1.0]"),
    (["--methods", "ties", "--seeds", "1", "-o", "density=abc"], "density='abc': must be a number"),
    (["--methods", "seq_lora", "--seeds", "1", "--orders", "1", "--tasks", "a,b"], "give one"),
    (["--methods", "seq_lora", "--seeds", "1", "-o", "initial_interval=2"], "no method of the grid"),
    (["--methods", "replay", "--seeds", "1", "--reference", "seq_lora"], "--reference seq_lora"),
    (["--methods", "seq_lora", "--seeds", "1", "--orders", "9"], "order=9"),
    (["--methods", "seq_lora", "--seeds", "1", "--data-dir", "/nonexistent/aimm"], "does not exist"),
    (["--methods", "seq_lora", "--seeds", "1", "--benchmark", "long_sequence", "--tasks", "sst-2,nosuch"],
     "no train split for task 'nosuch'"),
])
def test_bad_study_input_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, argv, needle,
                                                               tiny_data):
    out = tmp_path / "study"
    if "--data-dir" not in argv:
        argv = [*argv, "--data-dir", str(tiny_data)]
    assert main(["study", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every folder (None) and file (its bytes) under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def test_parse_ints_finds_duplicates_by_value():
    from aimm.config import ConfigError
    from aimm.study import parse_ints

    assert parse_ints("3, 1,2", "--seeds") == [3, 1, 2]
    with pytest.raises(ConfigError, match=r"^--orders: 2 given more than once \(as 2, 002\)$"):
        parse_ints("2,1,002", "--orders")


@pytest.mark.parametrize("files", [("config.json", "state.json"), ("config.json",)])
def test_study_out_that_is_a_run_directory_is_refused_and_left_alone(tmp_path, capsys, tiny_data,
                                                                     files):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in files:
        (run_dir / name).write_text('{"method": "seq_lora"}')
    before = snapshot(run_dir)
    argv = ["study", "--methods", "seq_lora", "--seeds", "1", "--benchmark", "long_sequence",
            "--tasks", "sst-2,agnews", "--data-dir", str(tiny_data), "--out", str(run_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {run_dir}: a run directory (it holds {files[0]}" in err[0], err
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------ a tiny grid
@pytest.fixture
def tiny_study_config(tiny_data, tmp_path):
    values = dict(benchmark="long_sequence", tasks=["sst-2", "agnews"], data_dir=str(tiny_data),
                  model="tiny-causal", max_train=16, max_test=4, batch_size=4, lr=1e-3,
                  max_input_len=64, eval_batch_size=8, memory_batch_size=4, buffer_fraction=0.25,
                  eval_mode="label_scoring")
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def study_argv(config: Path, out: Path, methods: str = "seq_lora,aimmerging", seeds: str = "1,2"):
    options = ["-o", "initial_interval=2"] if "aimmerging" in methods else []
    return ["study", "--config", str(config), "--methods", methods, "--seeds", seeds, *options,
            "--out", str(out)]


@pytest.fixture
def made_study(tiny_study_config, tmp_path):
    """A study folder of seq_lora seeds 1, 2 as ``aimm study`` leaves it (written by hand, no
    training): s1 finished, s2 unfinished with its cell yaml; returns (folder, its cells)."""
    from aimm.config import RunConfig
    from aimm.study import plan_cells
    from aimm.study.grid import write_runs_csv
    from aimm.study.report import write_settings

    out = tmp_path / "study"
    cells = plan_cells(RunConfig.from_yaml(tiny_study_config).to_dict(), ["seq_lora"], [1, 2],
                       None, out)
    for cell in cells:
        cell.run_dir.mkdir(parents=True)
        (cell.run_dir / "config.json").write_text(json.dumps(cell.config.to_dict()))
        (cell.run_dir / "state.json").write_text('{"completed": [], "scores": []}')
    (cells[0].run_dir / "metrics.json").write_text('{"complete": true, "method": "seq_lora"}')
    (out / "cells").mkdir()
    (out / "cells" / f"{cells[1].name}.yaml").write_text(yaml.safe_dump(cells[1].config.to_dict()))
    write_runs_csv(cells, out)
    write_settings(out, {"methods": ["seq_lora"], "seeds": [1, 2], "reference": "seq_lora"})
    (out / "summary.csv").write_text("method,order,n\nseq_lora,custom,1\n")
    return out, cells


@pytest.mark.parametrize("seeds, cell", [("1,2", "seq_lora-custom-s1"), ("2", "seq_lora-custom-s2")])
def test_study_rerun_with_other_settings_is_refused_before_anything_is_written(
        made_study, tiny_study_config, capsys, seeds, cell):
    from aimm.study import check_study_folder

    out, cells = made_study
    check_study_folder(cells, out)  # the same settings pass (they resume)
    before = snapshot(out)
    argv = study_argv(tiny_study_config, out, methods="seq_lora", seeds=seeds)
    assert main([*argv, "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"study folder {out}: cell {cell} holds a run with a different config (lr: 0.001 -> " \
           "0.01); use another --out, or the same settings" in err[0], err
    assert snapshot(out) == before  # runs.csv, study.json, summaries, cell yaml: all unchanged


def test_run_cell_refuses_an_unfinished_run_with_another_config_without_writing(made_study):
    import dataclasses

    from aimm.study.runner import FAILED, run_cell

    out, cells = made_study
    before = snapshot(out)
    cell = cells[1]
    changed = dataclasses.replace(cell, config=dataclasses.replace(cell.config, lr=0.01))
    outcome = run_cell(changed, out)
    assert outcome.status == FAILED and "different config (lr: 0.001 -> 0.01)" in outcome.reason
    assert snapshot(out) == before  # no cell yaml rewritten, no log, nothing started


def comparable(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary without wall-clock columns (those differ between any two runs)."""
    return summary.drop(columns=[c for c in summary.columns if "seconds" in c])


def test_tiny_grid_killed_and_resumed_matches_an_uninterrupted_grid(tiny_study_config, tmp_path,
                                                                     capsys):
    from aimm.config import RunConfig
    from aimm.training.engine import run
    from aimm.study import plan_cells
    from aimm.study.grid import write_runs_csv

    # reference: the same cells, uninterrupted, in this process
    ref = tmp_path / "reference"
    base = RunConfig.from_yaml(tiny_study_config).to_dict()
    cells = plan_cells({**base, "method_options": {"initial_interval": 2}},
                       ["seq_lora", "aimmerging"], [1, 2], None, ref)
    for cell in cells:
        run(cell.config)
    write_runs_csv(cells, ref)
    expected = aggregate(read_results(ref), "seq_lora")

    # the study, killed (with its running cell) during the third cell
    out = tmp_path / "study"
    argv = [sys.executable, "-m", "aimm.cli", *study_argv(tiny_study_config, out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    third = out / "runs" / "aimmerging-custom-s1" / "state.json"
    deadline = time.monotonic() + 240
    while not third.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the study ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the killed cell's process may still be on its way out (its run-dir lock is released by the
    # kernel when it has exited): a user re-running at once would see the cell "in use"
    from aimm.study.runner import in_use

    cell_dir = out / "runs" / "aimmerging-custom-s1"
    deadline = time.monotonic() + 60
    while in_use(cell_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not in_use(cell_dir), "the killed cell still holds its lock after 60 s"
    runs = sorted((out / "runs").iterdir())
    done = {p.name: json.loads((p / "metrics.json").read_text()).get("complete", False)
            if (p / "metrics.json").is_file() else False for p in runs}
    assert done["seq_lora-custom-s1"] and done["seq_lora-custom-s2"]
    assert not all(done.values()) or len(done) < 4
    first_metrics = out / "runs" / "seq_lora-custom-s1" / "metrics.json"
    stamp = first_metrics.stat().st_mtime_ns

    # re-running the same command resumes: finished cells are only read
    code = main(study_argv(tiny_study_config, out))
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert "cell seq_lora-custom-s1: done" in printed
    assert "cell aimmerging-custom-s2: ran" in printed
    # a new cell copied its first stage from the finished seq_lora cell of its seed, and the
    # summary below still equals the grid trained from scratch
    s2_first = sorted((out / "runs" / "aimmerging-custom-s2" / "stages").iterdir())[0]
    assert json.loads((s2_first / "stage.json").read_text())["first_stage_from"] == "seq_lora-custom-s2"
    assert "--first-stage-from" in (out / "cells" / "aimmerging-custom-s2.log").read_text()
    assert first_metrics.stat().st_mtime_ns == stamp
    got = pd.read_csv(out / "summary.csv", dtype={"order": str})
    pd.testing.assert_frame_equal(comparable(got), comparable(expected.summary), check_dtype=False)
    paired = pd.read_csv(out / "paired.csv")
    pd.testing.assert_frame_equal(paired, expected.paired, check_dtype=False)
    assert list(pd.read_csv(out / "runs.csv").columns) == ["method", "seed", "order", "run_dir"]
    assert "merges_mean" in got.columns and got["merges_mean"].notna().sum() == 1

    # the same folder with another setting: refused as a whole, nothing started or rewritten
    before = snapshot(out)
    assert main([*study_argv(tiny_study_config, out), "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cell seq_lora-custom-s1 holds a run with a different config " \
        "(lr: 0.001 -> 0.01); use another --out" in err[0], err
    assert snapshot(out) == before


def test_failed_and_in_use_cells_do_not_stop_the_others(tiny_study_config, tmp_path, capsys):
    out = tmp_path / "study"
    locked = out / "runs" / "seq_lora-custom-s1"
    locked.mkdir(parents=True)
    (out / "runs" / "seq_lora-custom-s2").write_text("a file where the run dir should be")
    with open(locked / "run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(study_argv(tiny_study_config, out, methods="seq_lora", seeds="1,2,3"))
    assert code == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("cell seq_lora-custom-s1: in use (") for ln in lines)
    failed = [ln for ln in lines if ln.startswith("cell seq_lora-custom-s2: failed (exit 2: ")]
    assert failed and "not writable" in failed[0] and "log: " in failed[0]
    assert Path(failed[0].split("log: ")[1]).is_file()
    assert "cell seq_lora-custom-s3: ran" in lines
    summary = pd.read_csv(out / "summary.csv", dtype={"order": str})
    assert summary[["method", "order", "n"]].values.tolist() == [["seq_lora", "custom", 1]]
    assert len(pd.read_csv(out / "runs.csv")) == 3


# ------------------------------------------------------------------ figures
def test_method_bars_carry_the_95_percent_intervals(hand_study):
    summary = aggregate(read_results(hand_study), "seq_lora").summary
    fig = method_ci_bars(summary)
    bars = {tr.meta["method"]: tr for tr in fig.data}
    assert set(bars) == {"seq_lora", "aimmerging", "single_task"}
    seq = bars["seq_lora"]
    a = row(summary, "seq_lora", "all")
    assert list(seq.x) == ["OP", "BWT", "FWT", "Forgetting"] and seq.meta["n"] == 6
    assert seq.error_y.visible is True
    assert seq.error_y.array[0] == pytest.approx(a["OP_ci95_high"] - a["OP_mean"])
    assert seq.error_y.arrayminus[0] == pytest.approx(a["OP_mean"] - a["OP_ci95_low"])
    one = method_ci_bars(summary.assign(**{c: NAN for c in summary.columns if "ci95" in c}), order="1")
    assert all(tr.error_y.visible is False for tr in one.data)  # n < 2: no error bars
    assert is_no_data(method_ci_bars(pd.DataFrame()))


def seed_run(seed: int, task: str = "amazon"):
    rng = np.random.default_rng(seed)
    steps = pd.DataFrame({"task": task, "step": range(1, 21),
                          "forgetting_signal": 1 + rng.normal(0, 0.01, 20), "threshold": 2.0,
                          "interval": [4] * 8 + [8 + seed] * 12})
    merges = pd.DataFrame({"task": task, "step": [4, 8, 16 + seed], "lambda": [0.3, 0.2, 0.1],
                           "interval_before": [4, 4, 8 + seed], "interval_after": [4, 8 + seed, 8 + seed],
                           "kind": ["forced", "planned", "early"]})
    return steps, merges


def test_seed_overlays_one_trace_per_seed():
    runs = {f"seed {s}": seed_run(s) for s in (1, 2, 3)}
    interval = seed_interval_figure(runs, "amazon")
    assert [tr.meta["seed"] for tr in interval.data] == ["seed 1", "seed 2", "seed 3"]
    assert list(interval.data[2].y)[-1] == 11
    assert len({tr.line.color for tr in interval.data}) == 3
    signals = seed_signals_figure(runs, "amazon")
    for series in ("forgetting", "learning", "threshold"):
        assert [tr.meta["seed"] for tr in signals.data if tr.meta["series"] == series] == list(runs)
    assert all(tr.yaxis == "y2" for tr in signals.data if tr.meta["series"] == "learning")
    assert is_no_data(seed_interval_figure(runs, "no-such-task"))
    assert is_no_data(seed_signals_figure({}, "amazon"))


def test_controller_table_per_seed_and_task():
    from aimm.study import controller_table

    runs = {f"seed {s}": seed_run(s) for s in (1, 2)}
    steps, merges = runs["seed 2"]
    runs["seed 2"] = (steps.assign(threshold=[np.nan] * 10 + [0.5] * 10), merges)
    table = controller_table(runs)
    assert table[["seed", "task", "merges", "merges_early", "merges_forced", "merges_planned"]
                 ].values.tolist() == [["seed 1", "amazon", 3, 1, 1, 1], ["seed 2", "amazon", 3, 1, 1, 1]]
    assert table["intervals"].tolist() == ["4->9", "4->10"]
    h1, h2 = runs["seed 1"][0]["forgetting_signal"], steps["forgetting_signal"]
    assert table["max_signal_ratio"].tolist() == pytest.approx([h1.max() / 2.0, h2[10:].max() / 0.5])


def test_controller_table_lists_every_kind_the_method_declares_even_when_none_happened():
    from aimm.methods import METHODS
    from aimm.study import controller_table

    steps, merges = seed_run(1)
    merges = merges[merges["kind"] != "early"]
    table = controller_table({"seed 1": (steps, merges)}, kinds=METHODS["aimmerging"].merge_kinds)
    assert table["merges_early"].tolist() == [0]
    assert table["merges"].tolist() == [len(merges)]
    assert {"merges_forced", "merges_planned"} <= set(table.columns)


def test_a_cell_with_a_wrongly_shaped_metrics_file_runs_again_and_is_reported(tmp_path):
    """``metrics.json`` holding a list used to stop the study and its aggregate (AttributeError)."""
    from aimm.study.aggregate import read_run
    from aimm.study.runner import is_complete

    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "metrics.json").write_text("[1, 2]")
    assert is_complete(cell) is False  # the runner runs it again (and the run rewrites it)
    result = read_run(cell, "seq_lora", 1, "1", str(cell))
    assert not result.complete and "not a run's metrics" in result.problem
