"""Within-stage checkpoints: everything needed to continue a stage bit-for-bit.

A checkpoint holds the LoRA weights, optimiser and scheduler states, every RNG state (torch,
Python, NumPy, the memory-batch sampler), the method's state (controller, snapshots, importance
EMAs, outer optimiser) and the trajectory so far. It is written like every file of a run
(:func:`aimm.runs.atomic_write_bytes`: temporary file, fsync, rename), so a process killed
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

from aimm.runs import atomic_write_bytes


def capture_rng(memory_rng: random.Random) -> dict[str, Any]:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state(), "memory": memory_rng.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict[str, Any], memory_rng: random.Random) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    memory_rng.setstate(state["memory"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue(), fault_point="checkpoint_write")


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
