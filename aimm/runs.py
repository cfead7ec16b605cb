"""The run directory: the single source of truth for everything a run produced.

Layout of ``runs/<run_id>/``::

    config.json            resolved RunConfig
    environment.json       package versions, git sha, python, platform, seed
    state.json             completed stages, scores, sha256 of every stage file (written last at
                           each stage end: the resume point)
    run.lock               held (fcntl.flock) by the process running the run; holder pid + time
    data_fingerprint.json  sha256 of every split file used, per task (checked on resume)
    warnings.json          data / truncation / numerical warnings
    scores.csv             long form: stage, after_task, eval_task, metric, score, n
    scores_matrix.csv      scores[j][i] (rows: after task j, columns: task i)
    metrics.json           OP / BWT / FWT / forgetting (or OP for joint training)
    stages/<k>_<name>/     adapter.safetensors, adapter/ (PEFT), steps.csv (per inner step),
                           merges.csv, memory.json, stage.json, predictions/<task>.jsonl,
                           method_state.safetensors + .json (a method's cross-stage state)
    checkpoints/           within-task checkpoints (optional; safetensors + JSON, no pickle)

Every file is written atomically (temporary file, then ``os.replace``), so a killed process
leaves either the old or the new version, never half a file.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import platform
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from aimm.errors import RunDirError  # noqa: F401  (re-exported: `from aimm.runs import RunDirError`)
from aimm.names import require_name
from aimm.run_shapes import metrics_problem, object_problem, scores_matrix_problem, state_problem
from aimm.util import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)
from aimm.util import error_summary, launch_rank
from aimm.util import read_json as _read_json


# ---------------------------------------------------------------------------------- atomic I/O
def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_nan(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_nan(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean_nan(obj), indent=2, default=_json_default) + "\n")


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def atomic_write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, rows_to_csv(rows))


def atomic_write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    """A JSON file of the run dir; ``RunDirError`` names a corrupt one (:func:`aimm.util.read_json`)."""
    return _read_json(path, RunDirError)


def read_checked_json(path: Path, problem_of: Callable[[Any], str | None], what: str, fix: str) -> Any:
    """:func:`read_json` of ``path``, checked by ``problem_of`` (pure, ``None``: fine);
    ``RunDirError``: ``<path>: not <what> (<problem>); <fix>``."""
    value = read_json(path)
    problem = problem_of(value)
    if problem:
        raise RunDirError(f"{path}: not {what} ({problem}); {fix}")
    return value


# ---------------------------------------------------------------------------------- environment
def environment_info(seed: int) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for pkg in ("aimm", "torch", "transformers", "peft", "accelerate", "datasets", "numpy",
                "pandas", "rouge-score", "gguf", "plotly"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_sha": sha,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def new_run_id(method: str) -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{method}"


# ---------------------------------------------------------------------------------- the store
def refuse_links(folder: Path, what: str, why: str, unless: Path | None = None) -> None:
    """:class:`RunDirError` naming the first link (file or folder) inside ``folder`` (not
    followed), other than ``unless``; ``folder`` itself may be one. Writing or deleting through a
    planted link would reach the file or folder it points to, outside ``folder``; aimm makes no
    links."""
    for parent, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = os.path.join(parent, name)
            if os.path.islink(path) and path != str(unless):
                raise RunDirError(f"{path}: a link inside {what} {folder}; "
                                  f"{why} and would reach what the link points to; replace the "
                                  "link with the file or folder itself, or remove it")


@dataclass
class RunStore:
    """Reads and writes one run directory."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # paths
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def stage_dir(self, index: int, name: str) -> Path:
        return self.root / "stages" / f"{index + 1:02d}_{require_name(name, 'stage name')}"

    def checkpoint_path(self, index: int) -> Path:
        """The within-stage checkpoint of stage ``index`` (removed once the stage is done)."""
        return self.root / "checkpoints" / f"stage-{index + 1:02d}.safetensors"

    @property
    def lock_path(self) -> Path:
        return self.root / "run.lock"

    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for the whole ``with`` block (every caller: CLI, notebooks).

        An exclusive ``fcntl.flock`` on ``run.lock``: the kernel releases it when the process
        ends, however it ends, so a stale lock never needs clearing. A second process gets
        :class:`RunDirError` at once: ``<run dir> is in use by process <pid> since <time>``.
        Under several processes (``RANK`` > 0) only rank 0 locks. When the block fails before
        ``config.json`` exists, what it added to the directory is removed again (a run dir it
        created goes entirely): bad input leaves nothing behind.
        """
        if launch_rank() != 0:
            yield self
            return
        refuse_links(self.root, "the run directory", "aimm writes and deletes files there",
                     unless=self.lock_path)  # refused below, with its own fix
        created = _missing_parents(self.root)
        before = set(os.listdir(self.root)) if self.root.is_dir() else set()
        self.ensure_writable()
        fd = self._open_lock_file()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                raise RunDirError(f"{self.root} is in use by "
                                  + (holder or "another process")
                                  + "; wait for it to finish or use another run dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                          .encode(), 0)
            try:
                yield self
            except BaseException:
                if not self.config_path.exists():
                    _remove_new_entries(self.root, before, created)
                raise
            finally:
                if self.lock_path.exists():
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the lock

    def _open_lock_file(self) -> int:
        """``run.lock`` opened for writing; a link or anything but a regular file is refused (it
        is truncated on every lock: a link planted there would empty the file it points to)."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(self.lock_path).st_mode):
                raise RunDirError(f"{self.lock_path}: not a regular file (a link or special file); "
                                  "remove it, aimm makes its own lock file")
        try:  # O_NOFOLLOW and O_NONBLOCK: a link or FIFO put there since the check is not opened
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                         0o666)
        except OSError as exc:
            raise RunDirError(f"{self.lock_path}: cannot be opened as the lock file "
                              f"({exc.strerror or exc}); remove it") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDirError(f"{self.lock_path}: not a regular file; remove it, aimm makes its "
                              "own lock file")
        return fd

    # creation / resume
    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"{self.root}: run directory is not writable ({exc.strerror or exc})") from exc

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete half-written ``.<name>.*.tmp`` files left by a killed process."""
        stale = [p for p in self.root.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def exists(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> dict[str, Any]:
        return load_config(self.root)

    def read_state(self) -> dict[str, Any]:
        """The resume point; a wrongly shaped ``state.json`` raises :class:`RunDirError`."""
        if not self.state_path.is_file():
            return {"completed": [], "scores": [], "stage_steps": []}
        state = read_checked_json(self.state_path, state_problem, "a valid run state",
                                  "restore it, or start over with --restart-from-stage 1")
        state.setdefault("stage_steps", [])
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_path, state)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config_path, config)

    def write_environment(self, env: dict[str, Any]) -> None:
        atomic_write_json(self.root / "environment.json", env)

    def write_warnings(self, warnings: list[str]) -> None:
        atomic_write_json(self.root / "warnings.json", warnings)


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_new_entries(root: Path, before: set[str], created: list[Path]) -> None:
    import shutil

    if created:
        shutil.rmtree(root, ignore_errors=True)
        for parent in created[1:]:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty
        return
    for name in set(os.listdir(root)) - before:
        p = root / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- readers
def _csv_or_empty(path: Path) -> pd.DataFrame:
    if path.is_file() and path.stat().st_size > 0:
        return pd.read_csv(path)
    return pd.DataFrame()


def load_config(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``config.json``; an older run's renamed fields read under today's names, and the
    fields added since at the value it ran with. :class:`RunDirError` names one that is not a
    JSON object."""
    from aimm.config import renamed_fields, with_added_fields

    path = Path(run_dir) / "config.json"
    values = read_checked_json(path, object_problem, "a run config",
                               "fix it, or remove the run to start over")
    return with_added_fields(renamed_fields(values, source=str(path)))


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """``metrics.json``; :class:`RunDirError` names one that is not a JSON object."""
    return read_checked_json(Path(run_dir) / "metrics.json", metrics_problem, "a run's metrics",
                             "re-run the run's `aimm run` command to write it again")


def load_warnings(run_dir: str | Path) -> list[str]:
    """``warnings.json`` (none: ``[]``); :class:`RunDirError` names one that is not a list of
    lines."""
    path = Path(run_dir) / "warnings.json"
    if not path.is_file():
        return []
    return read_checked_json(
        path, lambda w: None if isinstance(w, list) and all(isinstance(x, str) for x in w)
        else "a JSON list of text lines expected", "a run's warnings",
        "remove it, or re-run the run's `aimm run` command to write it again")


def load_scores(run_dir: str | Path) -> pd.DataFrame:
    """Long-form scores: one row per (stage, evaluated task)."""
    return _csv_or_empty(Path(run_dir) / "scores.csv")


def load_scores_matrix(run_dir: str | Path) -> pd.DataFrame:
    """scores[j][i] as a DataFrame: index = after task j, columns = task i (NaN: not evaluated);
    :class:`RunDirError` names a file that is not such a table."""
    path = Path(run_dir) / "scores_matrix.csv"
    if not path.is_file():
        return pd.DataFrame()
    try:
        matrix = pd.read_csv(path, index_col=0)
        problem = "" if all(pd.api.types.is_numeric_dtype(t) for t in matrix.dtypes) else \
            "a score that is not a number"
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        problem = error_summary(exc)
    if not problem:
        problem = _matrix_against_state(matrix, Path(run_dir))
    if problem:
        raise RunDirError(f"{path}: not a scores matrix ({problem}); re-run the run's `aimm run` "
                          "command to write it again")
    return matrix


def _matrix_against_state(matrix: pd.DataFrame, run_dir: Path) -> str:
    """A matrix that is a table of numbers but lost a row or had a score edited: checked against
    the scores of ``state.json`` (a missing or damaged state is reported where it is read)."""
    if not matrix.index.is_unique or not matrix.columns.is_unique:
        return "a row or column named twice"
    try:
        state = RunStore(run_dir).read_state()
    except (ValueError, OSError):  # RunDirError is an OSError
        return ""
    return scores_matrix_problem(matrix.to_dict(orient="index"), state["scores"]) or ""


def _concat_stage_csv(run_dir: Path, filename: str) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in sorted((run_dir / "stages").glob(f"*/{filename}"))
              if p.stat().st_size > 0]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


#: steps.csv columns of older versions -> today's names (renamed on read)
RENAMED_COLUMNS = {"history_loss": "forgetting_signal",
                   "history_loss_release": "forgetting_signal_release"}


def load_trajectory(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steps, merges) DataFrames of all completed stages.

    steps: task, task_index, step, global_step, loss, lr, and where recorded forgetting_signal
    (and forgetting_signal_release), threshold, activations, interval; an older run's
    ``history_loss`` columns read as ``forgetting_signal``. merges: task, step, lambda,
    interval_before, interval_after, outer_steps, w_in, w_out, activations, kind.
    """
    run_dir = Path(run_dir)
    steps = _concat_stage_csv(run_dir, "steps.csv").rename(columns=RENAMED_COLUMNS)
    return steps, _concat_stage_csv(run_dir, "merges.csv")


def report_text(run_dir: str | Path) -> str:
    """The scores matrix, metrics and warnings of a run as text (``aimm report``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (config.json missing)")
    lines = [f"# {run_dir.name}"]
    matrix = load_scores_matrix(run_dir)
    if not matrix.empty:
        with pd.option_context("display.width", 200, "display.max_columns", 50):
            lines += ["", "scores[j][i] (row: after task j, column: task i)",
                      matrix.round(4).to_string(na_rep="-")]
    if (run_dir / "metrics.json").is_file():
        metrics = load_metrics(run_dir)
        lines += [""] + [f"{k:>18}: {v:.4f}" if isinstance(v, float) else f"{k:>18}: {v}"
                         for k, v in metrics.items()]
    warnings = load_warnings(run_dir)
    if warnings:
        lines += ["", "warnings:"] + [f"- {w}" for w in warnings]
    return "\n".join(lines)
