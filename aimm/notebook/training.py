"""Notebook 02: train (or resume) every run of the grid (method x order x seed), the runs index,
the run lookups."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from aimm.config import RunConfig
from aimm.notebook.params import NotebookParams, configs, run_dirs, validate_parameters

def train_all(params: NotebookParams | dict[str, Any],
              callbacks_factory: Callable[[RunConfig], list] | None = None,
              write_index: bool = True) -> dict[str, Path]:
    """Train (or resume) every run of the grid; returns label -> run dir of the finished runs.

    ``callbacks_factory(cfg)`` gives the engine callbacks of one run (a live plot, ...).
    With ``write_index``, ``runs.csv`` / ``study.json`` (:func:`aimm.notebook.study.write_study_index`:
    the grid as ``aimm study`` lays it out) are written first and ``runs.json`` after every run,
    so a later notebook can read what finished even if training is interrupted.

    As in ``aimm study``: a finished run is only read; a run whose directory another process
    holds (its ``run.lock``) is reported ``in use`` and skipped; a failing run is reported and
    the others still run, then a RuntimeError names every failed run (chained to the first error).
    With ``share_first_stage``, a new run of a method whose first stage is another's copies it
    from a run of this grid that finished before (:func:`first_stage_source`).
    """
    from aimm.engine import run
    from aimm.errors import RunDirError
    from aimm.notebook.study import write_study_index
    from aimm.study.runner import in_use
    from aimm.training.shared_stage import first_stage_source

    p = params if isinstance(params, NotebookParams) else validate_parameters(params)
    cfgs = configs(p)
    if write_index:
        write_study_index(p, cfgs)
    done: dict[str, Path] = {}
    failed: dict[str, BaseException] = {}
    bar = None
    if p.interactive:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cfgs), desc="runs")
    for cfg in cfgs:
        if bar is not None:
            bar.set_postfix_str(cfg.run_id)
        else:
            print(f"training {cfg.run_id} -> {cfg.run_dir}", flush=True)
        try:
            if in_use(Path(cfg.run_dir)):
                raise RunDirError(f"{cfg.run_dir} is in use by another process")
            callbacks = callbacks_factory(cfg) if callbacks_factory else []
            source = first_stage_source(cfg, done.values()) if p.share_first_stage else None
            if source is not None:
                print(f"{cfg.run_id}: first stage copied from {source.name} (the same training)",
                      flush=True)
            done[cfg.run_id] = Path(run(cfg, callbacks=callbacks, first_stage_from=source))
        except RunDirError as exc:
            if "in use" not in str(exc):
                failed[cfg.run_id] = exc
            print(f"run {cfg.run_id}: {'in use' if 'in use' in str(exc) else 'failed'} ({exc}); "
                  "going on with the others", flush=True)
        except Exception as exc:  # one failed run does not stop the grid (reported below)
            failed[cfg.run_id] = exc
            print(f"run {cfg.run_id}: failed ({type(exc).__name__}: {exc}); going on with the "
                  "others", flush=True)
        if write_index:
            write_runs_index(p, done)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if failed:
        lines = "; ".join(f"{k}: {type(e).__name__}: {e}" for k, e in failed.items())
        raise RuntimeError(f"{len(failed)} of {len(cfgs)} runs failed ({lines}); fix the cause and "
                           "re-run: finished runs are only read") from next(iter(failed.values()))
    return done


def plan_table(params: NotebookParams):
    """One row per planned run: what it trains and whether its run dir already holds stages."""
    import pandas as pd

    rows = []
    for cfg in configs(params):
        state = Path(cfg.run_dir) / "state.json"
        done = len(json.loads(state.read_text(encoding="utf-8")).get("completed", [])) \
            if state.is_file() else 0
        rows.append({"run": cfg.run_id, "method": cfg.method, "seed": cfg.seed,
                     "order": "custom" if cfg.tasks else cfg.order, "model": cfg.model,
                     "tasks": " → ".join(cfg.task_names()), "max_train": cfg.max_train,
                     "max_test": cfg.max_test, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                     "record_forgetting_signal": cfg.record_forgetting_signal,
                     "method_options": json.dumps(cfg.method_options) if cfg.method_options else "",
                     "stages_done": done, "run_dir": cfg.run_dir})
    return pd.DataFrame(rows)


def training_callbacks(params: NotebookParams) -> Callable[[RunConfig], list]:
    """The ``callbacks_factory`` of notebook 02.

    Interactive: a :class:`aimm.plots.LiveTrainingPlot` per run, displayed when the run starts
    (kept in ``factory.live[label]``). Headless (papermill): one printed line per stage.
    """
    live: dict[str, Any] = {}

    def factory(cfg: RunConfig) -> list:
        if not params.interactive:
            return [stage_ended_printer(cfg.run_id)]
        from IPython.display import display

        from aimm import plots

        plot = plots.LiveTrainingPlot(every=5, title=cfg.run_id)
        live[cfg.run_id] = plot
        display(plot.widget)
        return [plot]

    factory.live = live  # type: ignore[attr-defined]
    return factory


def write_runs_index(params: NotebookParams, runs: dict[str, Path]) -> Path:
    from aimm.runs import atomic_write_json

    path = params.out_dir / "runs.json"
    atomic_write_json(path, {label: str(d) for label, d in runs.items()})
    return path


def load_runs(params: NotebookParams) -> dict[str, Path]:
    """The runs of these parameters: ``runs.json`` of notebook 02, else the existing run dirs."""
    path = params.out_dir / "runs.json"
    if path.is_file():
        runs = {k: Path(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    else:
        runs = run_dirs(params)
    found = {k: v for k, v in runs.items() if (v / "config.json").is_file()}
    if not found:
        raise FileNotFoundError(
            f"no trained runs found (looked for {path} and the run directories under "
            f"{params.group_dir}); "
            "run notebook 02 first")
    return found


def run_method(run_dir: str | Path) -> str:
    from aimm.runs import load_config

    return load_config(run_dir)["method"]


def runs_of(runs: dict[str, Path], method: str) -> dict[str, Path]:
    return {k: v for k, v in runs.items() if run_method(v) == method}


def display_labels(runs: dict[str, Path]) -> dict[str, Path]:
    """Legend labels: the method name when it has one run, else ``<method>-s<seed>``."""
    methods = [run_method(d) for d in runs.values()]
    return {(m if methods.count(m) == 1 else label): d
            for (label, d), m in zip(runs.items(), methods)}


def stage_ended_printer(label: str):
    """An engine callback printing one line per finished stage (the static, papermill path)."""

    class _Printer:
        def on_stage_end(self, stage, rows) -> None:
            scores = ", ".join(f"{r['eval_task']}={r['score']:.3f}" for r in rows)
            print(f"[{label}] after {stage.name}: {scores}", flush=True)

    return _Printer()


__all__ = [
    "display_labels", "load_runs", "plan_table", "run_method", "runs_of", "stage_ended_printer",
    "train_all", "training_callbacks", "write_runs_index",
]
