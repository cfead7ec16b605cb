"""A new run's first stage taken from a finished run that trained exactly the same stage.

Many methods train their first task exactly as ``seq_lora`` does: with no earlier task there is
no memory buffer to replay, rehearse or project against, and nothing to merge. Such a method says
so with its ``first_stage_as`` fact (:class:`aimm.methods.base.Method`). In a study, where these
methods run next to ``seq_lora`` with the same seeds, the first stage is then trained and
evaluated once per seed and order, not once per method: the new run's folder starts with a copy of
the other run's first stage folder, and the engine resumes from there exactly as after a crash
(every stage re-seeds from ``(seed, stage)``, so the rest of the run is what an uninterrupted run
gives; ``tests/test_shared_stage.py`` checks that bit for bit).

The copy is allowed only when nothing else can differ: the source run's ``method`` is the new
method's ``first_stage_as``, every other config field that matters for a resume is equal
(``method_options`` aside: the declaring methods' options act from the second task on), the
source's first stage is complete and its files match their recorded sha256, and the new run
directory holds no run yet. The copied ``stage.json`` names its source (``first_stage_from``) and
keeps the source's timers: the seconds are those of the computation the stage's results come
from, once.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from aimm.run_shapes import stage_problem
from aimm.runs import RunStore, atomic_write_json, load_warnings, read_json
from aimm.training.state import RESUME_FREE_FIELDS, RunState, differing_fields

if TYPE_CHECKING:  # pragma: no cover
    from aimm.config import RunConfig
    from aimm.methods.base import Method

# config fields a shared first stage may differ in, besides those a resume may differ in
SHARE_FREE_FIELDS = frozenset(RESUME_FREE_FIELDS | {"method", "method_options"})
# run-level files copied with the stage: the data the stage was trained on
COPIED_FILES = ("data_fingerprint.json",)


def share_problem(source_dir: str | Path, cfg: "RunConfig", method: "Method") -> str | None:
    """Why ``source_dir``'s first stage cannot be ``cfg``'s (None: it can)."""
    from aimm.integrity import verify_run

    if method.first_stage_as is None:
        return f"{cfg.method} does not train its first stage as another method does"
    source = RunStore(Path(source_dir))
    if not source.exists():
        return f"{source.root} holds no run (no config.json)"
    try:
        old, state = source.read_config(), source.read_state()
    except (OSError, ValueError) as exc:  # RunDirError is an OSError
        return f"{source.root} cannot be read ({exc})"
    if old.get("method") != method.first_stage_as:
        return (f"{source.root} is a {old.get('method')!r} run; {cfg.method}'s first stage is "
                f"{method.first_stage_as}'s")
    diff = differing_fields(old, cfg.to_dict(), SHARE_FREE_FIELDS)
    if diff:
        return f"{source.root} was run with other settings ({', '.join(diff)})"
    if not state["completed"]:
        return f"{source.root} has no completed stage"
    if not all((source.root / name).is_file() for name in COPIED_FILES):
        return f"{source.root} has no {COPIED_FILES[0]} (the data its first stage was trained on)"
    if not state.get("stage_steps"):
        return f"{source.root} was written before state.json recorded its stages' steps"
    if state["completed"][0] != method.stages(cfg.task_names())[0].name:
        return f"{source.root}'s first stage is {state['completed'][0]!r}, not {cfg.method}'s"
    damaged = [line for number, line in verify_run(source.root, state, results=False) if number == 1]
    if damaged:
        return damaged[0]
    stage_json = source.stage_dir(0, state["completed"][0]) / "stage.json"
    try:  # the copy adds first_stage_from to it
        problem = stage_problem(read_json(stage_json), state["completed"][0])
    except (OSError, ValueError) as exc:
        return str(exc)
    return f"{stage_json}: not a stage record ({problem})" if problem else None


def copy_first_stage(source_dir: str | Path, store: RunStore, cfg: "RunConfig",
                     method: "Method") -> RunState:
    """Start ``store``'s run with ``source_dir``'s first stage; returns the resume point.

    The caller holds ``store``'s lock, has checked :func:`share_problem` and found no run in
    ``store``. ``state.json`` is written last, as at the end of a trained stage: a copy cut short
    leaves a run directory that trains its first stage itself.
    """
    from aimm.training import artifacts

    source = RunStore(Path(source_dir))
    source_state = RunState.read(source)
    name = source_state.completed[0]
    target_stage = store.stage_dir(0, name)
    if target_stage.exists():  # left by a copy that was cut short
        shutil.rmtree(target_stage)
    shutil.copytree(source.stage_dir(0, name), target_stage)
    info = read_json(target_stage / "stage.json")
    info["first_stage_from"] = source.root.name
    atomic_write_json(target_stage / "stage.json", info)
    for filename in COPIED_FILES:
        if (source.root / filename).is_file():
            shutil.copy2(source.root / filename, store.root / filename)
    store.write_config(cfg.to_dict())
    stage_warnings = [w for w in load_warnings(source.root) if w.startswith(f"stage {name}:")]
    store.write_warnings(stage_warnings)
    state = RunState()
    state.complete_stage(name, [r for r in source_state.scores if r["after_task"] == name],
                         source_state.stage_steps[0])
    artifacts.write_results(cfg, method, cfg.task_names(), state, store.root)
    state.record_files(store.root, target_stage)
    state.write(store)  # last: the resume point
    return state


def first_stage_source(cfg: "RunConfig", candidates: Iterable[str | Path]) -> Path | None:
    """The first of ``candidates`` (run directories) whose first stage can be ``cfg``'s; None
    also when ``cfg``'s run dir already holds a run (it resumes instead)."""
    from aimm.methods import build_method

    method = build_method(cfg)
    if method.first_stage_as is None or (cfg.run_dir and RunStore(Path(cfg.run_dir)).exists()):
        return None
    for path in candidates:
        if share_problem(path, cfg, method) is None:
            return Path(path)
    return None


__all__ = ["COPIED_FILES", "SHARE_FREE_FIELDS", "copy_first_stage", "first_stage_source",
           "share_problem"]
