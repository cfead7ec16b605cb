"""The files of a study folder: ``study.json`` (its settings), ``summary.csv`` / ``summary.md`` and
``paired.csv``, recomputed from the run directories every time (so they never go stale)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from aimm.names import is_valid_name
from aimm.run_shapes import object_problem
from aimm.runs import atomic_write_json, atomic_write_text, read_checked_json
from aimm.study.aggregate import (
    RunResult,
    paired_table,
    read_results,
    runs_table,
    summary_table,
)

STUDY_JSON = "study.json"
DEFAULT_REFERENCE = "seq_lora"


@dataclass
class Aggregate:
    runs: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame
    reference: str
    notes: list[str]


def write_settings(out: str | Path, settings: dict[str, Any]) -> None:
    atomic_write_json(Path(out) / STUDY_JSON, settings)


def read_settings(out: str | Path) -> dict[str, Any]:
    """``study.json`` (none: ``{}``); :class:`RunDirError` names one that is not a study's
    settings (:func:`settings_problem`)."""
    path = Path(out) / STUDY_JSON
    if not path.is_file():
        return {}
    return read_checked_json(path, settings_problem, "a study's settings", "fix it, or run the "
                             "`aimm study` command that made the folder again to rewrite it")


def settings_problem(settings: Any) -> str | None:
    """Why ``settings`` is not a ``study.json`` (``None``: it is): a JSON object whose
    ``reference``, where given, is a method name (the one field the aggregation reads)."""
    if object_problem(settings):
        return object_problem(settings)
    reference = settings.get("reference")
    if reference is not None and not is_valid_name(reference):
        return f"reference={reference!r}: a method name expected"
    return None


def aggregate(results: list[RunResult], reference: str) -> Aggregate:
    """The three tables of a study from its runs (pure), with notes on what is left out."""
    table = runs_table(results)
    notes = [f"{r.run_dir}: {r.problem}; not aggregated" for r in results if not r.complete]
    methods = list(dict.fromkeys(r.method for r in results))
    if reference in methods:
        paired = paired_table(table, reference)
    else:
        paired = paired_table(table.iloc[0:0], reference)
        notes.append(f"reference {reference} is not in this study ({', '.join(methods)}); "
                     "no paired differences")
    return Aggregate(table, summary_table(table), paired, reference, notes)


# ------------------------------------------------------------------------------ markdown
def _fmt(x: Any, digits: int = 3) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _cell(row: pd.Series, m: str) -> str:
    mean = row[f"{m}_mean"]
    if isinstance(mean, float) and math.isnan(mean):
        return "-"
    text = _fmt(mean)
    if not math.isnan(row[f"{m}_std"]):
        text += f" ± {_fmt(row[f'{m}_std'])} [{_fmt(row[f'{m}_ci95_low'])}, {_fmt(row[f'{m}_ci95_high'])}]"
    return text


def _merges_cell(row: pd.Series, columns: list[str]) -> str:
    if "merges_mean" not in row or math.isnan(row["merges_mean"]):
        return "-"
    kinds = [f"{c[len('merges_'):-len('_mean')]} {_fmt(row[c], 1)}" for c in columns
             if c != "merges_mean" and not math.isnan(row[c])]
    return _fmt(row["merges_mean"], 1) + (f" ({', '.join(kinds)})" if kinds else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def summary_markdown(agg: Aggregate) -> str:
    """Both tables as markdown: mean ± std [95% CI] per metric; paired differences with their
    interval and wins/losses; then the notes."""
    s, p = agg.summary, agg.paired
    metrics = [m for m in ("OP", "BWT", "FWT", "forgetting") if f"{m}_mean" in s.columns]
    merge_cols = [c for c in s.columns if c.startswith("merges")]
    lines = ["# Study summary", "",
             "mean ± sample std [Student-t 95% CI of the mean] over n runs (seeds × orders)", ""]
    header = ["method", "order", "n", *metrics, "train s", "eval s", "merges"]
    rows = [[str(r["method"]), str(r["order"]), str(int(r["n"])), *(_cell(r, m) for m in metrics),
             _fmt(r["train_seconds_mean"], 1), _fmt(r["eval_seconds_mean"], 1),
             _merges_cell(r, merge_cols)] for _, r in s.iterrows()]
    lines += _table(header, rows) if rows else ["(no complete runs)"]
    lines += ["", f"## Paired differences: method − {agg.reference} (same seed and order)", "",
              "wins: pairs where the method is better (higher OP/BWT/FWT, lower forgetting). "
              "An interval that contains 0 means the difference is not resolved at this size.", ""]
    prow = [[str(r["method"]), str(r["metric"]), str(int(r["n"])), _fmt(r["diff_mean"]),
             f"[{_fmt(r['diff_ci95_low'])}, {_fmt(r['diff_ci95_high'])}]",
             f"{int(r['wins'])}/{int(r['losses'])}"] for _, r in p.iterrows()]
    lines += _table(["method", "metric", "n", "diff", "95% CI", "wins/losses"], prow) if prow \
        else ["(no pairs)"]
    if agg.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in agg.notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ files
def write_aggregate(out: str | Path, reference: str | None = None) -> Aggregate:
    """Recompute from the run dirs and write ``summary.csv``, ``summary.md``, ``paired.csv``.

    ``reference``: default the one in ``study.json``, else seq_lora.
    """
    out = Path(out)
    reference = reference or read_settings(out).get("reference") or DEFAULT_REFERENCE
    agg = aggregate(read_results(out), reference)
    atomic_write_text(out / "summary.csv", agg.summary.to_csv(index=False))
    atomic_write_text(out / "paired.csv", agg.paired.to_csv(index=False))
    atomic_write_text(out / "summary.md", summary_markdown(agg))
    return agg


__all__ = ["Aggregate", "aggregate", "read_settings", "settings_problem", "summary_markdown",
           "write_aggregate", "write_settings"]
