"""A whole study: write its plan, run its cells, aggregate what finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from aimm.study.grid import Cell, write_runs_csv
from aimm.study.report import Aggregate, write_aggregate, write_settings
from aimm.study.runner import Outcome, run_cells


def run_study(cells: list[Cell], out: str | Path, reference: str, settings: dict[str, Any],
              report: Callable[[str], None] | None = None,
              share_first_stage: bool = True) -> tuple[list[Outcome], Aggregate]:
    """Create ``out``, write ``runs.csv`` and ``study.json``, run every cell (resuming / skipping
    as :mod:`aimm.study.runner` says), then write the summary of the complete runs."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_runs_csv(cells, out)
    write_settings(out, {**settings, "reference": reference, "share_first_stage": share_first_stage})
    outcomes = run_cells(cells, out, report, share_first_stage=share_first_stage)
    return outcomes, write_aggregate(out, reference)


def exit_code(outcomes: list[Outcome]) -> int:
    """0 when every cell is done, 1 when some failed or were in use."""
    return 0 if all(o.ok for o in outcomes) else 1
