"""A new run's first stage copied from a finished run that trained the same stage
(aimm.training.shared_stage): the copied run must end exactly as the run trained from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aimm.methods import METHODS
from aimm.reproduce import PRESETS

SHARING = sorted(name for name, cls in METHODS.items() if cls.first_stage_as)


def tiny(tiny_data: Path, run_dir: Path, method: str, **changes):
    from aimm.config import RunConfig

    values = dict(benchmark="long_sequence", tasks=["sst-2", "agnews"], data_dir=str(tiny_data),
                  model="tiny-causal", max_train=16, max_test=4, batch_size=4, epochs=1, lr=1e-3,
                  max_input_len=64, eval_batch_size=8, memory_batch_size=4, buffer_fraction=0.25,
                  eval_mode="label_scoring", run_dir=str(run_dir), progress=False, seed=3,
                  method=method, method_options=dict(METHODS[method].smoke_options))
    values.update(changes)
    return RunConfig.from_dict(values)


@pytest.fixture(scope="module")
def seq_lora_run(tiny_data, tmp_path_factory) -> Path:
    from aimm.training.engine import run

    return run(tiny(tiny_data, tmp_path_factory.mktemp("source") / "seq_lora", "seq_lora"))


def stage_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of the stage folders and the result set, but the timers and PEFT's config
    (whose target-module list PEFT writes in set order)."""
    out = {}
    for path in sorted(run_dir.glob("stages/*/**/*")):
        if path.is_file() and path.name not in ("stage.json", "adapter_config.json"):
            out[path.relative_to(run_dir).as_posix()] = path.read_bytes()
    for name in ("scores.csv", "scores_matrix.csv", "metrics.json"):
        out[name] = (run_dir / name).read_bytes()
    return out


def test_the_study_s_methods_train_their_first_stage_as_seq_lora():
    # the CPU study's time budget (issue #15) counts on these copies
    for method in PRESETS["study"]["methods"]:
        assert method == "seq_lora" or METHODS[method].first_stage_as == "seq_lora", method


@pytest.mark.parametrize("method", SHARING)
def test_a_copied_first_stage_ends_as_the_run_trained_from_scratch(method, seq_lora_run, tiny_data,
                                                                  tmp_path):
    from aimm.training.engine import run

    assert METHODS[method].first_stage_as == "seq_lora"
    scratch = run(tiny(tiny_data, tmp_path / "scratch", method))
    shared = run(tiny(tiny_data, tmp_path / "shared", method), first_stage_from=seq_lora_run)
    first = sorted((shared / "stages").iterdir())[0]
    assert json.loads((first / "stage.json").read_text())["first_stage_from"] == seq_lora_run.name
    assert "first_stage_from" not in json.loads(
        sorted((shared / "stages").iterdir())[1].joinpath("stage.json").read_text())
    expected, got = stage_files(scratch), stage_files(shared)
    assert sorted(got) == sorted(expected)
    differ = [name for name in expected if got[name] != expected[name]]
    assert not differ, f"{method}: differs from the run trained from scratch: {differ}"
    assert json.loads((shared / "metrics.json").read_text())["complete"] is True


def test_share_problem_names_why_a_stage_cannot_be_copied(seq_lora_run, tiny_data, tmp_path):
    from aimm.methods import build_method
    from aimm.training.shared_stage import share_problem

    def problem(method: str, source=seq_lora_run, **changes):
        cfg = tiny(tiny_data, tmp_path / method, method, **changes)
        return share_problem(source, cfg, build_method(cfg))

    assert problem("replay") is None
    assert problem("aimmerging", method_options={"initial_interval": 4}) is None
    assert "does not train its first stage as another method" in problem("ewc")
    assert "(lr)" in problem("replay", lr=1e-4)
    assert "(max_train, seed)" in problem("replay", max_train=8, seed=4)
    assert "holds no run" in problem("replay", source=tmp_path / "nothing")
    replay = tmp_path / "replay-run"
    from aimm.training.engine import run

    run(tiny(tiny_data, replay, "replay"))
    assert "is a 'replay' run" in problem("aimmerging", source=replay)


def test_a_damaged_source_is_refused_and_a_bad_request_leaves_nothing(seq_lora_run, tiny_data,
                                                                     tmp_path, capsys):
    import shutil

    from aimm.cli import main
    from aimm.methods import build_method
    from aimm.training.shared_stage import share_problem

    source = tmp_path / "source"
    shutil.copytree(seq_lora_run, source)
    adapter = sorted((source / "stages").iterdir())[0] / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0xFF
    adapter.write_bytes(bytes(data))
    cfg = tiny(tiny_data, tmp_path / "target", "replay")
    assert "adapter.safetensors" in share_problem(source, cfg, build_method(cfg))

    # the command line: one line naming the flag and the fix, exit 2, no run dir left behind
    config = tmp_path / "replay.yaml"
    import yaml

    config.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "run_id"}))
    code = main(["run", "--config", str(config), "--first-stage-from", str(source)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("aimm run: error: first_stage_from ") and "leave it out" in err[0]
    assert not (tmp_path / "target").exists()


def test_a_source_without_its_data_fingerprint_is_refused(seq_lora_run, tiny_data, tmp_path):
    """The copied stage's data is checked against the source's fingerprint; without one the new
    run could not check it (and its resume would refuse it)."""
    import shutil

    from aimm.methods import build_method
    from aimm.training.shared_stage import share_problem

    source = tmp_path / "source"
    shutil.copytree(seq_lora_run, source)
    (source / "data_fingerprint.json").unlink()
    cfg = tiny(tiny_data, tmp_path / "target", "replay")
    assert share_problem(source, cfg, build_method(cfg)) == (
        f"{source} has no data_fingerprint.json (the data its first stage was trained on)")


def test_a_run_dir_that_holds_a_run_resumes_it_and_ignores_the_source(seq_lora_run, tiny_data,
                                                                      tmp_path):
    from aimm.training.engine import run

    from aimm.training.shared_stage import first_stage_source

    cfg = tiny(tiny_data, tmp_path / "replay", "replay")
    assert first_stage_source(cfg, [seq_lora_run]) == seq_lora_run
    run(cfg)
    assert first_stage_source(cfg, [seq_lora_run]) is None  # it resumes: nothing to copy
    before = stage_files(tmp_path / "replay")
    run(cfg, first_stage_from=seq_lora_run)
    assert stage_files(tmp_path / "replay") == before
    first = sorted((tmp_path / "replay" / "stages").iterdir())[0]
    assert "first_stage_from" not in json.loads((first / "stage.json").read_text())


@pytest.mark.parametrize("share", [True, False])
def test_notebook_training_copies_the_first_stage_unless_told_not_to(share, tiny_data, tmp_path,
                                                                     capsys):
    from aimm.notebook.training import train_all

    params = dict(benchmark="long_sequence", order=None, tasks=["sst-2", "agnews"],
                  methods=["seq_lora", "replay"], model="tiny-causal", max_test=4,
                  seeds=[5], run_root=str(tmp_path), run_name="grid", data_dir=str(tiny_data),
                  smoke=True, interactive=False, share_first_stage=share)
    runs = train_all(params)
    first = sorted((runs["replay-s5"] / "stages").iterdir())[0]
    copied = json.loads((first / "stage.json").read_text()).get("first_stage_from")
    assert copied == ("seq_lora-s5" if share else None)
    assert ("replay-s5: first stage copied from seq_lora-s5" in capsys.readouterr().out) is share


def test_the_catalogue_times_every_method_on_its_own():
    assert PRESETS["catalogue"]["share_first_stage"] is False
    assert PRESETS["study"].get("share_first_stage", True) is True


def test_several_processes_do_not_copy_a_first_stage(seq_lora_run, tiny_data, tmp_path, monkeypatch):
    from aimm.errors import RunDirError
    from aimm.training.engine import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunDirError, match="copied by one process only"):
        run(tiny(tiny_data, tmp_path / "replay", "replay"), first_stage_from=seq_lora_run)
    assert not (tmp_path / "replay").exists()
