"""Data layer of aimm: benchmark orders, loading and validation, subsampling, the
rehearsal memory buffer, raw-format conversion and folder checks.

Bad data raises :class:`DataError` whose lines read ``<file>: <record index>: <problem>``
(or ``<file>: <problem>`` for file-level problems).
"""

from .buffer import BUFFER_MODES, build_memory, memory_buffer, memory_buffers, memory_size
from .check import CheckReport, check_benchmark, inspect_benchmark, main_check, main_convert
from .convert import convert_benchmark, convert_task, find_task_folders
from .errors import DataError
from .labels import is_classification_like
from .loader import TaskData, load_task, load_tasks
from .orders import (
    BENCHMARK_FOLDERS,
    ORDERS,
    benchmark_folder,
    resolve_order,
    task_metric,
    task_sequence,
)
from .paths import SPLITS, find_task_file, resolve_data_dir, task_file_path
from .prompts import INSTRUCTIONS, TASK_TYPES, build_prompt, split_prompt
from .records import Example, read_records, validate_records
from .sampling import allocate, subsample

__all__ = [
    "BENCHMARK_FOLDERS", "BUFFER_MODES", "INSTRUCTIONS", "ORDERS", "SPLITS", "TASK_TYPES",
    "CheckReport", "DataError", "Example", "TaskData",
    "allocate", "benchmark_folder", "build_memory", "build_prompt", "check_benchmark",
    "convert_benchmark", "convert_task", "find_task_file", "find_task_folders",
    "inspect_benchmark", "is_classification_like", "load_task", "load_tasks", "main_check",
    "main_convert", "memory_buffer", "memory_buffers", "memory_size", "read_records",
    "resolve_data_dir", "resolve_order", "split_prompt", "subsample", "task_file_path",
    "task_metric", "task_sequence", "validate_records",
]
