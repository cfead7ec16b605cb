"""A stage's cross-stage method state: ``method_state.safetensors`` + ``method_state.json``.

What :meth:`aimm.methods.base.Method.stage_state` returns is written next to the stage's adapter
(tensors in safetensors, the rest JSON with the tensors referenced by key; never pickle). The
engine reads it back on resume (:mod:`aimm.training.artifacts` re-exports both functions) and
``aimm export`` reads it for a method whose stage adapter is not the evaluated model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aimm.runs import atomic_write_bytes, atomic_write_json, read_json

METHOD_STATE = "method_state"  # stage-folder file stem of Method.stage_state()


def write_method_state(stage_dir: Path, state: dict[str, Any] | None) -> None:
    """``Method.stage_state()`` as ``method_state.safetensors`` (its tensors) + ``.json`` (the
    rest, tensors referenced by key); nothing when ``state`` is None."""
    if state is None:
        return
    from safetensors.torch import save

    from aimm.checkpoint import split_tensors

    plain, tensors = split_tensors(state)
    atomic_write_bytes(stage_dir / f"{METHOD_STATE}.safetensors", save(tensors))
    atomic_write_json(stage_dir / f"{METHOD_STATE}.json", plain)


def read_method_state(stage_dir: Path) -> dict[str, Any] | None:
    """What :func:`write_method_state` wrote in ``stage_dir`` (``None``: nothing). On resume both
    files' sha256 were checked first (:func:`aimm.integrity.verify_for_resume`)."""
    path = stage_dir / f"{METHOD_STATE}.json"
    if not path.is_file():
        return None
    from safetensors.torch import load

    from aimm.checkpoint import join_tensors
    from aimm.runs import RunDirError

    try:
        tensors = load((stage_dir / f"{METHOD_STATE}.safetensors").read_bytes())
        return join_tensors(read_json(path), tensors)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: method state not readable ({exc}); restore the stage folder "
                          "or restart from this stage") from exc


__all__ = ["METHOD_STATE", "read_method_state", "write_method_state"]
