"""Integrity of a run directory: sha256 records, resume checks, data fingerprints, rewinding.

* Every stage's files (adapter, steps, merges, stage.json, predictions) and the result set
  (``scores.csv``, ``scores_matrix.csv``, ``metrics.json``) are hashed when the stage ends; the
  sums go into ``state.json`` (``"sha256"``: run-dir-relative path -> hex digest), which is
  written last. :func:`verify_run` (``aimm report --verify``) and every resume compare them.
* ``data_fingerprint.json``: sha256 of each split file a run used, per task and split. On resume
  a changed file is an error naming it; the same files in another folder are fine.
* :func:`rewind_run` drops the stages from k on (``aimm run ... --restart-from-stage k``), the
  offered way out when a completed stage's files are damaged.
* The adapter of a stage must be finite before the stage is marked complete.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch

from aimm.run_shapes import stage_problem
from aimm.runs import RunDirError, RunStore, atomic_write_json, read_checked_json, read_json
from aimm.util import launch_rank

RESULT_FILES = ("scores.csv", "scores_matrix.csv", "metrics.json")
FINGERPRINT = "data_fingerprint.json"


class NonFiniteWeightsError(FloatingPointError):
    """A stage's adapter holds NaN/inf after training: the stage is not marked complete."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stage_number(rel: str) -> int | None:
    """1-based stage number of a ``stages/NN_name/...`` path (``None`` for other files)."""
    parts = rel.split("/")
    if len(parts) > 2 and parts[0] == "stages" and parts[1][:2].isdigit():
        return int(parts[1][:2])
    return None


def _adapter_copy(rel: str) -> str | None:
    """Which of a stage's two adapter copies a ``stages/NN_name/...`` path belongs to: aimm's
    ``adapter.safetensors`` or PEFT's ``adapter/`` folder (``None`` for other files)."""
    parts = rel.split("/")
    if len(parts) > 2 and parts[0] == "stages":
        if parts[2] == "adapter.safetensors":
            return "aimm"
        if parts[2] == "adapter" and len(parts) > 3:
            return "peft"
    return None


def _deleted_copies(store: RunStore, sums: dict[str, str]) -> set[tuple[int, str]]:
    """(stage, copy) pairs whose files are all gone while the stage's other adapter copy is
    whole: a user who keeps one copy only (either one) can still resume."""
    files: dict[tuple[int, str], list[str]] = {}
    for rel in sums:
        copy, number = _adapter_copy(rel), _stage_number(rel)
        if copy and number:
            files.setdefault((number, copy), []).append(rel)
    gone = {key for key, rels in files.items() if not any((store.root / r).exists() for r in rels)}
    other = {"aimm": "peft", "peft": "aimm"}
    return {(n, c) for n, c in gone if (n, other[c]) in files and (n, other[c]) not in gone}


def restart_hint(k: int) -> str:
    kept = f"stages 1-{k - 1} are kept" if k > 2 else "stage 1 is kept" if k == 2 else "it starts over"
    return (f"re-run from stage {k}: the same `aimm run` command with --restart-from-stage {k} "
            f"(or aimm.training.engine.run(cfg, restart_from_stage={k})); {kept}")


def read_stage_record(path: Path, number: int, name: str | None = None) -> dict:
    """Completed stage ``number``'s (1-based) ``stage.json``, checked
    (:func:`aimm.run_shapes.stage_problem`; ``name``: the stage its folder holds); RunDirError
    names a malformed one with the rewind that writes it again."""
    return read_checked_json(path, lambda info: stage_problem(info, name), "a stage record",
                             restart_hint(number))


# ---------------------------------------------------------------------------------- recording
def record_stage_files(sums: dict[str, str], run_dir: Path, stage_dir: Path) -> None:
    """Put the sha256 of every file of ``stage_dir`` and of the result set into ``sums`` (the
    ``sha256`` map of ``state.json``)."""
    run_dir = Path(run_dir)
    files = [p for p in Path(stage_dir).rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    files += [run_dir / name for name in RESULT_FILES if (run_dir / name).is_file()]
    for path in sorted(files):
        sums[path.relative_to(run_dir).as_posix()] = sha256_file(path)


# ---------------------------------------------------------------------------------- checking
def adapter_problem(path: Path, like: dict[str, torch.Tensor] | None = None) -> str | None:
    """Why the adapter at ``path`` is unusable (missing, unreadable, wrong tensors, NaN/inf)."""
    from safetensors.torch import load

    if not Path(path).is_file():
        return "missing"
    try:
        weights = load(Path(path).read_bytes())
    except Exception as exc:  # safetensors' own error type (truncated, damaged header)
        return f"unreadable ({str(exc).splitlines()[0][:120]})"
    if like is not None:
        if set(weights) != set(like):
            return "its LoRA weight names differ from the model's"
        for k, v in like.items():
            if tuple(weights[k].shape) != tuple(v.shape):
                return f"weight {k} has shape {tuple(weights[k].shape)}, the model {tuple(v.shape)}"
    bad = sum(int((~torch.isfinite(w)).sum()) for w in weights.values() if w.is_floating_point())
    return f"{bad} NaN/inf values" if bad else None


def load_adapter(path: Path, stage_number: int, like: dict[str, torch.Tensor]) -> dict:
    """The adapter of a completed stage, or :class:`RunDirError` naming it with the way out."""
    from safetensors.torch import load

    problem = adapter_problem(path, like)
    if problem:
        raise RunDirError(f"{path}: adapter of completed stage {stage_number} is {problem}; "
                          + restart_hint(stage_number))
    return load(Path(path).read_bytes())


def verify_run(run_dir: Path, state: dict | None = None,
               results: bool = True) -> list[tuple[int | None, str]]:
    """Every problem of a run directory as ``(stage number or None, line)``; empty: all good.

    Checks each completed stage's adapter (present, readable, finite) and every file listed in
    ``state.json``'s ``sha256`` against its sum. ``results=False`` skips the result set (a
    resume rewrites it).
    """
    store = RunStore(Path(run_dir))
    state = store.read_state() if state is None else state
    sums: dict[str, str] = state.get("sha256", {})
    problems: list[tuple[int | None, str]] = []
    for i, name in enumerate(state["completed"]):
        path = store.stage_dir(i, name) / "adapter.safetensors"
        rel = path.relative_to(store.root).as_posix()
        if rel not in sums:  # runs written before sums were recorded
            problem = adapter_problem(path)
            if problem:
                problems.append((i + 1, f"{path}: adapter of completed stage {i + 1} is {problem}"))
    deleted = _deleted_copies(store, sums)
    for rel, digest in sorted(sums.items()):
        number = _stage_number(rel)
        if number is None and not results:
            continue
        if (number, _adapter_copy(rel)) in deleted:
            continue
        if number is not None and number > len(state["completed"]):
            continue
        path = store.root / rel
        if not path.is_file():
            problems.append((number, f"{path}: missing (listed in state.json)"))
        elif sha256_file(path) != digest:
            problems.append((number, f"{path}: sha256 differs from the one recorded when it was "
                                     "written (damaged or edited)"))
        elif rel.endswith("adapter.safetensors"):
            problem = adapter_problem(path)
            if problem:
                problems.append((number, f"{path}: adapter is {problem}"))
    return problems


def verify_for_resume(store: RunStore, state: dict) -> None:
    """Raise :class:`RunDirError` for the earliest damaged completed stage, offering a rewind."""
    problems = [(k, line) for k, line in verify_run(store.root, state, results=False) if k]
    if problems:
        k, line = min(problems, key=lambda p: p[0])
        raise RunDirError(f"{line}; the run cannot resume from it: {restart_hint(k)}")


def require_finite_adapter(lora: dict[str, torch.Tensor], stage_name: str, run_dir: Path) -> None:
    """The NaN policy for the weights: a stage whose adapter is not finite is not completed."""
    bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in lora.values())
    if bad:
        raise NonFiniteWeightsError(
            f"stage {stage_name}: the adapter holds {bad} NaN/inf values after training (is lr "
            f"too large?); the stage is not marked complete and {run_dir} keeps the completed "
            "stages intact")


# ---------------------------------------------------------------------------------- data
def check_run_data(store: RunStore, benchmark: str, data: dict[str, Any], state: dict,
                   max_train: int | None = None, rewinding: bool = False) -> dict:
    """Before training: every task trainable (:func:`aimm.data.check.training_data_problems`,
    ``DataError``) and, on resume, the same data as before (:func:`check_data_fingerprint`).
    Returns the data's fingerprint (:func:`data_fingerprint`), hashed here once per run."""
    from aimm.data import DataError
    from aimm.data.check import training_data_problems

    problems = training_data_problems(benchmark, data, max_train)
    if problems:
        raise DataError(problems)
    fingerprint = data_fingerprint(data)
    check_data_fingerprint(store, fingerprint, state, rewinding)
    return fingerprint


def data_fingerprint(data: dict[str, Any]) -> dict[str, dict[str, dict[str, str]]]:
    """``{task: {split: {"file", "sha256"}}}`` of the split files a run reads (``TaskData.files``)."""
    return {task: {split: {"file": str(path), "sha256": sha256_file(Path(path))}
                   for split, path in sorted(td.files.items())}
            for task, td in data.items()}


def check_data_fingerprint(store: RunStore, new: dict[str, Any], state: dict,
                           rewinding: bool = False) -> None:
    """On resume, refuse data (``new``: its :func:`data_fingerprint`) that differs from what the
    run trained on; else record it.

    The comparison is by content, per task and split: moving the same files elsewhere is fine.
    It applies once a stage is complete or a within-stage checkpoint exists; before that the
    fingerprint is simply (re)written. A started run whose fingerprint is missing, or does not
    record a task's data, is refused: its data can no longer be checked. ``rewinding``: ``state``
    is the state a pending ``--restart-from-stage`` leaves (its checkpoints will go), and nothing
    is written yet.
    """
    path = store.root / FINGERPRINT
    started = bool(state["completed"]) or (
        not rewinding and any((store.root / "checkpoints").glob("*")))
    if started:
        if not path.is_file():
            raise RunDirError(f"{path}: missing, so the data this run trained on cannot be "
                              "checked; restore it, or " + restart_hint(1))
        old = read_json(path)
        if not isinstance(old, dict):
            raise RunDirError(f"{path}: not a data fingerprint (expected a JSON object); "
                              + restart_hint(1))
        for task, splits in new.items():
            for split, now in splits.items():
                then = (old.get(task) or {}).get(split) if isinstance(old.get(task), dict) else None
                if not (isinstance(then, dict) and isinstance(then.get("sha256"), str)):
                    raise RunDirError(
                        f"{path}: does not record the {split} data of task {task}, so the data "
                        "this run trained on cannot be checked; restore it, or " + restart_hint(1))
                if then["sha256"] != now["sha256"]:
                    raise RunDirError(
                        f"{now['file']}: the {split} data of task {task} differs from the data "
                        f"this run trained on (sha256 {then['sha256'][:12]}... of "
                        f"{then.get('file')}, now {now['sha256'][:12]}...); resume with the "
                        "original data, or start a new run dir")
        return
    if not rewinding and launch_rank() == 0:
        atomic_write_json(path, new)


# ---------------------------------------------------------------------------------- rewinding
def rewound_state(store: RunStore, k: int) -> dict:
    """The run state once stages ``k``.. (1-based) are dropped; reads only, so every other input
    can be checked before :func:`rewind_run` deletes anything. ``k=1`` starts over and works even
    with an unreadable ``state.json``. A ``stages`` folder that is a link is refused: the rewind
    would delete in the folder it points to."""
    if k < 1:
        raise RunDirError(f"--restart-from-stage {k}: stages are numbered from 1")
    stages = store.root / "stages"
    if stages.is_symlink():
        raise RunDirError(f"{stages}: is a symbolic link, and --restart-from-stage deletes stage "
                          "folders; replace the link by the folder it points to")
    if k == 1:
        return {"completed": [], "scores": [], "stage_steps": []}
    state = store.read_state()
    done = len(state["completed"])
    if k > done + 1:
        raise RunDirError(f"--restart-from-stage {k}: {store.root} has {done} completed "
                          f"stage(s); choose 1..{done + 1}")
    state["completed"] = state["completed"][: k - 1]
    state["stage_steps"] = state["stage_steps"][: k - 1]
    state["scores"] = [r for r in state["scores"] if r["after_task"] in state["completed"]]
    state["sha256"] = {rel: d for rel, d in state.get("sha256", {}).items()
                       if (_stage_number(rel) or 0) < k}
    return state


def check_restart_target(store: RunStore, k: int | None) -> None:
    """``--restart-from-stage k`` on a dir that holds no run (no ``config.json``): k > 1 names
    stages that do not exist and is refused (:class:`RunDirError`); k = 1 means start over, which
    a new run does anyway."""
    if k is not None and k > 1 and not store.exists():
        raise RunDirError(f"--restart-from-stage {k}: {store.root} holds no run; leave it out "
                          "to start a new run there, or give the --run-dir that holds the run")


def rewind_run(store: RunStore, k: int) -> dict:
    """Forget stages ``k``.. (1-based) of the run in ``store``: their folders, scores, sums and
    within-stage checkpoints; returns the new state (:func:`rewound_state`, also written). A stage
    folder that is a link loses the link only."""
    state = rewound_state(store, k)
    for folder in sorted((store.root / "stages").glob("*")):
        if folder.name[:2].isdigit() and int(folder.name[:2]) >= k:
            if folder.is_symlink():
                folder.unlink()
            elif folder.is_dir():
                shutil.rmtree(folder)
    shutil.rmtree(store.root / "checkpoints", ignore_errors=True)
    for name in RESULT_FILES:
        (store.root / name).unlink(missing_ok=True)
    store.write_state(state)
    return state


__all__ = ["FINGERPRINT", "NonFiniteWeightsError", "RESULT_FILES", "adapter_problem",
           "check_data_fingerprint", "check_restart_target", "check_run_data", "data_fingerprint",
           "load_adapter", "read_stage_record", "record_stage_files",
           "require_finite_adapter", "restart_hint", "rewind_run", "rewound_state", "sha256_file",
           "verify_for_resume", "verify_run"]
