"""A whole study: write its plan, run its cells, aggregate what finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from aimm.config import ConfigError
from aimm.study.grid import Cell, write_runs_csv
from aimm.study.report import Aggregate, write_aggregate, write_settings
from aimm.study.runner import Outcome, check_existing_runs, run_cells


def run_study(cells: list[Cell], out: str | Path, reference: str, settings: dict[str, Any],
              report: Callable[[str], None] | None = None,
              share_first_stage: bool = True) -> tuple[list[Outcome], Aggregate]:
    """Check ``out`` (:func:`check_study_folder`; ConfigError, nothing written), create it,
    write ``runs.csv`` and ``study.json``, run every cell (resuming / skipping
    as :mod:`aimm.study.runner` says), then write the summary of the complete runs."""
    out = Path(out)
    check_study_folder(cells, out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_runs_csv(cells, out)
    write_settings(out, {**settings, "reference": reference, "share_first_stage": share_first_stage})
    outcomes = run_cells(cells, out, report, share_first_stage=share_first_stage)
    return outcomes, write_aggregate(out, reference)


RUN_FILES = ("config.json", "state.json")  # a run directory's own files (aimm.runs.RunStore)


def check_study_folder(cells: list[Cell], out: Path) -> None:
    """ConfigError (one line) before a study writes anything into ``out``: when ``out`` is a run
    directory (the two layouts would mix), or when a cell's run directory holds a run with a
    different config (:func:`aimm.study.runner.check_existing_runs`)."""
    found = [name for name in RUN_FILES if (out / name).is_file()]
    if found:
        raise ConfigError(f"--out {out}: a run directory (it holds {' and '.join(found)}), not a "
                          "study folder; choose another --out (a new folder or a study's)")
    check_existing_runs(cells, out)


def exit_code(outcomes: list[Outcome]) -> int:
    """0 when every cell is done, 1 when some failed or were in use."""
    return 0 if all(o.ok for o in outcomes) else 1
