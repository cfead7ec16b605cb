"""Notebook parameters: the shared parameters cell, their validation and the runs they plan.

The four notebooks share one parameters cell (papermill's ``parameters`` tag) whose first line
is ``_before = set(globals())``; after it (and papermill's injected cell)
``notebook.notebook_parameters(globals(), _before)`` collects the parameters, so a mistyped name
passed by papermill is caught too, and :func:`validate_parameters` checks them all before
anything is trained::

    params = notebook.validate_parameters(notebook.notebook_parameters(globals(), _before))

Run layout: ``<run_root>/<run_name>/<method>-s<seed>/`` (one engine run directory each; with an
``orders`` list the grid's cells are named as :mod:`aimm.study`'s, ``<method>-o<order>-s<seed>``)
and the notebooks' outputs (``runs.json``, ``runs.csv``, ``data_stats.csv``, ``metrics.csv``,
``summary.csv``, ...) in ``output_dir`` (default ``<run_root>/<run_name>``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from aimm.config import RunConfig
from aimm.errors import ConfigError
from aimm.names import is_valid_name
from aimm.study.grid import cell_name
from aimm.util import did_you_mean as _hint
from aimm.util import is_int as _is_int
from aimm.util import is_num as _is_num

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
    return {"record_forgetting_signal": True} if cls and cls.sequential() and not cls.merges else {}


def method_fact(method: str, fact: str) -> Any:
    """A class attribute of the registered method ``method`` (None for an unknown name)."""
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
    orders: list[int] | None = None  # a grid over several orders of the benchmark (None: `order`)
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
    # a method whose first stage is seq_lora's (its first_stage_as) copies that stage from the
    # grid's finished seq_lora run of the same seed and order (aimm.training.shared_stage);
    # False: every run trains every stage (e.g. to time each method on its own)
    share_first_stage: bool = True
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
        """The tasks of ``order`` (or ``tasks``; with an ``orders`` grid: of its first order)."""
        from aimm.data.orders import task_sequence

        order = self.orders[0] if self.orders else self.order
        return task_sequence(self.benchmark, order, None if self.orders else self.tasks)

    def grid_orders(self) -> list[int | None]:
        """The orders of the grid: ``orders``, else ``[None]`` (the one ``order`` or ``tasks``)."""
        return list(self.orders) if self.orders else [None]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# expected types per field: (check, description)
def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "benchmark": (lambda v: isinstance(v, str), "a string"),
    "order": (_opt(_is_int), "an integer or None"),
    "tasks": (_opt(lambda v: _str_list(v) and len(v) > 0), "a non-empty list of task names or None"),
    "orders": (_opt(lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                    and all(_is_int(o) for o in v)), "a non-empty list of order numbers or None"),
    "methods": (lambda v: _str_list(v) and len(v) > 0, "a non-empty list of method names"),
    "model": (lambda v: isinstance(v, str) and bool(v), "a model spec string"),
    "max_train": (_opt(lambda v: _is_int(v) and v > 0), "a positive integer or None (all)"),
    "max_test": (_opt(lambda v: _is_int(v) and v > 0), "a positive integer or None (all)"),
    "epochs": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "seeds": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0
              and all(_is_int(s) and s >= 0 for s in v), "a non-empty list of integers >= 0"),
    "run_root": (lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "", "a path"),
    "run_name": (is_valid_name, "a folder name: one path component of letters, digits and . _ + -"),
    "data_dir": (_opt(lambda v: isinstance(v, (str, os.PathLike))), "a path or None"),
    "smoke": (lambda v: isinstance(v, bool), "True or False"),
    "method_options": (lambda v: isinstance(v, dict) and all(isinstance(o, dict) for o in v.values()),
                       "a dict {method: {option: value}}"),
    "extra": (lambda v: isinstance(v, dict), "a dict {RunConfig field: value}"),
    "share_first_stage": (lambda v: isinstance(v, bool), "True or False"),
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
    for key in ("methods", "seeds", "tasks", "orders", "fig_formats"):
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
    if p.orders is not None and len(set(p.orders)) != len(p.orders):
        errors.append(f"orders: {p.orders!r} lists an order twice")
    errors.extend(smoke_conflicts(p))
    if p.orders is not None and p.tasks is not None:
        errors.append("orders and tasks: give one (order numbers of the benchmark, or one custom "
                      "task list); set the other to None")
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


def smoke_conflicts(p: NotebookParams) -> list[str]:
    """With ``smoke=True`` the model and sizes are the smoke ones (:data:`SMOKE_MODEL`,
    :data:`SMOKE_SIZES`): one problem per parameter set to anything else than its default or
    its smoke value (it would be replaced silently)."""
    if not p.smoke:
        return []
    defaults = NotebookParams()
    problems = []
    for key, smoke_value in {"model": SMOKE_MODEL, **SMOKE_SIZES}.items():
        value = getattr(p, key)
        if value != getattr(defaults, key) and value != smoke_value:
            problems.append(f"{key}={value!r}: smoke=True runs {key} {smoke_value!r} (the tiny "
                            f"random model and tiny sizes); leave {key} at its default, or set "
                            "smoke=False")
    return problems


# ------------------------------------------------------------------------------------------
# configurations and training


def label_for(method: str, seed: int, order: int | None = None) -> str:
    """``<method>-s<seed>``; in an ``orders`` grid :func:`aimm.study.grid.cell_name`,
    ``<method>-o<order>-s<seed>``."""
    return f"{method}-s{seed}" if order is None else cell_name(method, order, seed)


def run_values(p: NotebookParams, method: str, seed: int,
               order: int | None = None) -> dict[str, Any]:
    """The RunConfig fields of one method x seed run, or of one cell of an ``orders`` grid
    (``order``); smoke sizes and method defaults applied."""
    model, sizes = p.model, {"max_train": p.max_train, "max_test": p.max_test, "epochs": p.epochs}
    extra: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if p.smoke:
        model = SMOKE_MODEL
        sizes = dict(SMOKE_SIZES)
        extra.update(SMOKE_EXTRA)
        options.update(method_fact(method, "smoke_options") or {})  # a merge in a 4-step task
    extra.update(method_defaults(method))
    extra.update(p.extra)
    options.update(p.method_options.get(method, {}))
    label = label_for(method, seed, order)
    values: dict[str, Any] = {
        "benchmark": p.benchmark, "order": p.order if order is None else order,
        "tasks": list(p.tasks) if p.tasks and order is None else None,
        "data_dir": p.data_dir, "model": model, **sizes, "method": method,
        "method_options": options, "seed": seed,
        "run_dir": str(p.group_dir / label), "run_id": label, "progress": p.interactive,
    }
    values.update(extra)
    return values


def configs(params: NotebookParams | dict[str, Any]) -> list[RunConfig]:
    """One validated RunConfig per method x order x seed (methods outer, seeds inner; the
    orders of an ``orders`` grid, else the one ``order`` / ``tasks``), as ``aimm study`` plans."""
    from aimm.methods import build_method

    p = params if isinstance(params, NotebookParams) else validate_parameters(params)
    out = []
    for method in p.methods:
        for order in p.grid_orders():
            for seed in p.seeds:
                label = label_for(method, seed, order)
                try:
                    cfg = RunConfig.from_dict(run_values(p, method, seed, order), source=label)
                    build_method(cfg, source=label)
                    out.append(cfg)
                except (ConfigError, TypeError) as exc:
                    raise ConfigError(str(exc)) from exc
    return out


def run_dirs(params: NotebookParams | dict[str, Any]) -> dict[str, Path]:
    """label (:func:`label_for`) -> run directory, whether it exists yet or not."""
    return {cfg.run_id: Path(cfg.run_dir) for cfg in configs(params)}


__all__ = [
    "FIG_FORMATS", "NotebookParams", "OWN_FIELDS", "PARAMETER_NAMES", "SMOKE_EXTRA", "SMOKE_MODEL",
    "SMOKE_SIZES", "chdir_to_project", "configs", "label_for", "method_defaults", "method_fact",
    "notebook_parameters", "run_dirs", "run_values", "validate_parameters",
]
