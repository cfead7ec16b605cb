"""Within-stage checkpoints: everything needed to continue a stage bit-for-bit, and no code.

A checkpoint holds the LoRA weights, optimiser and scheduler states, every RNG state (torch,
Python, NumPy, the memory-batch sampler), the method's state (controller, snapshots, importance
EMAs, outer optimiser) and the trajectory so far. It is one safetensors file: the tensors as
tensors, everything else as JSON in the header's metadata (tuples, non-string keys and NumPy
arrays in tagged JSON forms), and a sha256 over both. Nothing is unpickled, so a crafted file can
at worst be refused. It is written like every file of a run (:func:`aimm.runs.atomic_write_bytes`:
temporary file, fsync, rename), so a process killed mid-write leaves the previous one intact.

A checkpoint that cannot be read, fails its sha256 or does not fit the model is reported (one
line, to the run's warnings) and ignored: the stage restarts from its beginning, which is what
deleting it by hand gives. A ``.pt`` file (the old pickle format) is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable

import torch

from aimm.runs import atomic_write_bytes

FORMAT = "aimm-checkpoint/1"
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"  # pickled checkpoints of older versions: reported, never loaded
_NUMPY_KINDS = "biuf"  # bool, int, uint, float arrays only

log = logging.getLogger("aimm")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used. The message names the file."""


# ---------------------------------------------------------------------------------- RNG
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


# ---------------------------------------------------------------------------------- encoding
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Plain JSON for ``obj``; tensors moved to ``tensors`` and referenced by key."""
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} (tensors and plain data only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`; anything unexpected raises ``ValueError``."""
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        raise ValueError(f"unexpected JSON value {type(obj).__name__}")
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        dtype = np.dtype(str(obj["dtype"]))
        if dtype.kind not in _NUMPY_KINDS:
            raise ValueError(f"array dtype {dtype} not allowed")
        return np.asarray(obj["__ndarray__"], dtype=dtype)
    if "__dtype__" in obj:
        dtype = getattr(torch, str(obj["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {obj['__dtype__']!r}")
        return dtype
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if any(k.startswith("__") for k in obj):
        raise ValueError(f"unknown tag in {sorted(obj)}")
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _digest(payload: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(payload.encode("utf-8"))
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    """The file content for ``payload`` (tensors and plain data; see the module docstring)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(_encode(payload, tensors))
    return save(tensors, metadata={"format": FORMAT, "payload": text,
                                   "sha256": _digest(text, tensors)})


def parse_checkpoint(data: bytes) -> dict[str, Any]:
    """Decode :func:`checkpoint_bytes` output; ``ValueError`` with the reason when it is not one."""
    from safetensors.torch import load

    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        raise ValueError("a pickle (torch.save) file, which is never unpickled")
    if len(data) < 8:
        raise ValueError(f"truncated ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("truncated (header runs past the end of the file)")
    try:
        header = json.loads(data[8 : 8 + size])
        meta = header.get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError) as exc:
        raise ValueError("not a safetensors file") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"not an aimm checkpoint (format {meta.get('format')!r})")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors' own error type: a truncated or damaged body
        raise ValueError(f"damaged tensor data ({exc})") from exc
    text = meta.get("payload", "")
    if _digest(text, tensors) != meta.get("sha256"):
        raise ValueError("sha256 mismatch (the file was changed or damaged after it was written)")
    try:
        payload = _decode(json.loads(text), tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"bad payload ({exc})") from exc
    return payload


def split_tensors(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``obj`` as plain JSON with its tensors taken out (referenced by key), for files that keep
    the tensors in safetensors and the rest in JSON (the tagged forms of this module)."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(obj, tensors), tensors


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`; anything unexpected raises ``ValueError``/``KeyError``."""
    return _decode(obj, tensors)


# ---------------------------------------------------------------------------------- checks
_FIELDS = {"stage": int, "step": int, "lora": dict, "optimizer": dict, "scheduler": dict,
           "rng": dict, "method": dict, "steps": list, "merges": list, "optimizer_steps": int,
           "nonfinite": int}


def payload_problem(ckpt: Any, like: dict[str, torch.Tensor] | None = None) -> str | None:
    """Why ``ckpt`` cannot continue a stage (``None``: it can). ``like``: the model's LoRA
    state, whose names and shapes the checkpoint's must match."""
    if not isinstance(ckpt, dict):
        return "not a mapping"
    for key, kind in _FIELDS.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            return f"field {key!r} missing or not a {kind.__name__}"
    if ckpt["step"] < 1:
        return f"step {ckpt['step']} < 1"
    lora = ckpt["lora"]
    if not all(isinstance(v, torch.Tensor) for v in lora.values()):
        return "LoRA weights are not all tensors"
    if like is not None:
        if set(lora) != set(like):
            return "LoRA weight names differ from the model's"
        wrong = [k for k in like if tuple(lora[k].shape) != tuple(like[k].shape)]
        if wrong:
            return f"LoRA weight {wrong[0]} has shape {tuple(lora[wrong[0]].shape)}, the model " \
                   f"{tuple(like[wrong[0]].shape)}"
    if not all(bool(torch.isfinite(v).all()) for v in lora.values()):
        return "LoRA weights hold NaN or inf"
    rng = ckpt["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        return "RNG state missing"
    for key in ("python", "numpy", "memory"):
        if not isinstance(rng.get(key), tuple):
            return f"RNG state {key!r} missing"
    return None


# ---------------------------------------------------------------------------------- files
def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(Path(path), checkpoint_bytes(payload), fault_point="checkpoint_write")


def load_checkpoint(path: Path, on_problem: Callable[[str], None] | None = None,
                    like: dict[str, torch.Tensor] | None = None) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` when there is none.

    A file that cannot be used (unreadable, truncated, sha256 mismatch, not fitting ``like``),
    or a pickled ``.pt`` file in its place, is reported through ``on_problem`` (one line; also
    logged) and gives ``None``: the stage restarts. Without ``on_problem`` it raises
    :class:`CheckpointError`.
    """
    path = Path(path)
    problem = None
    ckpt = None
    legacy = path.with_suffix(LEGACY_SUFFIX)
    if path.is_file():
        try:
            ckpt = parse_checkpoint(path.read_bytes())
            reason = payload_problem(ckpt, like)
        except (OSError, ValueError) as exc:
            reason = str(exc)
        if reason:
            problem = (f"{path}: within-stage checkpoint not usable: {reason}; ignored, the stage "
                       "restarts from its beginning (delete the file to silence this)")
    elif legacy.is_file():
        problem = (f"{legacy}: pickled checkpoint (older aimm format, or planted): never loaded; "
                   "the stage restarts from its beginning (delete the file to silence this)")
    if problem is None:
        return ckpt
    if on_problem is None:
        raise CheckpointError(problem)
    log.warning(problem)
    on_problem(problem)
    return None


__all__ = ["CheckpointError", "capture_rng", "checkpoint_bytes", "join_tensors", "load_checkpoint",
           "parse_checkpoint", "payload_problem", "restore_rng", "save_checkpoint", "split_tensors"]
