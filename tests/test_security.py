"""Reliability round 2 (issue #11), attacks of a careless or hostile user: pickled checkpoints,
path traversal through names, two processes on one run dir, mistyped and non-finite settings."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from conftest import nan_loss_at
import torch
import yaml

from aimm.checkpoint import CheckpointError, load_checkpoint
from aimm.cli import main
from aimm.config import ConfigError, RunConfig
from aimm.training.engine import Engine, run
from aimm.runs import RunDirError, RunStore, load_metrics, load_warnings

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AIMM_CRASH_AT", None)
    return subprocess.run([sys.executable, "-m", "aimm.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **popen)


def _tiny_args(tiny_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["run", "--model", "tiny-causal", "--benchmark", "long_sequence", "--tasks",
            "sst-2,agnews", "--data-dir", str(tiny_data), "--max-train", "8", "--max-test", "4",
            "--batch-size", "4", "--run-dir", str(run_dir), "--no-progress", *extra]


# ------------------------------------------------------------------ 1. no pickle on resume
class _Plant:
    """Unpickling this runs ``os.mkdir(marker)``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))




def test_crafted_pickle_checkpoint_is_never_executed_on_resume(tiny_config, tmp_path):
    # the attack is real: the old loader (torch.load, weights_only=False) runs it
    probe, probe_marker = tmp_path / "probe.pt", tmp_path / "executed-by-old-loader"
    torch.save({"stage": 1, "x": _Plant(probe_marker)}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.is_dir()

    cfg = tiny_config(method="seq_lora", checkpoint_every=1)
    engine = Engine(cfg)
    engine.loss_hook = nan_loss_at(1, 3)  # stage 2 stops at step 3: its checkpoint holds step 2
    with pytest.raises(FloatingPointError):
        engine.run()
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    real = ckpt_dir / "stage-02.safetensors"
    assert real.is_file()
    marker = tmp_path / "executed"
    for path in (real, ckpt_dir / "stage-02.pt"):  # in place of the real one, and beside it
        torch.save({"stage": 1, "step": 2, "x": _Plant(marker)}, path)
    with pytest.raises(CheckpointError, match="not usable"):
        load_checkpoint(real)
    run_dir = run(cfg)  # resumes: the checkpoint is reported, ignored, the stage restarts
    assert not marker.exists()
    assert load_metrics(run_dir)["complete"]
    assert any("stage-02.safetensors: within-stage checkpoint not usable" in w
               for w in load_warnings(run_dir))
    (ckpt_dir / "stage-02.safetensors").unlink(missing_ok=True)
    assert load_checkpoint(ckpt_dir / "stage-02.safetensors", on_problem=lambda m: None) is None
    assert not marker.exists()


def test_no_unsafe_loader_anywhere_in_the_package():
    """The audit of issue #11, kept: no pickle, no torch.load, no yaml.load, no eval/exec."""
    pattern = re.compile(r"\btorch\.load\(|import (c?pickle|dill|marshal|shelve)\b|pickle\.loads?\(|"
                         r"\byaml\.load\(|\byaml\.unsafe_load|numpy\.load\(|np\.load\(|"
                         r"(?<![.\w])eval\(|(?<![.\w])exec\(|weights_only\s*=\s*False")
    hits = []
    for folder in ("aimm", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line.split("#")[0]):
                    hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == []


# ------------------------------------------------------------------ 2. names never escape
@pytest.mark.parametrize("changes, needle", [
    ({"tasks": ["sst-2", "../../../x"]}, "tasks[1]='../../../x': not a valid name"),
    ({"tasks": ["sst-2", ".."]}, "tasks[1]='..': not a valid name"),
    ({"tasks": ["/etc/passwd"]}, "tasks[0]='/etc/passwd': not a valid name"),
    ({"tasks": ["sst-2", "a\\b c"]}, "not a valid name"),
    ({"run_id": "../escape", "run_dir": None}, "run_id='../escape': not a valid name"),
    ({"run_id": "."}, "run_id='.': not a valid name"),
])
def test_names_that_would_leave_their_folder_are_refused(tiny_config, changes, needle):
    with pytest.raises(ConfigError) as err:
        tiny_config(**changes)
    assert needle in str(err.value)


def test_hostile_task_name_on_the_command_line_creates_nothing(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "r"
    code = main(_tiny_args(tiny_data, run_dir)[:6] + ["dbpedia,../../../x"]
                + _tiny_args(tiny_data, run_dir)[7:])
    err = capsys.readouterr().err
    assert code == 2
    assert "tasks[1]='../../../x': not a valid name" in err
    assert not (tmp_path / "runs").exists()


def test_run_dir_whose_name_is_not_a_name_is_refused_before_anything_is_written(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="its last folder name becomes the run id"):
        Engine(tiny_config(run_dir=str(tmp_path / "my run")))
    assert not (tmp_path / "my run").exists()


def test_stage_names_and_figure_names_are_one_path_component(tmp_path):
    import plotly.graph_objects as go

    from aimm.plots import export_figures

    with pytest.raises(ValueError, match="stage name='../x': not a valid name"):
        RunStore(tmp_path).stage_dir(0, "../x")
    with pytest.raises(ValueError, match="figure name='../../evil': not a valid name"):
        export_figures({"../../evil": go.Figure()}, tmp_path / "fig", formats=["html"])
    assert not list(tmp_path.rglob("*.html")) and not (tmp_path.parent / "evil.html").exists()


def test_preset_and_notebook_run_names_cannot_traverse(tmp_path, capsys):
    from aimm.reproduce import preset_parameters
    from aimm.notebook import validate_parameters

    with pytest.raises(ConfigError, match="unknown preset '../../x'"):
        preset_parameters("../../x", run_root=tmp_path / "r")
    assert main(["reproduce", "--preset", "../../x", "--run-root", str(tmp_path / "r")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    for bad in ("../x", "..", "a/b"):
        with pytest.raises(ConfigError, match="run_name"):
            validate_parameters({"run_name": bad})
    assert not (tmp_path / "r").exists()


_AUDIT = r"""
import json, os, sys
writes = []
FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, (str, bytes, os.PathLike)) and (
                (isinstance(flags, int) and flags & FLAGS)
                or (isinstance(mode, str) and any(c in mode for c in "wax+"))):
            writes.append([event, os.fsdecode(path)])
    elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
        writes.append([event, os.fsdecode(args[1])])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod",
                   "shutil.rmtree", "shutil.copyfile", "os.unlink"):
        if isinstance(args[0], (str, bytes, os.PathLike)):
            writes.append([event, os.fsdecode(args[0])])
sys.addaudithook(hook)
from aimm.training.engine import run
run(json.loads(sys.argv[1]))
print("WRITES " + json.dumps(writes))
"""


def test_every_file_the_engine_writes_lies_under_the_run_dir(tiny_data, tmp_path):
    """Every write (open for writing, rename, mkdir, chmod, remove) of a whole run, through
    Python's audit hooks: within the run dir, except the OS null device and the temp dir that
    torch's import probes and caches in (TMPDIR pointed at a folder of its own)."""
    run_dir, scratch = tmp_path / "runs" / "audit", tmp_path / "tmp"
    scratch.mkdir()
    values = dict(benchmark="long_sequence", tasks=["sst-2", "agnews"], data_dir=str(tiny_data),
                  model="tiny-causal", max_train=8, max_test=4, batch_size=4, progress=False,
                  run_dir=str(run_dir), checkpoint_every=1, method="aimmerging",
                  method_options={"initial_interval": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch),
           # torch's own cache (a parent process may have exported its location)
           "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor")}
    result = subprocess.run([sys.executable, "-c", _AUDIT, json.dumps(values)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("WRITES "))
    writes = json.loads(line[len("WRITES "):])
    inside = [p for _, p in writes if Path(p).resolve().is_relative_to(run_dir.resolve())]
    assert len(inside) > 20  # the hook saw the run's own files
    ancestors = {str(p) for p in run_dir.parents}  # mkdir -p of the run dir itself
    outside = [(e, p) for e, p in writes
               if not Path(p).resolve().is_relative_to(run_dir.resolve())
               and p != os.devnull and not Path(p).resolve().is_relative_to(scratch.resolve())
               and not (e == "os.mkdir" and p in ancestors)]
    assert outside == [], outside


# ------------------------------------------------------------------ 3. one process per run dir
def test_second_process_on_a_run_dir_exits_at_once_naming_the_holder(tiny_data, tmp_path):
    run_dir = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AIMM_CRASH_AT", None)
    first = subprocess.Popen([sys.executable, "-m", "aimm.cli",
                              *_tiny_args(tiny_data, run_dir, "--epochs", "400")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        lock = run_dir / "run.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        assert first.poll() is None
        second = _cli(*_tiny_args(tiny_data, run_dir, "--lr", "0.01"))  # another config even
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{run_dir} is in use by process {first.pid} since " in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # untouched by the second
    finally:
        first.kill()
        first.wait()
    # killed: the kernel released the lock, nobody clears anything by hand
    with RunStore(run_dir).lock():
        assert "process" in (run_dir / "run.lock").read_text()


def test_notebook_and_library_callers_get_the_same_lock(tiny_config, tmp_path):
    cfg = tiny_config()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from aimm.runs import RunStore\n"
         f"with RunStore({cfg.run_dir!r}).lock():\n print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"is in use by process {holder.pid} since"):
            run(cfg)  # what aimm.notebook.train_all (notebook 02) calls
        assert not (Path(cfg.run_dir) / "config.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert load_metrics(run(cfg))["complete"]  # released: the run goes ahead


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_planted_run_lock_is_refused_and_its_target_kept(tiny_data, tmp_path, capsys, kind):
    """``run.lock`` is truncated on every lock: a link there used to empty the file it names."""
    run_dir = tmp_path / "received"
    run_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    if kind == "link":
        (run_dir / "run.lock").symlink_to(victim)
    else:
        os.mkfifo(run_dir / "run.lock")
    assert main(_tiny_args(tiny_data, run_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{run_dir / 'run.lock'}: not a regular file" in err and "remove it" in err
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]


@pytest.mark.parametrize("where", ["checkpoints", "stages", "stages/01_sst-2/adapter",
                                   "logs/notes.txt"])
def test_a_link_inside_a_received_run_dir_is_refused_and_its_target_kept(tiny_data, tmp_path,
                                                                         capsys, where):
    """A resumed run writes checkpoints and stage files and deletes the ones it is done with: a
    ``checkpoints`` folder linked elsewhere had a user's file there overwritten, then deleted."""
    import shutil

    run_dir = tmp_path / "received"
    assert main(_tiny_args(tiny_data, run_dir)) == 0
    capsys.readouterr()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "stage-02.safetensors").write_text("KEEP")
    (victim / "notes.txt").write_text("KEEP")
    link = run_dir / where
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(victim / "notes.txt" if where.endswith(".txt") else victim)
    state = (run_dir / "state.json").read_bytes()
    assert main(_tiny_args(tiny_data, run_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{link}: a link inside the run directory" in err and "replace the link" in err
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt", "stage-02.safetensors"]
    assert all(p.read_text() == "KEEP" for p in victim.iterdir())
    assert (run_dir / "state.json").read_bytes() == state


def test_a_failed_run_keeps_a_users_dot_tmp_files(tiny_data, tmp_path, capsys):
    """Half-written ``.*.tmp`` files are cleared only in a dir that holds a run."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / ".notes.tmp").write_text("x")
    (mine / "sub" / ".cache.tmp").write_text("y")
    assert main(_tiny_args(tiny_data, mine, "--data-dir", str(tmp_path / "none"))) == 2
    capsys.readouterr()
    assert (mine / ".notes.tmp").read_text() == "x" and (mine / "sub" / ".cache.tmp").read_text() == "y"


# ------------------------------------------------------------------ 5. strict types
@pytest.mark.parametrize("yaml_text, needle", [
    ("record_forgetting_signal: \"no\"", "record_forgetting_signal='no': must be true or false, not a string"),
    ("compile: \"false\"", "compile='false': must be true or false"),
    ("progress: \"yes\"", "progress='yes': must be true or false"),
    ("fused_optimizer: \"off\"", "fused_optimizer='off': must be true or false"),
    ("lora_targets: q_proj", "lora_targets='q_proj': must be a list of strings or null, not a "
                             "string (write a list: [q_proj])"),
    ("lr: 3e-4", "lr='3e-4': must be a number, not a string (YAML reads 3e-4 as text"),
    ("batch_size: 8.0", "batch_size=8.0: must be an integer, not a number"),
    ("seed: true", "seed=True: must be an integer, not a boolean"),
    ("tasks: sst-2", "tasks='sst-2': must be a list of strings or mappings or null"),
    ("method_options: [1, 2]", "method_options=[1, 2]: must be a mapping"),
])
def test_yaml_values_of_the_wrong_type_are_refused(tmp_path, capsys, yaml_text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text + "\n")
    assert main(["run", "--config", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {needle}" in err
    assert not (tmp_path / "r").exists()


def _wrong_value(hint) -> object:
    """A value of another type than ``hint`` allows."""
    from aimm.typecheck import matches_type

    for value in ("text", 7, 1.5, True, ["x"], {"k": 1}):
        if not matches_type(value, hint):
            return value
    raise AssertionError(hint)


def test_every_field_is_type_checked_from_its_annotation():
    """Derived from the dataclass, so a new field is covered without a list to update."""
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        value = _wrong_value(hints[f.name])
        with pytest.raises(ConfigError) as err:
            RunConfig.from_dict({f.name: value}, source="nb")
        assert f"nb: {f.name}={value!r}: must be " in str(err.value), f.name


def test_notebook_extra_and_cli_values_are_type_checked(tiny_data, tmp_path, capsys):
    from aimm.notebook import validate_parameters

    with pytest.raises(ConfigError, match="compile='false': must be true or false"):
        validate_parameters({"extra": {"compile": "false"}, "data_dir": str(tiny_data)})
    code = main(_tiny_args(tiny_data, tmp_path / "r", "-o", "initial_interval=eight",
                           "--method", "aimmerging"))
    assert code == 2 and "initial_interval" in capsys.readouterr().err


# ------------------------------------------------------------------ 6. non-finite numbers
def test_every_number_field_refuses_nan_and_inf():
    hints = typing.get_type_hints(RunConfig)
    from aimm.typecheck import matches_type

    numeric = [f.name for f in dataclasses.fields(RunConfig) if matches_type(1.5, hints[f.name])]
    assert {"lr", "epochs", "lora_dropout", "buffer_fraction"} <= set(numeric)
    for name in numeric:
        for value in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ConfigError, match=rf"{name}={value!r}: must be a finite number"):
                RunConfig.from_dict({name: value})
    with pytest.raises(ConfigError, match=r"method_options.controller.halve_at=nan: must be a finite number"):
        RunConfig.from_dict({"method": "aimmerging",
                             "method_options": {"controller": {"halve_at": float("nan")}}})


@pytest.mark.parametrize("args, needle", [
    (("--lr", "inf"), "lr=inf: must be a finite number"),
    (("--epochs", "inf"), "epochs=inf: must be a finite number"),
    (("--lr", "nan"), "lr=nan: must be a finite number"),
    (("-o", "initial_interval=NaN", "--method", "aimmerging"), "must be a finite number"),
])
def test_non_finite_numbers_on_the_command_line(tiny_data, tmp_path, capsys, args, needle):
    assert main(_tiny_args(tiny_data, tmp_path / "r", *args)) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_yaml_inf_is_refused_too(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": float("inf"), "epochs": float("nan")}))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "lr=inf: must be a finite number" in err and "epochs=nan: must be a finite number" in err


def test_a_stage_whose_adapter_is_not_finite_is_not_completed(tiny_data, tmp_path, capsys,
                                                              monkeypatch):
    """Weights can go non-finite while the loss that was checked is finite (a bad rehearsal or
    fusion step; here: poisoned during stage 2's only step). The stage is not completed."""
    import aimm.methods.base

    real, calls = aimm.methods.base.lm_loss, []

    def poisoned(model, batch, is_seq2seq):
        loss = real(model, batch, is_seq2seq)
        calls.append(1)
        if len(calls) == 2:  # stage 2, step 1: after its loss was computed
            lora = next(p for n, p in model.named_parameters() if "lora_" in n)
            lora.data.fill_(float("inf"))
        return loss

    monkeypatch.setattr(aimm.methods.base, "lm_loss", poisoned)  # the inner loss
    run_dir = tmp_path / "r"
    code = main(_tiny_args(tiny_data, run_dir, "--max-train", "4", "--method", "seq_lora"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("aimm run: error: stage agnews: the adapter holds" in err
            and "NaN/inf values after training" in err)
    assert json.loads((run_dir / "state.json").read_text())["completed"] == ["sst-2"]
    assert not (run_dir / "stages" / "02_agnews" / "adapter.safetensors").exists()
    assert main(["report", str(run_dir), "--verify"]) == 0  # stage 1 intact


def test_learning_rates_that_overflow_the_optimiser_are_refused(tiny_config):
    with pytest.raises(ConfigError, match="lr=1e\\+39: must be at most 1e\\+36"):
        tiny_config(lr=1e39)
