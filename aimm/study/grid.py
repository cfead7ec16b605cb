"""The grid of a study: methods x seeds x (orders | one custom task list), one run config per cell.

Every cell is an ordinary run directory ``DIR/runs/<method>-o<order>-s<seed>`` (a custom task list
gives ``<method>-custom-s<seed>``); the name is built only from validated parts (a registered method
name, integers), so it is a safe folder name. ``DIR/runs.csv`` lists the cells.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from aimm.config import ConfigError, RunConfig
from aimm.data import find_task_file, resolve_data_dir
from aimm.methods import METHODS, build_method
from aimm.names import is_valid_name
from aimm.runs import atomic_write_csv
from aimm.util import error_summary

CUSTOM = "custom"  # the order column of a grid over one custom task list
RUNS_CSV = "runs.csv"
RUNS_COLUMNS = ["method", "seed", "order", "run_dir"]


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    method: str
    seed: int
    order: int | str  # an order number, or CUSTOM
    config: RunConfig

    @property
    def name(self) -> str:
        return cell_name(self.method, self.order, self.seed)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def cell_name(method: str, order: int | str, seed: int) -> str:
    """``<method>-o<order>-s<seed>`` (``<method>-custom-s<seed>`` for a custom task list): the run
    directory name of a cell (notebook 02's grid names its runs the same way)."""
    return f"{method}-{CUSTOM if order == CUSTOM else f'o{order}'}-s{seed}"


# ------------------------------------------------------------------------------ parsing
def parse_list(text: str | None, flag: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]``; empty parts and duplicates are errors naming ``flag``."""
    items = [t.strip() for t in (text or "").split(",")]
    items = [t for t in items if t]
    if not items:
        raise ConfigError(f"{flag}: give a comma-separated list, e.g. {flag} 1,2,3")
    dupes = sorted({t for t in items if items.count(t) > 1})
    if dupes:
        raise ConfigError(f"{flag}: {', '.join(dupes)} given more than once")
    return items


def parse_ints(text: str | None, flag: str) -> list[int]:
    """``1,2,3`` -> ``[1, 2, 3]``; a duplicate is one by value (``1,01`` is 1 twice)."""
    out = []
    items = parse_list(text, flag)
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(f"{flag}: {item!r} is not an integer") from None
        if value < 0:
            raise ConfigError(f"{flag}: {value} must be a non-negative integer")
        if value in out:
            same = ", ".join(t for t, v in zip(items, out + [value]) if v == value)
            raise ConfigError(f"{flag}: {value} given more than once (as {same})")
        out.append(value)
    return out


def check_methods(methods: list[str]) -> None:
    """Every name a registered method, else one line with a suggestion."""
    for name in methods:
        if name not in METHODS:
            hint = difflib.get_close_matches(name, list(METHODS), n=1)
            raise ConfigError(f"--methods: unknown method {name!r}"
                              + (f" (did you mean '{hint[0]}'?)" if hint else "")
                              + f"; choose from {', '.join(METHODS)}")


def option_names(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(METHODS[method].Options)}


def split_options(options: dict[str, Any], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Each method gets the options it has (``-o initial_interval=4`` goes to aimmerging only);
    an option that no method of the grid has is an error."""
    orphans = [k for k in options if not any(k in option_names(m) for m in methods)]
    if orphans:
        raise ConfigError(f"--option {orphans[0]}: no method of the grid ({', '.join(methods)}) "
                          "has this option")
    return {m: {k: v for k, v in options.items() if k in option_names(m)} for m in methods}


# ------------------------------------------------------------------------------ the grid
def plan_cells(base: dict[str, Any], methods: list[str], seeds: list[int],
               orders: list[int] | None, out: str | Path, *, source: str = "command line") -> list[Cell]:
    """The validated run configs of the grid (ConfigError before anything is written): every
    field and every method option value (each cell's method is built once, then dropped).

    ``base``: RunConfig fields shared by every cell (flags and --config; ``method``, ``seed``,
    ``order`` and ``run_dir`` are set per cell, ``method_options`` split by :func:`split_options`).
    ``orders``: order numbers, or None for the one order or custom task list of ``base``.
    """
    check_methods(methods)
    base = dict(base)
    per_method = split_options(dict(base.pop("method_options", None) or {}), methods)
    for key in ("method", "seed", "run_dir", "run_id"):
        base.pop(key, None)
    if orders is not None:
        base["tasks"] = None
        order_values: list[int | str] = list(orders)
    else:
        order_values = [CUSTOM if base.get("tasks") else base.get("order", RunConfig.order)]
    cells = []
    for method in methods:
        for order in order_values:
            for seed in seeds:
                values = dict(base, method=method, seed=seed, method_options=per_method[method],
                              progress=False)
                if order != CUSTOM:
                    values["order"] = order
                probe = Cell(method, seed, order, RunConfig())
                values["run_dir"] = str(Path(out) / "runs" / probe.name)
                values["run_id"] = probe.name
                cfg = RunConfig.from_dict(values, source=f"{source} ({probe.name})")
                build_method(cfg, source=f"{source} ({probe.name})")  # the option values
                cells.append(Cell(method, seed, order, cfg))
    check_training_files(cells)
    return cells


def check_training_files(cells: list[Cell]) -> None:
    """The data folder and every task's train split exist (FileNotFoundError naming the path), so
    a typo fails before any cell starts rather than once per cell."""
    data_dir = resolve_data_dir(cells[0].config.data_dir) if cells else None
    for cfg in {(c.config.benchmark, tuple(c.config.task_names())): c.config for c in cells}.values():
        for task in cfg.task_names():
            find_task_file(data_dir, cfg.benchmark, "train", task)


def runs_rows(cells: list[Cell], out: str | Path) -> list[dict[str, Any]]:
    return [{"method": c.method, "seed": c.seed, "order": c.order,
             "run_dir": Path(c.run_dir).relative_to(Path(out)).as_posix()} for c in cells]


def write_runs_csv(cells: list[Cell], out: str | Path) -> Path:
    path = Path(out) / RUNS_CSV
    atomic_write_csv(path, runs_rows(cells, out))
    return path


def read_runs_csv(out: str | Path) -> pd.DataFrame:
    """``DIR/runs.csv`` with ``run_dir`` resolved against ``DIR``; FileNotFoundError naming it."""
    path = Path(out) / RUNS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a study folder (runs.csv missing); "
                                "run `aimm study ... --out DIR` first")
    try:  # every cell as text ("" when empty), checked below; a row longer than the header
        with warnings.catch_warnings():  # is a ParserWarning with index_col=False: an error
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
        problem = runs_table_problem(table)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.ParserWarning,
            pd.errors.EmptyDataError) as exc:
        problem = error_summary(exc)
    if problem:
        raise ValueError(f"{path}: not a study's list of runs ({problem}); fix it, or run the "
                         "`aimm study` command that made the folder again to rewrite it")
    table["seed"] = table["seed"].astype(int)
    table["path"] = [Path(out) / p for p in table["run_dir"]]
    return table


def runs_table_problem(table: pd.DataFrame) -> str | None:
    """Why ``table`` (``runs.csv`` read as text, ``""`` for an empty cell) is not a list of runs
    (``None``: it is): a method name, a seed (an integer >= 0), an order number or ``custom``,
    and a run dir in every row."""
    missing = [c for c in RUNS_COLUMNS if c not in table.columns]
    if missing:
        return f"missing column(s) {', '.join(missing)}"
    rules = {"method": (is_valid_name, "a method name"),
             "seed": (lambda v: re.fullmatch(r"[0-9]{1,10}", v) is not None, "an integer >= 0"),
             "order": (lambda v: v == CUSTOM or re.fullmatch(r"[0-9]{1,10}", v) is not None,
                       f"an order number or {CUSTOM!r}"),
             "run_dir": (bool, "a run directory")}
    for i, row in enumerate(table[RUNS_COLUMNS].itertuples(index=False), start=1):
        for column, value in zip(RUNS_COLUMNS, row):
            check, expected = rules[column]
            if not check(value):
                return f"row {i}: {column}={value!r}, {expected} expected"
    return None
