"""Run the cells of a study, one subprocess per cell, sequentially.

Why subprocesses: a crash, an out-of-memory kill or a SIGKILL of one cell ends only that cell; each
cell takes its run directory's lock for exactly as long as it runs; memory (model, optimiser,
compile caches) is returned to the system between cells; and a cell is exactly ``aimm run --config
<cell>.yaml``, the same entry point a user runs. The cost is one interpreter start per cell (a few
seconds), small next to training.

Per cell, before starting anything:

* finished (``metrics.json`` says complete) with the same config: skipped, only read;
* holding a run (finished or not) with a different config: failed, nothing written or started
  (the engine would refuse it too); :func:`check_existing_runs` refuses such a study as a whole
  before it writes anything;
* its ``run.lock`` held by another process: reported ``in use`` and skipped;
* else ``aimm run`` resumes it after its last completed task (or starts it). Its output goes to
  ``DIR/cells/<cell>.log``; the config it ran is ``DIR/cells/<cell>.yaml``. A new cell whose
  method trains its first stage as another's (``first_stage_as``) gets ``--first-stage-from``
  the first finished cell of this study with that same stage (:mod:`aimm.training.shared_stage`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from aimm.config import ConfigError
from aimm.runs import atomic_write_text, load_config, load_metrics
from aimm.study.grid import Cell
from aimm.training.state import differing_fields

LOCK_FILE = "run.lock"  # the engine's exclusive flock for the duration of a run
CELLS_DIR = "cells"

DONE, RAN, FAILED, IN_USE = "done", "ran", "failed", "in use"


@dataclass(frozen=True)
class Outcome:
    """What happened to one cell: ``done`` (already finished, skipped), ``ran`` (finished now),
    ``failed`` or ``in use``; ``reason`` says why for the last two, ``log`` where to look."""

    cell: Cell
    status: str
    reason: str = ""
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status in (DONE, RAN)

    def line(self) -> str:
        text = f"cell {self.cell.name}: {self.status}"
        if self.reason:
            text += f" ({self.reason})"
        if self.log is not None and not self.ok:
            text += f"; log: {self.log}"
        return text


# ------------------------------------------------------------------------------ cell state
def config_difference(stored: dict, planned: dict) -> list[str]:
    """Fields (other than the resume-free ones) where a stored config differs from the planned."""
    return [f"{k}: {stored.get(k)!r} -> {planned.get(k)!r}"
            for k in differing_fields(stored, planned)]


def stored_difference(run_dir: Path, planned: dict) -> list[str] | None:
    """:func:`config_difference` of ``run_dir/config.json`` and ``planned`` (None: no
    ``config.json``); OSError (:class:`RunDirError`) for one that cannot be read."""
    if not (Path(run_dir) / "config.json").is_file():
        return None
    return config_difference(load_config(run_dir), planned)


def check_existing_runs(cells: list[Cell], out: Path) -> None:
    """ConfigError (one line: the study folder, the first cell whose run directory holds a run
    with a different config, its fields, the way out) before a study writes anything. A cell
    whose ``config.json`` cannot be read is left to :func:`run_cell` to report."""
    for cell in cells:
        try:
            diff = stored_difference(cell.run_dir, cell.config.to_dict())
        except OSError:
            continue
        if diff:
            raise ConfigError(f"study folder {out}: cell {cell.name} holds a run with a different "
                              "config (" + "; ".join(diff) + "); use another --out, or the same "
                              "settings as that study to resume it")


def is_complete(run_dir: Path) -> bool:
    path = Path(run_dir) / "metrics.json"
    try:
        return path.is_file() and bool(load_metrics(run_dir).get("complete"))
    except OSError:  # unreadable or damaged (RunDirError): the cell runs again
        return False


def in_use(run_dir: Path) -> bool:
    """True when another process holds the run directory's lock (probe only; never created)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else ""


def _exit_reason(code: int, log: Path) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    last = _last_line(log)
    return f"exit {code}" + (f": {last}" if last else "")


# ------------------------------------------------------------------------------ running
def cell_command(config_path: Path, first_stage_from: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "aimm.cli", "run", "--config", str(config_path), "--no-progress"]
    return command + (["--first-stage-from", str(first_stage_from)] if first_stage_from else [])


def run_cell(cell: Cell, out: Path, finished: list[Path] | None = None) -> Outcome:
    """Skip, refuse or run one cell (see the module docstring); ``finished``: run dirs whose
    first stage a new cell may copy."""
    run_dir = cell.run_dir
    planned = cell.config.to_dict()
    complete = is_complete(run_dir)
    try:
        diff = stored_difference(run_dir, planned)
    except OSError as exc:
        if complete:
            return Outcome(cell, FAILED, str(exc))
        diff = []  # a damaged config of an unfinished run: `aimm run` reports it
    if diff:  # refused before anything is written (not even the cell's yaml)
        return Outcome(cell, FAILED, f"{run_dir} holds a run with a different config ("
                       + "; ".join(diff) + ")")
    if complete and diff is not None:
        return Outcome(cell, DONE)
    if in_use(run_dir):
        return Outcome(cell, IN_USE, f"{run_dir} is locked by another process")
    cells_dir = out / CELLS_DIR
    config_path = cells_dir / f"{cell.name}.yaml"
    log = cells_dir / f"{cell.name}.log"
    atomic_write_text(config_path, yaml.safe_dump(planned, sort_keys=True))
    source = None
    if finished:
        from aimm.training.shared_stage import first_stage_source

        source = first_stage_source(cell.config, finished)
    command = cell_command(config_path, source)
    with log.open("ab") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        fh.flush()
        code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent).returncode
    if code == 0 and is_complete(run_dir):
        return Outcome(cell, RAN, log=log)
    reason = _exit_reason(code, log)
    status = IN_USE if "in use" in reason else FAILED
    return Outcome(cell, status, reason, log)


def _die_with_parent() -> None:
    """In the cell's process (Linux): SIGKILL when the study process dies, so a killed study
    leaves no orphan cell holding its run-dir lock; the next study run resumes that cell."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the cell outlives a killed study
        pass


def run_cells(cells: list[Cell], out: str | Path,
              report: Callable[[str], None] | None = None,
              share_first_stage: bool = True) -> list[Outcome]:
    """Every cell in turn; a failed cell is reported and the next one starts. Ctrl-C stops the
    study (the running cell resumes on the next call). With ``share_first_stage``, a new cell
    may copy the first stage of a cell that finished before it."""
    out = Path(out)
    outcomes = []
    finished: list[Path] = []
    for k, cell in enumerate(cells, 1):
        if report:
            report(f"[{k}/{len(cells)}] {cell.name}")
        outcome = run_cell(cell, out, finished if share_first_stage else None)
        if outcome.ok:
            finished.append(cell.run_dir)
        outcomes.append(outcome)
        if report:
            report(outcome.line())
    return outcomes
