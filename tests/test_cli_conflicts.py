"""Contradictory or empty command-line input is refused, not silently dropped: one stderr line
naming the parameter and the fix, exit 2, and nothing written (the project's rule for bad input).

Each case fails before anything trains: restart of a run dir that holds no run, ``--order``
beside a custom task list, ``--model`` / sizes beside a smoke run, ``report --aggregate`` beside
a run dir or ``--verify``, the index of a bad ``tasks`` entry, an empty ``--run-dir`` and a study
folder given as ``--run-dir``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aimm.cli import build_parser, config_values, main
from aimm.config import ConfigError


def _tiny_args(tiny_data: Path, run_dir: Path | str, *extra: str) -> list[str]:
    return ["run", "--model", "tiny-causal", "--benchmark", "long_sequence", "--tasks",
            "sst-2,agnews", "--data-dir", str(tiny_data), "--max-train", "8", "--max-test", "4",
            "--batch-size", "4", "--run-dir", str(run_dir), "--no-progress", "--device", "cpu",
            *extra]


def _tiny_yaml(path: Path, tiny_data: Path, **changes) -> Path:
    """A YAML config of the tiny run (custom ``tasks``), with ``changes``."""
    values = dict(benchmark="long_sequence", tasks=["sst-2", "agnews"], data_dir=str(tiny_data),
                  model="tiny-causal", max_train=8, max_test=4, batch_size=4, max_input_len=64,
                  eval_batch_size=8, progress=False, device="cpu")
    values.update(changes)
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _refused(capsys, argv: list[str]) -> str:
    """Run the CLI: exit 2, nothing on stdout, exactly one stderr line; return it."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert out == ""
    return lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """The test's own working directory (a default ``runs/<id>`` would land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------ 1. --restart-from-stage
def test_restart_from_stage_2_of_a_dir_that_holds_no_run_is_refused(tiny_data, workdir, capsys):
    before = _tree(workdir)
    line = _refused(capsys, _tiny_args(tiny_data, workdir / "nonexist",
                                       "--restart-from-stage", "2"))
    assert line == (f"aimm run: error: --restart-from-stage 2: {workdir / 'nonexist'} holds no "
                    "run; leave it out to start a new run there, or give the --run-dir that "
                    "holds the run")
    assert _tree(workdir) == before  # no run dir, no lock file, no runs/


def test_restart_from_stage_of_an_existing_empty_folder_is_refused_and_leaves_it_empty(
        tiny_data, workdir, capsys):
    (workdir / "empty").mkdir()
    line = _refused(capsys, _tiny_args(tiny_data, workdir / "empty", "--restart-from-stage", "3"))
    assert "--restart-from-stage 3:" in line and "holds no run" in line
    assert list((workdir / "empty").iterdir()) == []


def test_restart_from_stage_1_of_a_new_dir_is_a_new_run(tiny_config, tmp_path):
    """k = 1 means start over: on a dir without a run that is simply a new run (no refusal)."""
    from aimm.integrity import check_restart_target
    from aimm.runs import RunDirError, RunStore
    from aimm.training.engine import Engine

    store = RunStore(tmp_path / "new")
    check_restart_target(store, None)
    check_restart_target(store, 1)
    with pytest.raises(RunDirError, match="--restart-from-stage 2: .* holds no run"):
        check_restart_target(store, 2)
    engine = Engine(tiny_config(run_dir=str(tmp_path / "new")), restart_from_stage=1)
    assert engine._check_resume().completed == []
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ 2. --order beside tasks
def test_order_beside_the_tasks_of_the_config_is_refused(tiny_data, workdir, capsys):
    config = _tiny_yaml(workdir / "ct.yaml", tiny_data)
    before = _tree(workdir)
    line = _refused(capsys, ["run", "--config", str(config), "--order", "5",
                             "--run-dir", str(workdir / "r")])
    assert line == (f"aimm run: error: --order 5 and the tasks of {config}: give one (an order "
                    "number of the benchmark, or a custom task list); leave out --order")
    assert _tree(workdir) == before


def test_an_invalid_order_beside_tasks_is_refused(tiny_data, workdir, capsys):
    before = _tree(workdir)
    line = _refused(capsys, _tiny_args(tiny_data, workdir / "r", "--order", "99"))
    assert line.startswith("aimm run: error: --order 99 and --tasks: give one")
    assert line.endswith("leave out --order or --tasks")
    assert _tree(workdir) == before


def test_an_invalid_order_alone_is_still_refused(tiny_data, workdir, capsys):
    line = _refused(capsys, ["run", "--benchmark", "long_sequence", "--order", "99",
                             "--model", "tiny-causal", "--run-dir", str(workdir / "r")])
    assert "order=99: benchmark long_sequence has orders 4, 5, 6" in line
    assert not (workdir / "r").exists()


def test_study_orders_beside_the_tasks_of_the_config_is_refused(tiny_data, workdir, capsys):
    config = _tiny_yaml(workdir / "ct.yaml", tiny_data)
    line = _refused(capsys, ["study", "--config", str(config), "--methods", "seq_lora",
                             "--seeds", "1", "--orders", "4", "--out", str(workdir / "s")])
    assert line.startswith(f"aimm study: error: --orders 4 and the tasks of {config}: give one")
    assert not (workdir / "s").exists()


def test_a_stored_config_with_its_order_beside_its_tasks_still_runs(tiny_data, tmp_path):
    """Every stored config (config.json, a study's cells/<cell>.yaml) holds ``order`` (default 1)
    beside ``tasks``: only the --order flag counts as a choice, so such a file is accepted."""
    config = _tiny_yaml(tmp_path / "cell.yaml", tiny_data, order=1)
    values, _ = config_values(build_parser().parse_args(["run", "--config", str(config)]))
    assert values["tasks"] == ["sst-2", "agnews"] and values["order"] == 1


# ------------------------------------------------------------------ 3. --smoke
def test_reproduce_smoke_with_a_model_is_refused(workdir, capsys):
    line = _refused(capsys, ["reproduce", "--smoke", "--model", "tiny-causl", "--run-root",
                             str(workdir / "runs"), "--fig-dir", str(workdir / "Fig")])
    assert line == ("aimm reproduce: error: --model tiny-causl: a smoke run (--smoke) trains the "
                    "tiny random model tiny-causal at tiny sizes; leave out --model, or --smoke "
                    "to train tiny-causl")
    assert _tree(workdir) == []


def test_the_smoke_preset_with_a_model_is_refused(workdir, capsys):
    line = _refused(capsys, ["reproduce", "--preset", "smoke", "--model", "smollm2-135m",
                             "--run-root", str(workdir / "runs")])
    assert "--model smollm2-135m: a smoke run (the preset smoke)" in line
    assert _tree(workdir) == []


def test_smoke_parameters_record_the_model_and_sizes_that_run(tmp_path):
    from aimm.reproduce import preset_parameters

    params = preset_parameters("study", run_root=tmp_path, smoke=True)
    assert (params["model"], params["max_train"], params["max_test"], params["epochs"]) == \
        ("tiny-causal", 16, 4, 1)
    assert preset_parameters("study", run_root=tmp_path, smoke=True,
                             model="tiny-causal")["model"] == "tiny-causal"  # the same: fine
    with pytest.raises(ConfigError, match=r"^max_train=500: smoke=True runs max_train 16"):
        preset_parameters("demo", run_root=tmp_path, smoke=True, max_train=500)


@pytest.mark.parametrize("changes, name", [
    ({"max_train": 500}, "max_train=500"),
    ({"max_test": None}, "max_test=None"),
    ({"epochs": 3}, "epochs=3"),
    ({"model": "tiny-seq2seq"}, "model='tiny-seq2seq'"),
])
def test_notebook_smoke_with_a_model_or_size_is_refused(changes, name):
    from aimm.notebook import validate_parameters

    with pytest.raises(ConfigError) as err:
        validate_parameters({"smoke": True, **changes})
    assert str(err.value).splitlines() == [str(err.value)]  # one line
    assert str(err.value).startswith(f"{name}: smoke=True runs ")
    assert str(err.value).endswith("leave " + name.split("=")[0] + " at its default, or set "
                                   "smoke=False")
    validate_parameters({"smoke": False, **changes})  # without smoke the value is fine


# ------------------------------------------------------------------ 4. report --aggregate
@pytest.fixture
def study_folder(tmp_path) -> Path:
    """A study folder with an empty list of runs (``--aggregate`` alone prints empty tables)."""
    folder = tmp_path / "s2"
    folder.mkdir()
    (folder / "runs.csv").write_text("method,seed,order,run_dir\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("extra, named", [
    (["r1", "--verify"], "the run dir r1"),
    (["r1"], "the run dir r1"),
    (["--verify"], "--verify"),
])
def test_report_aggregate_beside_a_run_dir_or_verify_is_refused(study_folder, capsys, extra,
                                                                 named):
    before = _tree(study_folder)
    line = _refused(capsys, ["report", *extra, "--aggregate", str(study_folder)])
    assert line == (f"aimm report: error: --aggregate {study_folder} and {named}: give one "
                    "(--aggregate STUDY_DIR prints a study's tables; a run dir, with or without "
                    "--verify, reports that run)")
    assert _tree(study_folder) == before  # no summary.csv / summary.md / paired.csv


# ------------------------------------------------------------------ 5. tasks[i] in the full list
def test_a_bad_dataset_spec_is_named_by_its_place_in_the_whole_task_list(tiny_data, workdir,
                                                                         capsys):
    config = _tiny_yaml(workdir / "c.yaml", tiny_data, tasks=["sst-2", "agnews", {"name": "foo"}])
    before = _tree(workdir)
    line = _refused(capsys, ["run", "--config", str(config), "--run-dir", str(workdir / "r")])
    assert f"{config}: tasks[2] foo:" in line and "tasks[0]" not in line
    assert _tree(workdir) == before


# ------------------------------------------------------------------ 6. empty --run-dir
@pytest.mark.parametrize("run_dir", ["", "  "])
def test_an_empty_run_dir_is_refused(tiny_data, workdir, capsys, run_dir):
    line = _refused(capsys, _tiny_args(tiny_data, run_dir))
    assert line == (f"aimm run: error: --run-dir {run_dir!r}: an empty path; give a folder, or "
                    "leave it out for runs/<run id>")
    assert _tree(workdir) == []  # no runs/<timestamp>


def test_an_empty_run_dir_in_the_config_is_refused(tiny_data, workdir, capsys):
    config = _tiny_yaml(workdir / "c.yaml", tiny_data, run_dir="")
    line = _refused(capsys, ["run", "--config", str(config)])
    assert line == (f"aimm run: error: {config}: run_dir='': an empty path; give a folder, or "
                    "leave it out (null) for runs/<run id>")
    assert _tree(workdir) == ["c.yaml"]


# ------------------------------------------------------------------ 7. a study folder as run dir
@pytest.mark.parametrize("mark", ["study.json", "runs.csv", "cells/"])
def test_a_study_folder_as_run_dir_is_refused(tiny_data, workdir, capsys, mark):
    folder = workdir / "s"
    folder.mkdir()
    if mark.endswith("/"):
        (folder / mark).mkdir()
    else:
        (folder / mark).write_text("{}\n" if mark.endswith(".json") else "method\n",
                                   encoding="utf-8")
    before = _tree(workdir)
    line = _refused(capsys, _tiny_args(tiny_data, folder))
    assert line == (f"aimm run: error: --run-dir {folder}: a study folder (holds {mark}), not a "
                    "run dir; give a new folder, or re-run its `aimm study` command to resume "
                    "the study")
    assert _tree(workdir) == before  # no config.json, no run.lock
