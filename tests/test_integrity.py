"""Reliability round 2 (issue #11): damaged run dirs, changed data, stale results, data tools.

Every user-caused failure ends in one line naming the file and the fix, exit code 2, with the
last good stage intact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import nan_loss_at

from aimm.cli import main
from aimm.config import ConfigError, RunConfig
from aimm.data import DataError, main_check
from aimm.training.engine import Engine, run
from aimm.integrity import verify_run
from aimm.runs import RunDirError, load_metrics, load_scores_matrix, load_trajectory, load_warnings

VALUES = dict(benchmark="long_sequence", tasks=["sst-2", "agnews"], model="tiny-causal",
              max_train=16, max_test=4, batch_size=4, lr=1e-3, max_input_len=64,
              eval_batch_size=8, memory_batch_size=4, buffer_fraction=0.25, method="aimmerging",
              method_options={"initial_interval": 2}, checkpoint_every=1, progress=False)


def _cfg(data: Path, run_dir: Path, **changes) -> RunConfig:
    return RunConfig.from_dict({**VALUES, "data_dir": str(data), "run_dir": str(run_dir), **changes})


def _args(data: Path, run_dir: Path, *extra: str, tasks: str = "sst-2,agnews") -> list[str]:
    """``aimm run --config <yaml of VALUES> ...extra``."""
    import yaml

    folder = next(p for p in Path(run_dir).parents if p.is_dir())
    path = folder / f"{Path(run_dir).name}.yaml"
    path.write_text(yaml.safe_dump({**VALUES, "tasks": tasks.split(","), "data_dir": str(data),
                                    "run_dir": str(run_dir)}))
    return ["run", "--config", str(path), *extra]




@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """An uninterrupted run, and a copy of the data it read."""
    root = tmp_path_factory.mktemp("integrity")
    data = root / "data"
    shutil.copytree(tiny_data, data)
    run(_cfg(data, root / "reference"))
    return root / "reference", data


@pytest.fixture
def finished(reference, tmp_path):
    """A private copy of the finished reference run (config.json's run_dir is resume-free)."""
    ref, data = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    return run_dir, data


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("aimm ")
    return err


# ------------------------------------------------------------------ 4. data fingerprint
def test_resume_with_changed_data_is_refused_naming_the_file(finished, tmp_path, capsys):
    run_dir, data = finished
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)  # the same data elsewhere: fine
    assert main(_args(moved, run_dir)) == 0
    capsys.readouterr()
    changed = moved / "data_longsequence" / "test" / "agnews_T5.json"
    records = json.loads(changed.read_text())
    records[0]["output"] = "Sports" if records[0]["output"] != "Sports" else "World"
    changed.write_text(json.dumps(records))
    config_before = (run_dir / "config.json").read_bytes()
    assert main(_args(moved, run_dir)) == 2
    err = _one_line_error(capsys)
    assert f"{changed}: the test data of task agnews differs from the data this run trained on" in err
    assert (run_dir / "config.json").read_bytes() == config_before  # the record is kept
    fingerprint = json.loads((run_dir / "data_fingerprint.json").read_text())
    assert set(fingerprint) == {"sst-2", "agnews"} and set(fingerprint["agnews"]) == {"train", "test"}


@pytest.mark.parametrize("fingerprint", [None, "{}", '{"sst-2": "x", "agnews": "x"}',
                                         '{"sst-2": {"train": {"file": "f"}}}'])
def test_a_missing_or_empty_data_fingerprint_does_not_turn_the_data_check_off(
        finished, tmp_path, capsys, fingerprint):
    run_dir, data = finished
    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    path = changed / "data_longsequence" / "train" / "sst-2_T5.json"
    path.write_text(json.dumps(json.loads(path.read_text())[::-1]))  # other training data
    record = run_dir / "data_fingerprint.json"
    if fingerprint is None:
        record.unlink()
    else:
        record.write_text(fingerprint)
    assert main(_args(changed, run_dir)) == 2
    err = _one_line_error(capsys)
    assert str(record) in err and "cannot be checked" in err and "--restart-from-stage 1" in err
    assert main(_args(changed, run_dir, "--restart-from-stage", "1")) == 0  # the way out
    capsys.readouterr()
    assert set(json.loads(record.read_text())) == {"sst-2", "agnews"}


# ------------------------------------------------------------------ integrity: verify + resume
def test_report_verify_checks_every_recorded_sum(finished, capsys):
    run_dir, _ = finished
    assert main(["report", str(run_dir), "--verify"]) == 0
    assert "OK: 2 completed stage(s)" in capsys.readouterr().out
    state = json.loads((run_dir / "state.json").read_text())
    listed = set(state["sha256"])
    on_disk = {p.relative_to(run_dir).as_posix() for p in (run_dir / "stages").rglob("*") if p.is_file()}
    assert on_disk <= listed and {"scores_matrix.csv", "metrics.json", "scores.csv"} <= listed

    pred = run_dir / "stages" / "02_agnews" / "predictions" / "sst-2.jsonl"
    pred.write_text(pred.read_text().replace("\"", "'", 1))  # one character edited
    assert main(["report", str(run_dir), "--verify"]) == 2
    err = capsys.readouterr().err
    assert f"{pred}: sha256 differs from the one recorded when it was written" in err
    assert "--restart-from-stage 2" in err


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_adapter_of_a_completed_stage_offers_a_restart(finished, capsys, damage):
    run_dir, data = finished
    adapter = run_dir / "stages" / "01_sst-2" / "adapter.safetensors"
    raw = adapter.read_bytes()
    if damage == "truncate":
        adapter.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        adapter.write_bytes(raw[:-5] + bytes([raw[-5] ^ 0xFF]) + raw[-4:])
    else:  # both copies gone (one alone is fine: resume reads the other, see test_export)
        adapter.unlink()
        shutil.rmtree(adapter.parent / "adapter")
    stage2 = (run_dir / "stages" / "02_agnews" / "adapter.safetensors").read_bytes()
    assert main(_args(data, run_dir)) == 2
    err = _one_line_error(capsys)
    assert str(adapter) in err and "re-run from stage 1" in err and "--restart-from-stage 1" in err
    assert (run_dir / "stages" / "02_agnews" / "adapter.safetensors").read_bytes() == stage2

    assert main(_args(data, run_dir, "--restart-from-stage", "1")) == 0
    capsys.readouterr()
    assert adapter.read_bytes() == raw  # recomputed, bit for bit (stages reseed)
    assert verify_run(run_dir) == []


def test_restart_from_a_later_stage_keeps_the_earlier_ones(finished, reference):
    run_dir, data = finished
    first = (run_dir / "stages" / "01_sst-2" / "adapter.safetensors").stat().st_mtime_ns
    run(_cfg(data, run_dir), restart_from_stage=2)
    assert (run_dir / "stages" / "01_sst-2" / "adapter.safetensors").stat().st_mtime_ns == first
    assert load_metrics(run_dir) == load_metrics(reference[0])
    with pytest.raises(RunDirError, match="has 2 completed stage\\(s\\); choose 1..3"):
        run(_cfg(data, run_dir), restart_from_stage=4)


def test_a_restart_deletes_nothing_until_every_input_is_checked(finished, tmp_path, capsys):
    """--restart-from-stage used to drop the stages first, so a mistyped data dir, changed data
    or a model that fails to load cost the stages anyway."""
    run_dir, data = finished

    def snapshot():
        return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
                if p.is_file() and p.name != "run.lock"}

    before = snapshot()
    assert main(_args(tmp_path / "no-data", run_dir, "--restart-from-stage", "1")) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(_args(data, run_dir, "--restart-from-stage", "2",
                      "--model", str(tmp_path / "no-model"))) == 2
    _one_line_error(capsys)
    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    train = changed / "data_longsequence" / "train" / "sst-2_T5.json"
    train.write_text(json.dumps(json.loads(train.read_text())[::-1]))
    assert main(_args(changed, run_dir, "--restart-from-stage", "2")) == 2  # stage 1 used it
    assert "differs from the data this run trained on" in _one_line_error(capsys)
    assert snapshot() == before
    assert main(_args(data, run_dir, "--restart-from-stage", "0")) == 2
    assert "--restart-from-stage 0: stages are numbered from 1" in _one_line_error(capsys)
    assert snapshot() == before


def test_a_restart_does_not_follow_a_linked_stages_folder(finished, tmp_path, capsys):
    run_dir, data = finished
    elsewhere = tmp_path / "elsewhere"
    (run_dir / "stages").rename(elsewhere)
    (run_dir / "stages").symlink_to(elsewhere)
    (elsewhere / "02_photos").mkdir()
    (elsewhere / "02_photos" / "a.jpg").write_text("keep")
    assert main(_args(data, run_dir, "--restart-from-stage", "2")) == 2
    err = _one_line_error(capsys)
    assert f"{run_dir / 'stages'}: a link inside the run directory" in err  # RunStore.lock
    assert (elsewhere / "02_photos" / "a.jpg").read_text() == "keep"
    assert (elsewhere / "02_agnews" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("name, text, needle", [
    ("metrics.json", "[1, 2]", "not a run's metrics (a JSON object expected, found a list)"),
    ("warnings.json", "5", "not a run's warnings"),
    ("metrics.json", '{"complete": true, "OP": "x"}', "not a run's metrics (OP='x': a number or null"),
    ("metrics.json", '{"complete": "yes"}', "not a run's metrics (complete='yes': true or false"),
    ("metrics.json", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
    ("state.json", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
    ("scores_matrix.csv", ",sst-2\nsst-2,high\n", "not a scores matrix (a score that is not a number)"),
    ("scores_matrix.csv", "\xff\xfe", "not a scores matrix (UnicodeDecodeError"),
])
def test_wrongly_shaped_result_files_are_one_line(finished, capsys, name, text, needle):
    run_dir, data = finished
    (run_dir / name).write_bytes(text.encode("latin-1"))
    assert main(["report", str(run_dir)] if name != "state.json" else _args(data, run_dir)) == 2
    err = _one_line_error(capsys)
    assert str(run_dir / name) in err and needle in err
    if name != "state.json":  # the run writes its results again
        assert main(_args(data, run_dir)) == 0
        capsys.readouterr()
        assert main(["report", str(run_dir), "--verify"]) == 0


def _drop_last_row(lines: list[str]) -> list[str]:
    return lines[:-1]


def _edit_a_score(lines: list[str]) -> list[str]:
    head, *cells = lines[1].split(",")
    return [lines[0], ",".join([head, "0.123456"] + cells[1:])] + lines[2:]


def _rename_a_column(lines: list[str]) -> list[str]:
    return [lines[0].replace("sst-2", "sst-3")] + lines[1:]


def _repeat_a_row(lines: list[str]) -> list[str]:
    return lines + [lines[1]]


@pytest.mark.parametrize("edit, needle", [
    (_drop_last_row, "no row 'agnews', a stage state.json records as completed"),
    (_edit_a_score, "scores[sst-2][sst-2] is 0.123456, state.json records"),
    (_rename_a_column, "no column 'sst-2', a task state.json records a score for"),
    (_repeat_a_row, "a row or column named twice"),
])
def test_a_scores_matrix_that_disagrees_with_the_state_is_one_line(finished, capsys, edit, needle):
    """A matrix that is still a table of numbers but lost a row or had a score edited used to be
    shown by ``aimm report`` as if the run had written it; only ``--verify`` caught it."""
    run_dir, data = finished
    path = run_dir / "scores_matrix.csv"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    assert main(["report", str(run_dir)]) == 2
    err = _one_line_error(capsys)
    assert str(path) in err and needle in err
    assert main(_args(data, run_dir)) == 0  # the run writes its results again
    capsys.readouterr()
    assert main(["report", str(run_dir), "--verify"]) == 0


@pytest.mark.parametrize("state_text, needle", [
    ('{"completed": "sst-2", "scores": []}', "'completed' must be a list of str values"),
    ("[]", "expected a JSON object, got list"),
    ('{"completed": ["../../x"], "scores": [], "stage_steps": [1]}', "not a stage name"),
    ('{"completed": [], "scores": [{"stage": 0}]}', "a 'scores' row lacks"),
    ('{"completed": ["sst-2"], "scores": [], "stage_steps": [1],'
     ' "sha256": {"../../etc/passwd": "00"}}', "'sha256' must map run-dir-relative file paths"),
    ('{"completed": [', "malformed JSON"),
    ('{"completed": ["sst-2"], "stage_steps": [1], "scores": [{"stage": 0, "after_task": "sst-2",'
     ' "eval_task": "sst-2", "score": "high"}]}', "has score 'high', not a number"),
    ('{"completed": ["sst-2"], "stage_steps": [1], "scores": [{"stage": 0, "after_task": "sst-2",'
     ' "eval_task": ["x"], "score": 0.5}]}', "has eval_task ['x'], not a task name"),
    ('{"completed": ["sst-2"], "stage_steps": [1], "scores": [{"stage": -1, "after_task": "sst-2",'
     ' "eval_task": "sst-2", "score": 0.5}]}', "has stage -1, not a stage index"),
    ('{"completed": ["sst-2"], "stage_steps": [-4], "scores": []}', "'stage_steps' holds a negative"),
])
def test_wrongly_shaped_state_json_is_one_line(finished, capsys, state_text, needle):
    run_dir, data = finished
    (run_dir / "state.json").write_text(state_text)
    assert main(_args(data, run_dir)) == 2
    err = _one_line_error(capsys)
    assert str(run_dir / "state.json") in err and needle in err
    assert main(["report", str(run_dir), "--verify"]) == 2


def test_corrupt_within_stage_checkpoint_is_reported_then_the_stage_restarts(reference, tmp_path):
    ref, data = reference
    cfg = _cfg(data, tmp_path / "run")
    engine = Engine(cfg)
    engine.loss_hook = nan_loss_at(1, 3)  # stage 2 stops at step 3; its checkpoint holds step 2
    with pytest.raises(FloatingPointError, match="step 3: training loss is nan"):
        engine.run()
    ckpt = tmp_path / "run" / "checkpoints" / "stage-02.safetensors"
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) - 100])  # truncated
    run_dir = run(cfg)
    warnings = load_warnings(run_dir)
    assert any(f"{ckpt}: within-stage checkpoint not usable: " in w and "restarts" in w
               for w in warnings)
    # the same result as deleting it by hand: the uninterrupted run's
    assert load_metrics(run_dir) == load_metrics(ref)
    pd.testing.assert_frame_equal(load_scores_matrix(run_dir), load_scores_matrix(ref))
    (s, m), (s_ref, m_ref) = load_trajectory(run_dir), load_trajectory(ref)
    pd.testing.assert_frame_equal(s, s_ref)
    pd.testing.assert_frame_equal(m, m_ref)


def test_a_checkpoint_written_by_this_version_round_trips_exactly(reference, tmp_path):
    """Kill-free check of the no-pickle format: a stop mid-stage, then a resume from the
    checkpoint, ends with the uninterrupted trajectory (the optimiser and RNG states came back)."""
    ref, data = reference
    cfg = _cfg(data, tmp_path / "run")
    engine = Engine(cfg)
    engine.loss_hook = nan_loss_at(1, 3)
    with pytest.raises(FloatingPointError):
        engine.run()
    run_dir = run(cfg)
    assert not any("checkpoint" in w for w in load_warnings(run_dir))
    assert json.loads((run_dir / "stages" / "02_agnews" / "stage.json").read_text())[
        "resumed_within_stage"] == 2
    (s, m), (s_ref, m_ref) = load_trajectory(run_dir), load_trajectory(ref)
    pd.testing.assert_frame_equal(s, s_ref)
    pd.testing.assert_frame_equal(m, m_ref)


# ------------------------------------------------------------------ stale results
def test_results_are_written_as_one_consistent_set(reference, tmp_path, monkeypatch):
    import aimm.metrics

    _, data = reference
    cfg = _cfg(data, tmp_path / "run")

    def broken(*a, **k):
        raise ValueError("metrics failed")

    monkeypatch.setattr(aimm.metrics, "cl_metrics", broken)  # fails once all stages are done
    with pytest.raises(ValueError, match="metrics failed"):
        run(cfg)
    matrix = load_scores_matrix(tmp_path / "run")
    metrics = load_metrics(tmp_path / "run")
    assert metrics["stages_done"] == 1
    assert matrix.loc["agnews"].isna().all()  # the matrix is stage 1's, like metrics.json
    scores = pd.read_csv(tmp_path / "run" / "scores.csv")
    assert set(scores["after_task"]) == {"sst-2"}


# ------------------------------------------------------------------ 1-record task
def _one_record(data: Path, task: str = "agnews") -> Path:
    path = data / "data_longsequence" / "train" / f"{task}_T5.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:1]))
    return path


def test_one_record_train_split_warns_in_check_and_fails_before_training(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    path = _one_record(data)
    assert main_check(data) == 0  # a warning, not an error
    assert f"{path}: task 'agnews' has 1 training record(s)" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert main(_args(data, run_dir)) == 2
    err = _one_line_error(capsys)
    assert f"{path}: task 'agnews' has 1 training record(s); it needs at least 2" in err
    assert not run_dir.exists()  # before training, and nothing left behind


def test_accuracy_task_without_a_label_set_fails_before_training(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    path = data / "data_longsequence" / "train" / "sst-2_T5.json"
    records = json.loads(path.read_text())[:3]
    for i, r in enumerate(records):
        r["output"] = f"label{i}"  # three records, three labels: no label set
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match="task 'sst-2' is scored by accuracy but its 3 training "
                                        "records give no label set"):
        run(_cfg(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_max_train_one_is_the_users_choice_not_a_data_error(tiny_data, tmp_path):
    run_dir = run(_cfg(tiny_data, tmp_path / "run", max_train=1, method="seq_lora",
                       method_options={}, checkpoint_every=0))
    assert load_metrics(run_dir)["complete"]


# ------------------------------------------------------------------ bad input leaves nothing
def test_bad_input_leaves_nothing_behind(tiny_data, tmp_path, capsys):
    new = tmp_path / "runs" / "new"
    assert main(_args(tiny_data, new, tasks="sst-2,nosuchtask")) == 2
    assert "nosuchtask_T5.json: missing train split" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep")
    assert main(_args(tiny_data, existing, "--model", str(tmp_path / "no-model"))) == 2
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


def test_lora_targets_naming_no_module_is_one_line_listing_the_layers(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="lora_targets: 'nonexistent_proj' names no module of "
                                          "tiny-causal; its linear layers: .*q_proj.*v_proj"):
        run(_cfg(tiny_data, tmp_path / "run", lora_targets=["q_proj", "nonexistent_proj"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tasks", ["", "sst-2,,agnews", "sst-2,"])
def test_an_empty_task_name_is_refused_not_dropped(tiny_data, tmp_path, capsys, tasks):
    """``--tasks ""`` used to fall back to the benchmark's order 1 (an error about orders)."""
    assert main(["run", "--model", "tiny-causal", "--benchmark", "long_sequence", "--tasks", tasks,
                 "--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "run")]) == 2
    assert f"--tasks {tasks!r}: an empty task name" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_other_ranks_make_no_run_dir(tiny_data, tmp_path, monkeypatch, capsys):
    """Under ``accelerate launch`` only rank 0 locks, makes the run dir and cleans up on bad
    input; rank 1 writes nothing. It used to make the dir too, and left it (empty) when it was
    refused after rank 0 had removed it, or was stopped by the launcher when rank 0 failed."""
    monkeypatch.setenv("RANK", "1")
    new = tmp_path / "runs" / "new"
    assert main(_args(tiny_data, new, tasks="sst-2,nosuchtask")) == 2
    assert "nosuchtask_T5.json: missing train split" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, value", [("RANK", "one"), ("RANK", "-1"), ("WORLD_SIZE", "2.5"),
                                         ("LOCAL_RANK", "x")])
def test_a_launcher_variable_that_is_no_count_is_one_line(tiny_data, tmp_path, monkeypatch, capsys,
                                                          name, value):
    """``RANK``/``WORLD_SIZE`` are read before an accelerator exists (one reader,
    ``aimm.util.launch_rank``); a value that is not a count was a ``ValueError`` traceback from
    ``int()`` deep in the run-dir lock."""
    monkeypatch.setenv(name, value)
    new = tmp_path / "runs" / "new"
    assert main(_args(tiny_data, new)) == 2
    assert f"environment variable {name}={value!r} is not a process count or rank" \
        in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ aimm data convert
def _raw(root: Path, tasks: dict[str, list[tuple[str, str]]]) -> Path:
    for name, rows in tasks.items():
        folder = root / "SC" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "labels.json").write_text(json.dumps(sorted({lab for _, lab in rows})))
        (folder / "test.json").write_text(json.dumps([{"sentence": s, "label": lab} for s, lab in rows]))
    return root


def test_convert_is_all_or_nothing(tmp_path, monkeypatch, capsys):
    import aimm.data.convert as convert

    raw = _raw(tmp_path / "raw", {"imdb": [("nice", "Good"), ("bad", "Bad")],
                                  "yelp": [("ok", "Good"), ("meh", "Bad")]})
    real, calls = convert.write_text_atomic, []

    def disk_full(path, text):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(convert, "write_text_atomic", disk_full)
    fresh = tmp_path / "out" / "aimm"
    assert main(["data", "convert", str(raw), str(fresh)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing, not half a benchmark

    monkeypatch.setattr(convert, "write_text_atomic", real)
    assert main(["data", "convert", str(raw), str(fresh)]) == 0
    before = {p: p.read_bytes() for p in fresh.rglob("*") if p.is_file()}
    _raw(raw, {"imdb": [("nice", "Good"), ("awful", "Bad")], "yelp": [("fine", "Good"), ("no", "Bad")]})
    calls.clear()
    monkeypatch.setattr(convert, "write_text_atomic", disk_full)
    assert main(["data", "convert", str(raw), str(fresh), "--overwrite"]) == 2
    assert {p: p.read_bytes() for p in fresh.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in fresh.iterdir()) == ["data_longsequence"]  # no temp folders


def test_convert_overwrite_flag(tmp_path, capsys):
    raw = _raw(tmp_path / "raw", {"imdb": [("nice", "Good"), ("bad", "Bad")]})
    dst = tmp_path / "out"
    assert main(["data", "convert", str(raw), str(dst)]) == 0
    target = dst / "data_longsequence" / "test" / "imdb_T5.json"
    target.write_text("[]")
    other = dst / "data_longsequence" / "test" / "kept_T5.json"
    other.write_text("[1]")
    capsys.readouterr()
    assert main(["data", "convert", str(raw), str(dst)]) == 2
    assert f"{target}: exists with different content (pass --overwrite" in capsys.readouterr().err
    assert target.read_text() == "[]"
    assert main(["data", "convert", str(raw), str(dst), "--overwrite"]) == 0
    assert json.loads(target.read_text())[0]["output"] in ("Good", "Bad")
    assert other.read_text() == "[1]"  # files the conversion does not produce stay


# ------------------------------------------------------------------ run files of the wrong type
from aimm.run_shapes import stage_problem, state_problem  # noqa: E402

STATE = {"completed": ["sst-2"], "stage_steps": [4],
         "scores": [{"stage": 0, "after_task": "sst-2", "eval_task": "sst-2", "metric": "accuracy",
                     "score": 0.5, "n": 4, "split": "test"}]}


@pytest.mark.parametrize("change, needle", [
    ({"eval_task": ["x"]}, "eval_task ['x'], not a task name"),
    ({"eval_task": "../x"}, "eval_task '../x', not a task name"),
    ({"metric": 3}, "metric 3, not a metric name"),
    ({"stage": "0"}, "stage '0', not a stage index"),
    ({"stage": True}, "stage True, not a stage index"),
    ({"n": -1}, "n -1, not a count"),
    ({"n": 1.5}, "n 1.5, not a count"),
])
def test_state_problem_checks_every_field_of_a_score_row(change, needle):
    assert state_problem(STATE) is None
    row = {**STATE["scores"][0], **change}
    assert needle in state_problem({**STATE, "scores": [row]})
    assert "negative" in state_problem({**STATE, "stage_steps": [-1]})


def test_stage_problem_accepts_what_a_run_writes(reference):
    ref, _ = reference
    for k, name in enumerate(["sst-2", "agnews"]):
        info = json.loads((ref / "stages" / f"{k + 1:02d}_{name}" / "stage.json").read_text())
        assert stage_problem(info, name) is None
        assert stage_problem({**info, "first_stage_from": "other-run"}, name) is None
    assert stage_problem({"seconds": {"train": 1.0, "eval": 0.5}}) is None  # older / hand-made


@pytest.mark.parametrize("info, needle", [
    ([1], "a JSON object expected, found a list"),
    ({"name": ["sst-2"]}, "name=['sst-2']: a stage name expected"),
    ({"name": "rte"}, "name='rte', but the folder holds stage 'sst-2'"),
    ({"merges": -1}, "merges=-1: a count"),
    ({"inner_steps": True}, "inner_steps=True: a count"),
    ({"train_tasks": "sst-2"}, "train_tasks: a list of task names"),
    ({"seconds": [1]}, "seconds: a mapping of timer name to seconds"),
    ({"seconds": {"train": "1"}}, "seconds: a mapping of timer name to seconds"),
    ({"seconds": {"train": float("nan")}}, "seconds: a mapping of timer name to seconds"),
    ({"first_stage_from": 3}, "first_stage_from=3: a run name expected"),
])
def test_stage_problem_names_the_wrong_field(info, needle):
    assert needle in stage_problem(info, "sst-2")


@pytest.mark.parametrize("text", ["[1, 2]", '"seq_lora"', "3"])
def test_a_config_json_that_is_not_an_object_is_one_line(finished, tmp_path, capsys, text):
    """A list used to be a ``TypeError`` traceback on resume and on --first-stage-from."""
    from aimm.runs import load_config

    run_dir, data = finished
    path = run_dir / "config.json"
    path.write_text(text)
    metrics = (run_dir / "metrics.json").read_bytes()
    assert main(_args(data, run_dir)) == 2
    err = _one_line_error(capsys)
    assert f"{path}: not a run config (a JSON object expected" in err and "remove the run" in err
    assert (run_dir / "metrics.json").read_bytes() == metrics and path.read_text() == text
    with pytest.raises(RunDirError, match="not a run config"):
        load_config(run_dir)
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 2  # was two lines, no file named
    assert f"{path}: not a run config" in _one_line_error(capsys)
    new = tmp_path / "new"
    with pytest.raises(RunDirError, match=f"first_stage_from {run_dir}: .*{path}: not a run config"):
        run(_cfg(data, new, method="replay", method_options={}), first_stage_from=run_dir)
    assert not new.exists()


def test_a_config_json_with_a_field_under_both_names_names_the_file(finished):
    from aimm.runs import load_config

    run_dir, _ = finished
    config = json.loads((run_dir / "config.json").read_text())
    config["probe_history"] = config["record_forgetting_signal"]
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"^{run_dir / 'config.json'}: probe_history is the old name"):
        load_config(run_dir)


def test_report_does_not_trip_over_a_score_row_that_is_no_task(finished, capsys):
    """``eval_task: ["x"]`` was a ``TypeError`` in ``aimm report`` while ``--verify`` said OK."""
    run_dir, _ = finished
    state = json.loads((run_dir / "state.json").read_text())
    state["scores"][0]["eval_task"] = ["x"]
    (run_dir / "state.json").write_text(json.dumps(state))
    assert main(["report", str(run_dir), "--verify"]) == 2
    assert "has eval_task ['x'], not a task name" in _one_line_error(capsys)
    assert main(["report", str(run_dir)]) == 0  # the matrix and metrics, as written
    assert "scores[j][i]" in capsys.readouterr().out


def test_an_orphan_stage_folder_is_left_to_the_stage_that_redoes_it(finished, capsys):
    """A stage folder past the completed ones (``stages/03_rte``, even with a stage.json that is
    no stage record) used to stop the resume with ``KeyError: 'name'``."""
    run_dir, data = finished
    orphan = run_dir / "stages" / "03_rte"
    shutil.copytree(run_dir / "stages" / "02_agnews", orphan)
    (orphan / "stage.json").write_text('{"x": 1}')
    assert main(_args(data, run_dir)) == 0
    capsys.readouterr()
    assert set(load_metrics(run_dir)["merges_per_stage"]) == {"sst-2", "agnews"}
    (orphan / "stage.json").write_text("[1]")
    assert main(_args(data, run_dir)) == 0
    capsys.readouterr()
    assert main(["report", str(run_dir), "--verify"]) == 0


def test_a_malformed_stage_json_of_a_completed_stage_is_one_line(finished, capsys):
    """Without sums in state.json (an older run) a stage.json holding a list was an
    ``AttributeError`` on resume."""
    run_dir, data = finished
    state = json.loads((run_dir / "state.json").read_text())
    del state["sha256"]
    (run_dir / "state.json").write_text(json.dumps(state))
    path = run_dir / "stages" / "01_sst-2" / "stage.json"
    path.write_text("[1]")
    kept = [*(run_dir / "stages").rglob("*.*"), *(run_dir / n for n in ("metrics.json", "scores.csv",
                                                                      "scores_matrix.csv"))]
    before = {p: p.read_bytes() for p in kept if p.is_file()}
    assert main(_args(data, run_dir)) == 2
    err = _one_line_error(capsys)
    assert f"{path}: not a stage record (a JSON object expected, found a list)" in err
    assert "--restart-from-stage 1" in err
    assert {p: p.read_bytes() for p in before} == before  # stages and results as they were


def test_a_shared_first_stage_needs_a_whole_stage_json(finished, tmp_path):
    from aimm.methods import build_method
    from aimm.training.shared_stage import share_problem

    run_dir, data = finished
    config = json.loads((run_dir / "config.json").read_text())
    config.update(method="seq_lora", method_options={})  # replay's first stage is seq_lora's
    (run_dir / "config.json").write_text(json.dumps(config))
    cfg = _cfg(data, tmp_path / "new", method="replay", method_options={})
    assert share_problem(run_dir, cfg, build_method(cfg)) is None
    state = json.loads((run_dir / "state.json").read_text())
    del state["sha256"]  # (with sums, the edit is a sha256 mismatch)
    (run_dir / "state.json").write_text(json.dumps(state))
    path = run_dir / "stages" / "01_sst-2" / "stage.json"
    path.write_text('["x"]')
    assert share_problem(run_dir, cfg, build_method(cfg)) == (
        f"{path}: not a stage record (a JSON object expected, found a list)")


# ------------------------------------------------------------------ study files of the wrong type
def _tiny_study(root: Path) -> Path:
    """A study folder of one complete two-stage run (only the files the aggregation reads)."""
    run_dir = root / "runs" / "a"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"method": "seq_lora"}))
    (run_dir / "scores_matrix.csv").write_text("after_task,t1,t2\nt1,0.8,\nt2,0.5,0.6\n")
    (run_dir / "metrics.json").write_text(json.dumps(
        {"method": "seq_lora", "complete": True, "stages_done": 2, "OP": 0.55, "BWT": -0.3,
         "forgetting": 0.3}))
    for k, name in enumerate(["t1", "t2"]):
        stage = run_dir / "stages" / f"{k + 1:02d}_{name}"
        stage.mkdir(parents=True)
        (stage / "stage.json").write_text(json.dumps({"name": name,
                                                      "seconds": {"train": 2.0, "eval": 1.0}}))
    (root / "runs.csv").write_text("method,seed,order,run_dir\nseq_lora,1,1,runs/a\n")
    return root


def test_aggregate_reads_the_completed_stages_only_and_names_a_malformed_one(tmp_path, capsys):
    study = _tiny_study(tmp_path)
    orphan = study / "runs" / "a" / "stages" / "03_t3"
    orphan.mkdir()
    (orphan / "stage.json").write_text("[1]")  # past stages_done: not read
    assert main(["report", "--aggregate", str(study)]) == 0
    capsys.readouterr()
    summary = pd.read_csv(study / "summary.csv")
    assert summary["n"].tolist() == [1] and summary["train_seconds_mean"].tolist() == [4.0]
    path = study / "runs" / "a" / "stages" / "02_t2" / "stage.json"
    path.write_text(json.dumps({"name": "t2", "seconds": [1]}))
    assert main(["report", "--aggregate", str(study)]) == 0  # the run is left out, and noted
    out = capsys.readouterr().out
    assert (f"runs/a: unreadable: {path}: not a stage record (seconds: a mapping of timer name "
            "to seconds") in out and "--restart-from-stage 2" in out
    assert pd.read_csv(study / "summary.csv").empty


@pytest.mark.parametrize("text, needle", [
    ("[1]", "not a study's settings (a JSON object expected, found a list)"),
    ('{"reference": ["seq_lora"]}', "not a study's settings (reference=['seq_lora']: a method name"),
    ("{", "malformed JSON"),
])
def test_a_wrongly_shaped_study_json_is_one_line(tmp_path, capsys, text, needle):
    study = _tiny_study(tmp_path)
    (study / "study.json").write_text(text)
    assert main(["report", "--aggregate", str(study)]) == 2
    err = _one_line_error(capsys)
    assert str(study / "study.json") in err and needle in err
    assert not (study / "summary.md").exists()


@pytest.mark.parametrize("rows, needle", [
    ("seq_lora,1,1,\n", "row 1: run_dir='', a run directory expected"),
    ("seq_lora,abc,1,runs/a\n", "row 1: seed='abc', an integer >= 0 expected"),
    ("seq_lora,-1,1,runs/a\n", "row 1: seed='-1', an integer >= 0 expected"),
    ("seq_lora,1,,runs/a\n", "row 1: order='', an order number or 'custom' expected"),
    (",1,1,runs/a\n", "row 1: method='', a method name expected"),
    ("seq_lora,1,1,runs/a\nseq_lora,2,x,runs/a\n", "row 2: order='x', an order number"),
    ("seq_lora,42,1,r1,x,y\n", "ParserWarning"),
    ("seq_lora,1,1,runs/a\nseq_lora,2,1,runs/a,x\n", "ParserError"),
    ('"unterminated\n', "ParserError"),
])
def test_a_wrongly_shaped_runs_csv_is_one_line(tmp_path, capsys, rows, needle):
    study = _tiny_study(tmp_path)
    path = study / "runs.csv"
    path.write_text("method,seed,order,run_dir\n" + rows)
    assert main(["report", "--aggregate", str(study)]) == 2
    err = _one_line_error(capsys)
    assert f"{path}: not a study's list of runs (" in err and needle in err
    assert not (study / "summary.md").exists()


@pytest.mark.parametrize("raw, needle", [(b"\xff\xfe garbage", "UnicodeDecodeError"),
                                         (b"", "EmptyDataError"),
                                         (b"method,seed\nseq_lora,1\n", "missing column(s) order")])
def test_a_runs_csv_that_is_no_table_is_one_line(tmp_path, capsys, raw, needle):
    study = _tiny_study(tmp_path)
    path = study / "runs.csv"
    path.write_bytes(raw)
    assert main(["report", "--aggregate", str(study)]) == 2
    err = _one_line_error(capsys)
    assert f"{path}: not a study's list of runs (" in err and needle in err


def test_run_timers_name_a_malformed_stage_json_and_skip_orphans(finished, tmp_path):
    """``aimm reproduce``'s command.txt sums the runs' stage timers; a stage.json holding a list
    was an ``AttributeError`` there, after the tables had been copied."""
    from aimm.evidence import run_timers, write_results

    run_dir, _ = finished
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.json").write_text(json.dumps({"a": str(run_dir)}))
    orphan = run_dir / "stages" / "03_rte"
    orphan.mkdir()
    (orphan / "stage.json").write_text("[1]")  # not completed: not read
    assert run_timers(out)["stages"] == 2
    path = run_dir / "stages" / "02_agnews" / "stage.json"
    path.write_text("[1]")
    with pytest.raises(RunDirError, match=f"^{path}: not a stage record .*--restart-from-stage 2"):
        run_timers(out)
    results = tmp_path / "results"
    (out / "summary.csv").write_text("x\n")
    with pytest.raises(RunDirError, match="not a stage record"):
        write_results(results, out, tmp_path / "fig", "aimm reproduce", 1.0, 0.0, {}, {})
    assert not results.exists()  # stopped before anything was copied
    (out / "runs.json").write_text("[1]")
    with pytest.raises(RunDirError, match=f"^{out / 'runs.json'}: not a list of runs"):
        run_timers(out)
