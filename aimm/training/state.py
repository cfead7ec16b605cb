"""The resume point of a run: :class:`RunState`, read from and written to ``state.json``.

``state.json`` keeps its format: ``{"completed": [stage names], "scores": [score rows],
"stage_steps": [inner steps per stage], "sha256": {run-dir-relative path: hex digest}}``
(``sha256`` appears with the first completed stage). :meth:`aimm.runs.RunStore.read_state`
validates the file (a wrongly shaped one raises ``RunDirError``); old files without
``stage_steps`` read as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aimm.runs import RunStore

# config fields that may differ between the first start of a run and its resumption
RESUME_FREE_FIELDS = frozenset({"run_dir", "run_id", "progress", "data_dir", "device"})


def differing_fields(old: dict[str, Any], new: dict[str, Any],
                     free: frozenset[str] = RESUME_FREE_FIELDS) -> list[str]:
    """The config fields, outside ``free``, whose values differ between ``old`` and ``new``
    (sorted; a field missing on one side counts as None)."""
    return sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))


@dataclass
class RunState:
    completed: list[str] = field(default_factory=list)  # stage names, in order
    scores: list[dict[str, Any]] = field(default_factory=list)  # scores.csv rows of those stages
    stage_steps: list[int] = field(default_factory=list)  # inner steps of each completed stage
    sha256: dict[str, str] | None = None  # run-dir-relative path -> digest (None: no stage yet)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "RunState":
        return cls(list(state["completed"]), list(state["scores"]),
                   list(state.get("stage_steps", [])), state.get("sha256"))

    @classmethod
    def read(cls, store: RunStore) -> "RunState":
        """The validated ``state.json`` of ``store`` (empty when there is none)."""
        return cls.from_dict(store.read_state())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"completed": self.completed, "scores": self.scores,
                               "stage_steps": self.stage_steps}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out

    def write(self, store: RunStore) -> None:
        store.write_state(self.to_dict())

    @property
    def steps_done(self) -> int:
        """Inner steps of the completed stages (the ``global_step`` offset of the next one)."""
        return sum(self.stage_steps)

    def complete_stage(self, name: str, rows: list[dict[str, Any]], inner_steps: int) -> None:
        self.scores.extend(rows)
        self.completed.append(name)
        self.stage_steps.append(inner_steps)

    def record_files(self, run_dir: Path, stage_dir: Path) -> None:
        """sha256 of the stage's files and the result set (:func:`aimm.integrity.record_stage_files`)."""
        from aimm.integrity import record_stage_files

        sums = {} if self.sha256 is None else self.sha256
        record_stage_files(sums, run_dir, stage_dir)
        self.sha256 = sums


__all__ = ["RESUME_FREE_FIELDS", "RunState", "differing_fields"]
