"""Glue between the notebooks (01 -> 04) and the package: parameters, runs, tables, explorer.

The four notebooks share one parameters cell (papermill's ``parameters`` tag) whose first line
is ``_before = set(globals())``; after it (and papermill's injected cell)
``workflow.notebook_parameters(globals(), _before)`` collects the parameters, so a mistyped name
passed by papermill is caught too, and :func:`validate_parameters` checks them all before
anything is trained::

    params = workflow.validate_parameters(workflow.notebook_parameters(globals(), _before))

Run layout: ``<run_root>/<run_name>/<method>-s<seed>/`` (one engine run directory each) and the
notebooks' outputs (``runs.json``, ``data_stats.csv``, ``metrics.csv``, ``metrics.md``) in
``output_dir`` (default ``<run_root>/<run_name>``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from aimm.config import ConfigError, RunConfig


def chdir_to_project() -> Path:
    """Work from the project root when a notebook runs in its ``notebooks/`` folder (JupyterLab
    starts kernels there), so that relative paths (``runs``, ``Fig``, ``data/aimm``) mean the same
    as under ``aimm reproduce`` and the CLI. Returns the working directory."""
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "pyproject.toml").is_file() \
            and (cwd.parent / "aimm").is_dir():
        os.chdir(cwd.parent)
    return Path.cwd()


# ------------------------------------------------------------------------------------------
# parameters


#: What ``smoke=True`` switches to: the tiny random model and tiny sizes (tests, quick checks).
SMOKE_MODEL = "tiny-causal"
SMOKE_SIZES: dict[str, Any] = {"max_train": 16, "max_test": 4, "epochs": 1}
SMOKE_EXTRA: dict[str, Any] = {"batch_size": 4, "max_input_len": 64, "eval_batch_size": 8,
                               "memory_batch_size": 4, "buffer_fraction": 0.25, "lr": 1e-3,
                               "warmup_steps": 0}


def method_defaults(method: str) -> dict[str, Any]:
    """RunConfig fields set per method unless given in ``extra``: sequential methods that do not
    merge (seq_lora, replay) record the forgetting signal (history loss), so notebook 03 can
    compare it with a merging method's."""
    from aimm.methods import METHODS

    cls = METHODS.get(method)
    return {"probe_history": True} if cls and cls.sequential() and not cls.merges else {}


def _method_fact(method: str, fact: str) -> Any:
    from aimm.methods import METHODS

    cls = METHODS.get(method)
    return getattr(cls, fact) if cls is not None else None
#: RunConfig fields that NotebookParams sets itself; ``extra`` may not hold them.
OWN_FIELDS = ("benchmark", "order", "tasks", "method", "method_options", "model", "max_train",
              "max_test", "epochs", "seed", "run_dir", "run_id", "data_dir")


@dataclass
class NotebookParams:
    """The parameters shared by notebooks 01-04 (validated by :func:`validate_parameters`)."""

    benchmark: str = "standard_cl"
    order: int | None = 1
    tasks: list[str] | None = None  # custom task order (overrides order)
    methods: list[str] = field(default_factory=lambda: ["seq_lora", "aimmerging"])
    model: str = "smollm2-135m"
    max_train: int | None = 64
    max_test: int | None = 40
    epochs: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [42])
    run_root: str = "runs"
    run_name: str = "notebooks"
    data_dir: str | None = None
    smoke: bool = False
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # further RunConfig fields
    # notebook behaviour
    interactive: bool = True  # papermill passes False: static figures, no widgets, no bars
    output_dir: str | None = None  # default <run_root>/<run_name>
    fig_dir: str = "Fig"  # where notebooks 01, 03 and 04 export their figures
    fig_formats: list[str] = field(default_factory=lambda: ["html", "png", "pdf", "svg"])
    raw_data_dir: str | None = None  # notebook 01: raw O-LoRA/Instances data to convert

    # -------------------------------------------------------------------- derived
    @property
    def group_dir(self) -> Path:
        return Path(self.run_root) / self.run_name

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else self.group_dir

    def task_names(self) -> list[str]:
        from aimm.data import resolve_order

        return resolve_order(self.benchmark, None if self.tasks else self.order, self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# expected types per field: (check, description)
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "benchmark": (lambda v: isinstance(v, str), "a string"),
    "order": (_opt(_is_int), "an integer or None"),
    "tasks": (_opt(lambda v: _str_list(v) and len(v) > 0), "a non-empty list of task names or None"),
    "methods": (lambda v: _str_list(v) and len(v) > 0, "a non-empty list of method names"),
    "model": (lambda v: isinstance(v, str) and bool(v), "a model spec string"),
    "max_train": (_opt(lambda v: _is_int(v) and v > 0), "a positive integer or None (all)"),
    "max_test": (_opt(lambda v: _is_int(v) and v > 0), "a positive integer or None (all)"),
    "epochs": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "seeds": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0
              and all(_is_int(s) and s >= 0 for s in v), "a non-empty list of integers >= 0"),
    "run_root": (lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "", "a path"),
    "run_name": (lambda v: isinstance(v, str) and v != "" and "/" not in v and v not in (".", ".."),
                 "a folder name"),
    "data_dir": (_opt(lambda v: isinstance(v, (str, os.PathLike))), "a path or None"),
    "smoke": (lambda v: isinstance(v, bool), "True or False"),
    "method_options": (lambda v: isinstance(v, dict) and all(isinstance(o, dict) for o in v.values()),
                       "a dict {method: {option: value}}"),
    "extra": (lambda v: isinstance(v, dict), "a dict {RunConfig field: value}"),
    "interactive": (lambda v: isinstance(v, bool), "True or False"),
    "output_dir": (_opt(lambda v: isinstance(v, (str, os.PathLike))), "a path or None"),
    "fig_dir": (lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "", "a path"),
    "raw_data_dir": (_opt(lambda v: isinstance(v, (str, os.PathLike))), "a path or None"),
    "fig_formats": (lambda v: _str_list(v) and all(f in FIG_FORMATS for f in v),
                    "a list of formats from html, png, pdf, svg, jpg, webp (empty: no export)"),
}

FIG_FORMATS = ("html", "png", "pdf", "svg", "jpg", "jpeg", "webp")
PARAMETER_NAMES = tuple(f.name for f in dataclasses.fields(NotebookParams))
assert set(_TYPES) == set(PARAMETER_NAMES)


def _hint(name: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def notebook_parameters(namespace: dict[str, Any], before: Iterable[str]) -> dict[str, Any]:
    """The parameters a notebook defined: every known parameter name found in ``namespace``,
    plus any other public name that did not exist in ``before`` (the names before the
    parameters cell), so that a mistyped name, e.g. one passed by papermill, is reported.

    Private names (``_x``), modules, callables and IPython's own (``In``, ``Out``) are ignored.
    """
    import types

    before = set(before)
    found = {k: namespace[k] for k in PARAMETER_NAMES if k in namespace}
    for k, v in namespace.items():
        if (k in found or k in before or k.startswith("_") or k in ("In", "Out", "exit", "quit")
                or isinstance(v, (types.ModuleType, type)) or callable(v)):
            continue
        found[k] = v
    return found


def validate_parameters(params: dict[str, Any] | NotebookParams) -> NotebookParams:
    """Check notebook parameters; raise :class:`ConfigError` naming every problem.

    Unknown names and methods come with the closest match; wrong types name the expected type.
    Then the RunConfig of every method x seed is built (and so validated, method options
    included) before anything is trained.
    """
    if isinstance(params, NotebookParams):
        params = params.to_dict()
    if not isinstance(params, dict):
        raise ConfigError(f"parameters must be a dict, not {type(params).__name__}")
    errors: list[str] = []
    for key in params:
        if key not in PARAMETER_NAMES:
            errors.append(f"unknown parameter '{key}'{_hint(key, PARAMETER_NAMES)}; "
                          f"parameters: {', '.join(PARAMETER_NAMES)}")
    for key, value in params.items():
        if key in _TYPES and not _TYPES[key][0](value):
            errors.append(f"{key}={value!r}: must be {_TYPES[key][1]}")
    if errors:
        raise ConfigError("\n".join(errors))

    from aimm.methods import METHODS

    values = dict(params)
    for key in ("methods", "seeds", "tasks", "fig_formats"):
        if isinstance(values.get(key), tuple):
            values[key] = list(values[key])
    for key in ("run_root", "data_dir", "output_dir", "fig_dir", "raw_data_dir"):
        if isinstance(values.get(key), os.PathLike):
            values[key] = os.fspath(values[key])
    p = NotebookParams(**values)
    for m in p.methods:
        if m not in METHODS:
            errors.append(f"methods: unknown method '{m}'{_hint(m, METHODS)}; "
                          f"choose from {', '.join(METHODS)}")
    if len(set(p.methods)) != len(p.methods):
        errors.append(f"methods: {p.methods!r} lists a method twice")
    if len(set(p.seeds)) != len(p.seeds):
        errors.append(f"seeds: {p.seeds!r} lists a seed twice")
    for m in p.method_options:
        if m not in p.methods:
            errors.append(f"method_options: '{m}' is not one of methods {p.methods}"
                          f"{_hint(m, p.methods)}")
    names = RunConfig.field_names()
    for key in p.extra:
        if key in OWN_FIELDS:
            errors.append(f"extra: '{key}' is set by its own parameter"
                          f"{_hint(key, PARAMETER_NAMES)}, not in extra")
        elif key not in names:
            errors.append(f"extra: unknown RunConfig field '{key}'{_hint(key, names)}")
    if errors:
        raise ConfigError("\n".join(errors))
    configs(p)  # every method's RunConfig, validated up front
    return p


# ------------------------------------------------------------------------------------------
# configurations and training


def label_for(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def run_values(p: NotebookParams, method: str, seed: int) -> dict[str, Any]:
    """The RunConfig fields of one method x seed run (smoke sizes and method defaults applied)."""
    model, sizes = p.model, {"max_train": p.max_train, "max_test": p.max_test, "epochs": p.epochs}
    extra: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if p.smoke:
        model = SMOKE_MODEL
        sizes = dict(SMOKE_SIZES)
        extra.update(SMOKE_EXTRA)
        options.update(_method_fact(method, "smoke_options") or {})  # a merge in a 4-step task
    extra.update(method_defaults(method))
    extra.update(p.extra)
    options.update(p.method_options.get(method, {}))
    values: dict[str, Any] = {
        "benchmark": p.benchmark, "order": p.order, "tasks": list(p.tasks) if p.tasks else None,
        "data_dir": p.data_dir, "model": model, **sizes, "method": method,
        "method_options": options, "seed": seed,
        "run_dir": str(p.group_dir / label_for(method, seed)), "run_id": label_for(method, seed),
        "progress": p.interactive,
    }
    values.update(extra)
    return values


def configs(params: NotebookParams | dict[str, Any]) -> list[RunConfig]:
    """One validated RunConfig per method x seed (methods outer, seeds inner)."""
    from aimm.methods import build_method

    p = params if isinstance(params, NotebookParams) else validate_parameters(params)
    out = []
    for method in p.methods:
        for seed in p.seeds:
            try:
                cfg = RunConfig.from_dict(run_values(p, method, seed),
                                          source=f"{label_for(method, seed)}")
                build_method(cfg, source=label_for(method, seed))
                out.append(cfg)
            except (ConfigError, TypeError) as exc:
                raise ConfigError(str(exc)) from exc
    return out


def run_dirs(params: NotebookParams | dict[str, Any]) -> dict[str, Path]:
    """label (``<method>-s<seed>``) -> run directory, whether it exists yet or not."""
    return {cfg.run_id: Path(cfg.run_dir) for cfg in configs(params)}


def train_all(params: NotebookParams | dict[str, Any],
              callbacks_factory: Callable[[RunConfig], list] | None = None,
              write_index: bool = True) -> dict[str, Path]:
    """Train (or resume) every method x seed; returns label -> run dir.

    ``callbacks_factory(cfg)`` gives the engine callbacks of one run (a live plot, ...).
    The index is written as ``runs.json`` into the output dir after every run, so a later
    notebook can read what finished even if training is interrupted.
    """
    from aimm.engine import run

    p = params if isinstance(params, NotebookParams) else validate_parameters(params)
    cfgs = configs(p)
    done: dict[str, Path] = {}
    bar = None
    if p.interactive:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cfgs), desc="runs")
    for cfg in cfgs:
        if bar is not None:
            bar.set_postfix_str(cfg.run_id)
        else:
            print(f"training {cfg.run_id} -> {cfg.run_dir}", flush=True)
        callbacks = callbacks_factory(cfg) if callbacks_factory else []
        done[cfg.run_id] = Path(run(cfg, callbacks=callbacks))
        if write_index:
            write_runs_index(p, done)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return done


def plan_table(params: NotebookParams):
    """One row per planned run: what it trains and whether its run dir already holds stages."""
    import pandas as pd

    rows = []
    for cfg in configs(params):
        state = Path(cfg.run_dir) / "state.json"
        done = len(json.loads(state.read_text(encoding="utf-8")).get("completed", [])) \
            if state.is_file() else 0
        rows.append({"run": cfg.run_id, "method": cfg.method, "seed": cfg.seed, "model": cfg.model,
                     "tasks": " → ".join(cfg.task_names()), "max_train": cfg.max_train,
                     "max_test": cfg.max_test, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                     "probe_history": cfg.probe_history,
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
            f"no trained runs found (looked for {path} and {params.group_dir}/<method>-s<seed>); "
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


# ------------------------------------------------------------------------------------------
# notebook 01: data


def tokenizer_for(model: str):
    """The tokenizer of a model spec without loading the model's weights."""
    from aimm.models import SMOLLM2_ALIAS, TINY_SPECS, load_tokenizer, resolve_model_path, \
        smollm2_tokenizer_dir

    if model in TINY_SPECS or model == SMOLLM2_ALIAS:
        return load_tokenizer(smollm2_tokenizer_dir())
    return load_tokenizer(resolve_model_path(model))


def find_or_convert_data(data_dir: str | None = None, raw_data_dir: str | None = None,
                         target: str | Path = Path("data") / "aimm") -> Path:
    """The benchmark folder: :func:`aimm.data.resolve_data_dir`, or ``raw_data_dir`` converted
    into ``target`` (release layout) when none is found."""
    from aimm.data import convert_benchmark, resolve_data_dir

    try:
        return resolve_data_dir(data_dir)
    except FileNotFoundError:
        if raw_data_dir is None:
            raise
    convert_benchmark(raw_data_dir, target)
    return Path(target)


def read_splits(data_dir: str | Path, benchmark: str, tasks: list[str]) -> dict[str, dict[str, list]]:
    """task -> split -> examples (every split file that exists; validated records)."""
    from aimm.data import SPLITS, read_records, task_file_path

    out: dict[str, dict[str, list]] = {}
    for task in tasks:
        out[task] = {}
        for split in SPLITS:
            path = task_file_path(data_dir, benchmark, split, task)
            if path.is_file():
                out[task][split] = read_records(path)
    return out


GENERATION_LABEL = "(free text)"


def check_data(data_root: str | Path, tasks: Iterable[str] = (), show: int = 20):
    """:func:`aimm.data.inspect_benchmark` with a printed summary: the warnings about ``tasks``
    (those trained) first, at most ``show`` lines. Raises :class:`aimm.data.DataError` with every
    error line when the folder is invalid."""
    import re

    from aimm.data import DataError, inspect_benchmark

    report = inspect_benchmark(data_root)
    print(f"{data_root}: {report.n_files} files, {report.n_records} records, "
          f"{len(report.warnings)} warning(s), {len(report.errors)} error(s)")
    names = [re.escape(t) for t in tasks]
    pattern = re.compile(r"(^|[/'\s])(" + "|".join(names) + r")([_:'\s]|$)") if names else None
    ours = [w for w in report.warnings if pattern and pattern.search(w)]
    rest = [w for w in report.warnings if w not in ours]
    for line in (ours + rest)[:show]:
        print(f"  warning: {line}")
    if len(report.warnings) > show:
        print(f"  ... and {len(report.warnings) - show} more warning(s) "
              f"({len(ours)} about the tasks of this run)")
    if report.errors:
        raise DataError(report.errors)
    return report


def data_statistics(tasks_data: dict[str, Any], tokenizer, max_tokenized: int | None = 1000,
                    seed: int = 0):
    """Label counts and token lengths of a benchmark's tasks.

    ``tasks_data``: task -> {split: [Example]} (see :func:`read_splits`) or task ->
    :class:`aimm.data.TaskData` (its train and test lists). Returns ``(stats_df, lengths_df)``:
    ``stats_df[task, split, label, count]`` (label = the output string; all outputs of a
    generation task count as one label, ``"(free text)"``) and
    ``lengths_df[task, split, tokens, target_tokens]`` (prompt and target lengths with
    ``tokenizer``, on at most ``max_tokenized`` examples per split).
    """
    import random
    from collections import Counter

    import pandas as pd

    from aimm.data import is_classification_like

    stats, lengths = [], []
    for task, data in tasks_data.items():
        splits = data if isinstance(data, dict) else {"train": data.train, data.test_split: data.test}
        generation = not is_classification_like(
            e.output for examples in splits.values() for e in examples)
        for split, examples in splits.items():
            outputs = (GENERATION_LABEL if generation else e.output for e in examples)
            for label, count in sorted(Counter(outputs).items()):
                stats.append({"task": task, "split": split, "label": label, "count": count})
            sample = list(examples)
            if max_tokenized is not None and len(sample) > max_tokenized:
                sample = random.Random(seed).sample(sample, max_tokenized)
            if not sample:
                continue
            prompts = tokenizer([e.input for e in sample], add_special_tokens=False)["input_ids"]
            targets = tokenizer([e.output for e in sample], add_special_tokens=False)["input_ids"]
            lengths.extend({"task": task, "split": split, "tokens": len(a), "target_tokens": len(b)}
                           for a, b in zip(prompts, targets))
    stats_df = pd.DataFrame(stats, columns=["task", "split", "label", "count"])
    lengths_df = pd.DataFrame(lengths, columns=["task", "split", "tokens", "target_tokens"])
    return stats_df, lengths_df


def summary_table(stats_df, lengths_df, max_input_len: int | None = None):
    """One row per task x split: examples, distinct labels, token length mean / p95 / max
    (and the share of prompts longer than ``max_input_len``, which training truncates)."""
    import pandas as pd

    sizes = stats_df.groupby(["task", "split"], sort=False)["count"].agg(
        examples="sum", labels="count")
    tok = lengths_df.groupby(["task", "split"], sort=False)["tokens"]
    table = sizes.join(pd.DataFrame({
        "tokens_mean": tok.mean().round(1), "tokens_p95": tok.quantile(0.95).round(0),
        "tokens_max": tok.max(),
        "target_tokens_max": lengths_df.groupby(["task", "split"], sort=False)["target_tokens"].max(),
    }))
    if max_input_len:
        table[f"over_{max_input_len}"] = (lengths_df.assign(over=lengths_df["tokens"] > max_input_len)
                                          .groupby(["task", "split"], sort=False)["over"].mean()
                                          .round(3))
    return table.reset_index()


# ------------------------------------------------------------------------------------------
# notebook 04: metrics


def trajectory_figures(runs: dict[str, Path], merging_method: str = "aimmerging",
                       baseline_method: str = "seq_lora") -> dict[str, dict[str, Any]]:
    """Notebook 03's figures (spec §10) for every task after the first:
    ``{"signals": {...}, "interval": {...}, "history_loss": {...}}``, keyed by file stem.

    Signals and interval come from the first ``merging_method`` run; the history-loss panels put
    the first ``baseline_method`` run (trained with ``probe_history``) against it, with linear
    fits. Sections without the runs they need are empty.
    """
    from aimm import plots
    from aimm.plots.theme import safe_key

    out: dict[str, dict[str, Any]] = {"signals": {}, "interval": {}, "history_loss": {}}
    first = {m: next(iter(runs_of(runs, m).values()), None) for m in (baseline_method, merging_method)}
    data = {m: plots.load_run_data(d) for m, d in first.items() if d is not None}
    if not data:
        return out
    merging = data.get(merging_method)
    for task in (merging or data[baseline_method]).tasks[1:]:
        key = safe_key(task)
        if merging is not None:
            out["signals"][f"signals_{key}"] = plots.signals_figure(
                merging.steps, merging.merges, task,
                title=f"{plots.method_label(merging_method)}: {task}")
            out["interval"][f"interval_{key}"] = plots.interval_figure(
                merging.steps, merging.merges, task, title=f"Merge interval: {task}")
        out["history_loss"][f"history_loss_{key}"] = plots.history_loss_figure(
            {m: r.steps for m, r in data.items()}, task, title=f"History loss: {task}")
    return out


def result_figures(runs: dict[str, Path], metrics: Any = None) -> dict[str, Any]:
    """Notebook 04's figures, keyed by file stem: ``heatmap_<label>`` per run, ``task1_curve``
    (score on task 1 after each task; the Multi-task line from an ``mtl`` run) and
    ``metrics_bars`` (from ``metrics``, a :func:`metrics_table`, else each run's metrics.json)."""
    from aimm import plots
    from aimm.plots.builders import NOT_SEQUENTIAL, is_joint, multitask_score
    from aimm.plots.theme import safe_key

    labels = display_labels(runs)
    data = {label: plots.load_run_data(d) for label, d in labels.items()}
    figs: dict[str, Any] = {
        f"heatmap_{safe_key(label)}": plots.scores_heatmap(
            r.matrix, title=f"{plots.method_label(label)}: scores[j][i]")
        for label, r in data.items()}
    sequential = {lab: r.matrix for lab, r in data.items()
                  if r.method not in NOT_SEQUENTIAL and not r.matrix.empty}
    first = next((m.columns[0] for m in sequential.values() if len(m.columns)), None)
    mtl = next((r for r in data.values() if is_joint(r.method) and not r.matrix.empty), None)
    figs["task1_curve"] = plots.task1_figure(
        sequential, multitask=multitask_score(mtl, first) if mtl is not None else None,
        title=f"Score on the first task ({first})")
    if metrics is None:
        bars = {lab: r.metrics for lab, r in data.items() if r.metrics}
    else:
        table = metrics.set_index("run")
        inverse = {str(d): lab for lab, d in labels.items()}
        bars = {inverse.get(str(runs[r]), r): {k: table.loc[r, k] for k in ("OP", "BWT", "FWT", "forgetting")}
                for r in table.index if r in runs}
    figs["metrics_bars"] = plots.metrics_bars(bars, title="Continual-learning metrics")
    return figs


def metrics_table(runs: dict[str, Path]):
    """One row per run: method, seed, stages done, OP, BWT, FWT, forgetting, merges.

    FWT is filled from a ``single_task`` run among ``runs`` (same seed if there is one) for the
    sequential methods; ``mtl`` has OP only.
    """
    import pandas as pd

    from aimm.metrics import fwt
    from aimm.plots.builders import NOT_SEQUENTIAL
    from aimm.runs import load_config, load_metrics, load_scores_matrix

    singles: dict[int, list[float]] = {}
    infos = {}
    for label, d in runs.items():
        cfg = load_config(d)
        m = load_metrics(d) if (Path(d) / "metrics.json").is_file() else {}
        infos[label] = (cfg, m)
        if _method_fact(cfg["method"], "fresh_adapter_per_stage") and m.get("single_task"):
            singles[cfg["seed"]] = list(m["single_task"].values())
    rows = []
    for label, d in runs.items():
        cfg, m = infos[label]
        fwt_value = m.get("FWT")
        if fwt_value is None and singles and cfg["method"] not in NOT_SEQUENTIAL \
                and m.get("complete"):
            single = singles.get(cfg["seed"]) or next(iter(singles.values()))
            matrix = load_scores_matrix(d)
            try:
                fwt_value = fwt(matrix.to_numpy(), single)
            except (ValueError, IndexError):
                fwt_value = None
        merges = m.get("merges_per_stage") or {}
        rows.append({"run": label, "method": cfg["method"], "seed": cfg["seed"],
                     "stages_done": m.get("stages_done"), "complete": m.get("complete"),
                     "OP": m.get("OP"), "BWT": m.get("BWT"), "FWT": fwt_value,
                     "forgetting": m.get("forgetting"), "merges": sum(merges.values())})
    return pd.DataFrame(rows)


def to_markdown(df, floatfmt: str = ".4f") -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    import math

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() else format(v, floatfmt).rstrip("0").rstrip(".")
        return str(v).replace("|", "\\|")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(df, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """``<name>.csv`` and ``<name>.md`` in ``out_dir``."""
    from aimm.runs import atomic_write_text

    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    atomic_write_text(csv_path, df.to_csv(index=False))
    atomic_write_text(md_path, to_markdown(df))
    return csv_path, md_path


def export_all(figures: dict[str, Any], fig_dir: str | Path, formats: Iterable[str] | None = None,
               prefix: str = "", width: str | None = None) -> list[Path]:
    """Export each figure as ``<fig_dir>/<prefix><name>.<fmt>`` (:func:`aimm.plots.export_figures`,
    the many-figure form of :func:`aimm.plots.export`: one browser start). ``formats`` empty:
    nothing is written. Returns the files written."""
    from aimm import plots

    formats = list(("html", "png", "pdf", "svg") if formats is None else formats)
    if not formats or not figures:
        return []
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    named = {f"{prefix}{name}": fig for name, fig in figures.items()}
    written = plots.export_figures(named, fig_dir, formats=formats, width=width)
    return [p for paths in written.values() for p in paths]


# ------------------------------------------------------------------------------------------
# notebook 03: the explorer (ipywidgets; optional)

SIGNALS = ("history_loss", "loss", "lr", "threshold", "interval", "activations", "lambda")


def experiments(run_root: str | Path) -> dict[str, dict[str, Path]]:
    """Saved runs under ``run_root``: experiment (folder of runs) -> label -> run dir."""
    root = Path(run_root)
    out: dict[str, dict[str, Path]] = {}
    for cfg in sorted(root.glob("*/config.json")) + sorted(root.glob("*/*/config.json")):
        run = cfg.parent
        group = run.parent
        name = "." if group == root else str(group.relative_to(root))
        out.setdefault(name, {})[run.name] = run
    return out


def run_explorer(run_root: str | Path, initial: tuple[str, str] | None = None):
    """Dropdowns (run / method / task / signal) and a step-range slider over saved runs,
    redrawing a plotly FigureWidget. Returns the ``ipywidgets.VBox`` (its ``.figure``,
    ``.controls`` attributes hold the parts)."""
    import ipywidgets as W
    import plotly.graph_objects as go

    from aimm.runs import load_trajectory

    groups = experiments(run_root)
    if not groups:
        raise FileNotFoundError(f"{run_root}: no saved runs")
    cache: dict[Path, tuple] = {}

    def trajectory(path: Path):
        if path not in cache:
            cache[path] = load_trajectory(path)
        return cache[path]

    group0 = initial[0] if initial and initial[0] in groups else next(iter(groups))
    style, width = {"description_width": "56px"}, W.Layout(width="250px")
    run_dd = W.Dropdown(options=list(groups), value=group0, description="run", style=style,
                        layout=width)
    method_dd = W.Dropdown(options=list(groups[group0]), description="method", style=style,
                           layout=width)
    if initial and initial[1] in groups[group0]:
        method_dd.value = initial[1]
    task_dd = W.Dropdown(description="task", style=style, layout=width)
    signal_dd = W.Dropdown(description="signal", style=style, layout=width)
    slider = W.IntRangeSlider(description="steps", min=0, max=1, value=(0, 1), style=style,
                              continuous_update=False, layout=W.Layout(width="420px"))
    fig = go.FigureWidget()
    fig.update_layout(height=360, margin=dict(l=60, r=20, t=40, b=50), template="plotly_white",
                      xaxis_title="step", showlegend=False)
    busy = {"on": False}  # widget callbacks fire while we set options: ignore those

    @contextlib.contextmanager
    def updating():
        busy["on"] = True
        try:
            yield
        finally:
            busy["on"] = False

    def unless_updating(fn):
        """A widget callback that does nothing while we are setting options ourselves."""
        def callback(*_):
            if not busy["on"]:
                fn()
        return callback

    def current():
        return trajectory(groups[run_dd.value][method_dd.value])

    def refresh_methods(*_):
        with updating():
            method_dd.options = list(groups[run_dd.value])
        refresh_tasks()

    @unless_updating
    def refresh_tasks():
        with updating():
            steps, _ = current()
            tasks = list(dict.fromkeys(steps["task"])) if not steps.empty else []
            task_dd.options = tasks
            if tasks:
                task_dd.value = tasks[-1]
        refresh_signals()

    @unless_updating
    def refresh_signals():
        with updating():
            steps, merges = current()
            t_steps = steps[steps["task"] == task_dd.value] if not steps.empty else steps
            available = [s for s in SIGNALS
                         if s != "lambda" and s in t_steps and t_steps[s].notna().any()]
            if not merges.empty and "lambda" in merges and (merges["task"] == task_dd.value).any():
                available.append("lambda")
            keep = signal_dd.value
            signal_dd.options = available or ["loss"]
            signal_dd.value = keep if keep in signal_dd.options else signal_dd.options[0]
            n = int(t_steps["step"].max()) if not t_steps.empty else 1
            slider.max = max(n, 1)
            slider.min = 1 if n >= 1 else 0
            slider.value = (slider.min, slider.max)
        redraw()

    @unless_updating
    def redraw():
        steps, merges = current()
        sig, task = signal_dd.value, task_dd.value
        lo, hi = slider.value
        src = merges if sig == "lambda" else steps
        if src.empty or sig not in src:
            x, y = [], []
        else:
            d = src[(src["task"] == task) & (src["step"] >= lo) & (src["step"] <= hi)]
            d = d[d[sig].notna()]
            x, y = d["step"].tolist(), d[sig].tolist()
        with fig.batch_update():
            fig.data = []
            fig.add_scatter(x=x, y=y, mode="lines+markers" if sig == "lambda" else "markers",
                            marker=dict(size=5), name=sig)
            if sig != "lambda" and not merges.empty and (merges["task"] == task).any():
                m = merges[(merges["task"] == task) & (merges["step"] >= lo) & (merges["step"] <= hi)]
                fig.layout.shapes = [dict(type="line", xref="x", yref="paper", x0=s, x1=s, y0=0,
                                          y1=1, line=dict(color="rgba(200,0,0,0.25)", dash="dot"))
                                     for s in m["step"]]
            else:
                fig.layout.shapes = []
            fig.layout.title = f"{method_dd.value} · {task} · {sig}"
            fig.layout.yaxis.title = sig

    run_dd.observe(refresh_methods, "value")
    method_dd.observe(refresh_tasks, "value")
    task_dd.observe(refresh_signals, "value")
    signal_dd.observe(redraw, "value")
    slider.observe(redraw, "value")
    refresh_tasks()
    controls = W.HBox([W.VBox([run_dd, method_dd]), W.VBox([task_dd, signal_dd]), slider])
    box = W.VBox([controls, fig])
    box.figure, box.controls = fig, {"run": run_dd, "method": method_dd, "task": task_dd,
                                     "signal": signal_dd, "steps": slider}
    return box


__all__ = [
    "FIG_FORMATS", "NotebookParams", "PARAMETER_NAMES", "SMOKE_MODEL", "chdir_to_project",
    "check_data", "configs", "data_statistics", "display_labels", "experiments", "export_all",
    "find_or_convert_data", "label_for", "load_runs", "metrics_table", "notebook_parameters",
    "plan_table", "read_splits", "result_figures", "run_dirs", "run_explorer", "run_method",
    "runs_of", "stage_ended_printer", "summary_table", "to_markdown", "tokenizer_for",
    "train_all", "training_callbacks", "trajectory_figures",
    "validate_parameters", "write_runs_index", "write_table",
]
