"""What the notebooks (01 -> 04) call, in one import: ``from aimm import notebook``.

* :mod:`~aimm.notebook.params`: the shared parameters cell, its validation, the planned runs;
* :mod:`~aimm.notebook.data`: notebook 01 (find / convert / check the benchmark, statistics);
* :mod:`~aimm.notebook.training`: notebook 02 (train or resume every run, the runs index);
* :mod:`~aimm.notebook.results`: notebooks 03 and 04 (figures from :mod:`aimm.plots.builders`,
  the metrics table from the runs' ``metrics.json`` and :mod:`aimm.metrics`, tables, export);
* :mod:`~aimm.notebook.explorer`: notebook 03's widget explorer over saved runs;
* :mod:`~aimm.notebook.study`: the grid as a study (``runs.csv`` for :mod:`aimm.study`), per-seed
  overlays and the controller table (03), the aggregated table and 95% error bars (04).
"""

from __future__ import annotations

from aimm.notebook.data import (
    GENERATION_LABEL,
    check_data,
    data_statistics,
    find_or_convert_data,
    read_splits,
    summary_table,
    tokenizer_for,
)
from aimm.notebook.explorer import SIGNALS, experiments, run_explorer
from aimm.notebook.params import (
    FIG_FORMATS,
    PARAMETER_NAMES,
    SMOKE_MODEL,
    NotebookParams,
    chdir_to_project,
    configs,
    label_for,
    notebook_parameters,
    run_dirs,
    validate_parameters,
)
from aimm.notebook.results import (
    export_all,
    first_method,
    metrics_table,
    result_figures,
    to_markdown,
    trajectory_figures,
    write_table,
)
from aimm.notebook.study import (
    aggregate_study,
    controller_report,
    has_intervals,
    seed_figures,
    several_seeds,
    study_figures,
    study_index,
    write_study_index,
)
from aimm.notebook.training import (
    display_labels,
    load_runs,
    plan_table,
    run_method,
    runs_of,
    stage_ended_printer,
    train_all,
    training_callbacks,
    write_runs_index,
)
from aimm.runs import load_trajectory, report_text
from aimm.study import summary_markdown

__all__ = [
    "aggregate_study", "controller_report", "has_intervals", "seed_figures", "several_seeds",
    "study_figures", "study_index", "summary_markdown", "write_study_index",
    "FIG_FORMATS", "GENERATION_LABEL", "NotebookParams", "PARAMETER_NAMES", "SIGNALS",
    "SMOKE_MODEL", "chdir_to_project", "check_data", "configs", "data_statistics",
    "display_labels", "experiments", "export_all", "find_or_convert_data", "first_method",
    "label_for", "load_runs", "load_trajectory", "metrics_table", "notebook_parameters",
    "plan_table", "read_splits", "report_text", "result_figures", "run_dirs", "run_explorer",
    "run_method", "runs_of", "stage_ended_printer", "summary_table", "to_markdown",
    "tokenizer_for", "train_all", "training_callbacks", "trajectory_figures",
    "validate_parameters", "write_runs_index", "write_table",
]
