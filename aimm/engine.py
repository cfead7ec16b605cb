"""Compatibility alias of :mod:`aimm.training.engine` (the engine moved there in #13).

New code imports from :mod:`aimm.training.engine`; this keeps ``aimm.engine.run`` / ``Engine``
working for scripts and notebooks written before the move.
"""

from aimm.training.engine import RESUME_FREE_FIELDS, Engine, memory_records, run
from aimm.training.loop import NonFiniteLossError
from aimm.training.context import TrainContext

__all__ = ["Engine", "NonFiniteLossError", "RESUME_FREE_FIELDS", "TrainContext", "memory_records",
           "run"]
