"""Fault injection for the crash-safety tests: ``AIMM_CRASH_AT=<point>:<n>`` kills the process
with SIGKILL the n-th time it reaches ``point``. Points: ``train_step``, ``merge``,
``checkpoint_write`` (temporary file written, not yet renamed), ``eval``, ``stage_end``
(results written, state.json not yet). Unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(point: str) -> None:
    spec = os.environ.get("AIMM_CRASH_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
