"""Studies: a grid of ordinary runs (methods x seeds x orders) and its aggregation.

``grid`` plans the cells (validated run configs, ``runs.csv``), ``runner`` runs each cell as an
``aimm run`` subprocess (resume, skip finished, report failures), ``stats`` holds the pure
statistics (Student-t intervals, paired differences), ``aggregate`` turns run directories into
tables, ``report`` writes ``summary.csv`` / ``summary.md`` / ``paired.csv``, ``orchestrate`` ties
them together for ``aimm study``.
"""

from aimm.study.aggregate import (
    controller_table,
    read_results,
    paired_table,
    runs_table,
    seed_trajectories,
    summary_table,
)
from aimm.study.grid import Cell, parse_ints, parse_list, plan_cells, read_runs_csv
from aimm.study.orchestrate import check_study_folder, exit_code, run_study
from aimm.study.report import Aggregate, aggregate, summary_markdown, write_aggregate
from aimm.study.stats import estimate, paired_difference, t_quantile

__all__ = [
    "Aggregate", "Cell", "aggregate", "check_study_folder", "controller_table", "estimate",
    "exit_code", "paired_difference", "paired_table", "parse_ints", "parse_list", "plan_cells",
    "read_results", "read_runs_csv", "run_study", "runs_table", "seed_trajectories",
    "summary_markdown", "summary_table", "t_quantile", "write_aggregate",
]
