"""Within-stage checkpoints: everything needed to continue a stage bit-for-bit, and no code.

A checkpoint holds the LoRA weights, optimiser and scheduler states, every RNG state (torch,
Python, NumPy, the memory-batch sampler), the method's state (controller, snapshots, importance
EMAs, outer optimiser) and the trajectory so far. It is one safetensors file: the tensors as
tensors, everything else as JSON in the header's metadata (tuples, non-string keys and NumPy
arrays in tagged JSON forms), and a sha256 over both. Nothing is unpickled, so a crafted file can
at worst be refused. It is written like every file of a run (:func:`aimm.runs.atomic_write_bytes`:
temporary file, fsync, rename), so a process killed mid-write leaves the previous one intact.

A checkpoint that cannot be read, fails its sha256, or does not fit the model or the stage (a
step outside the stage's plan, optimiser or scheduler state of another structure, RNG states the
generators refuse: :func:`payload_problem`, checked before anything is restored) is reported (one
line naming the file, to the run's warnings) and ignored: the stage restarts from its beginning,
which is what deleting it by hand gives. One that passes these checks and is still refused
half-way through its restore stops the run with one line naming the file (delete it: undoing the
restore would need a copy of the whole training state). A ``.pt`` file (the old pickle format)
is never loaded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable

import torch

from aimm.runs import atomic_write_bytes
from aimm.util import error_summary

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


def payload_problem(ckpt: Any, like: dict[str, torch.Tensor] | None = None, *,
                    stage: int | None = None, total_steps: int | None = None,
                    optimizer: Any = None, scheduler: Any = None) -> str | None:
    """Why ``ckpt`` cannot continue a stage (``None``: it can). Reads its arguments, changes
    nothing (RNG states are tried on scratch generators), so it runs before anything is restored.

    ``like``: the model's LoRA state, whose names and shapes the checkpoint's must match;
    ``stage`` and ``total_steps``: the stage's index and planned steps (``1 <= step <=
    total_steps``); ``optimizer``, ``scheduler``: the live ones, whose state structure (groups,
    hyperparameters, per-parameter state and shapes) the saved states must have.
    """
    if not isinstance(ckpt, dict):
        return "not a mapping"
    for key, kind in _FIELDS.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            return f"field {key!r} missing or not a {kind.__name__}"
    problem = _progress_problem(ckpt, stage, total_steps) or _lora_problem(ckpt["lora"], like) \
        or _rng_problem(ckpt["rng"])
    if problem is None and optimizer is not None:
        problem = _optimizer_problem(ckpt["optimizer"], optimizer)
    if problem is None and scheduler is not None:
        problem = _kind_problem(ckpt["scheduler"], scheduler.state_dict(), "scheduler state")
        last = ckpt["scheduler"].get("last_epoch", ckpt["step"])
        if problem is None and last != ckpt["step"]:
            problem = f"scheduler at step {last}, the checkpoint at step {ckpt['step']}"
    return problem


def _progress_problem(ckpt: dict, stage: int | None, total_steps: int | None) -> str | None:
    step, nonfinite = ckpt["step"], ckpt["nonfinite"]
    if stage is not None and ckpt["stage"] != stage:
        return f"written for stage index {ckpt['stage']}, not this stage's {stage}"
    if step < 1 or (total_steps is not None and step > total_steps):
        return f"step {step} outside 1..{total_steps} (the stage's planned steps)" \
            if total_steps is not None else f"step {step} < 1"
    if len(ckpt["steps"]) != step:
        return f"{len(ckpt['steps'])} trajectory records for {step} steps"
    if not all(isinstance(r, dict) for r in ckpt["steps"] + ckpt["merges"]):
        return "trajectory or merge records are not all mappings"
    if not 0 <= nonfinite <= step:
        return f"nonfinite {nonfinite} outside 0..{step}"
    if ckpt["optimizer_steps"] < step - nonfinite:
        return f"optimizer_steps {ckpt['optimizer_steps']} < the {step - nonfinite} steps applied"
    return None


def _lora_problem(lora: dict, like: dict[str, torch.Tensor] | None) -> str | None:
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
    return None


def _rng_problem(rng: dict) -> str | None:
    """Each RNG state tried on a scratch generator of its kind (the live ones stay untouched)."""
    import numpy as np

    is_tuple = lambda s: isinstance(s, tuple)  # noqa: E731
    trials = [("torch", _is_bytes, lambda s: torch.Generator().set_state(s)),
              ("python", is_tuple, lambda s: random.Random().setstate(s)),
              ("numpy", is_tuple, lambda s: np.random.RandomState().set_state(s)),
              ("memory", is_tuple, lambda s: random.Random().setstate(s))]
    cuda = rng.get("cuda")
    if cuda is not None:
        if not isinstance(cuda, list) or not all(_is_bytes(s) for s in cuda):
            return "RNG state 'cuda' is not a list of byte tensors"
        if torch.cuda.is_available() and len(cuda) > torch.cuda.device_count():
            return f"RNG state 'cuda' for {len(cuda)} GPUs, {torch.cuda.device_count()} visible"
        if torch.cuda.is_available():
            trials += [(f"cuda[{i}]", _is_bytes,
                        lambda s, i=i: torch.Generator(device=f"cuda:{i}").set_state(s))
                       for i in range(len(cuda))]
    states = {**rng, **{f"cuda[{i}]": s for i, s in enumerate(cuda or [])}}
    for key, fits, trial in trials:
        if not fits(states.get(key)):
            return f"RNG state {key!r} missing or of the wrong type"
        try:
            trial(states[key])
        except Exception as exc:  # whatever the generator raises: it refuses the state
            return f"RNG state {key!r} refused ({error_summary(exc)})"
    return None


def _is_bytes(state: Any) -> bool:
    return isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1


def _optimizer_problem(saved: Any, optimizer: Any) -> str | None:
    """``saved`` against the live optimiser: the groups (number, parameter counts, hyperparameter
    names and kinds) and every parameter's state (the names one step gives, the shapes)."""
    live = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(live):
        return f"optimizer state is {_kind(saved)}, not a dict of exactly {sorted(live)}"
    problem = _kind_problem(saved["param_groups"], live["param_groups"], "optimizer param_groups")
    if problem:
        return problem
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(set(ids)) != len(ids):
        return "optimizer param_groups repeat a parameter id"
    shapes = dict(zip(ids, (tuple(p.shape) for p in params)))
    kinds = _state_kinds(optimizer)
    if not isinstance(saved["state"], dict):
        return "optimizer 'state' is not a mapping"
    for pid, entry in saved["state"].items():
        where = f"optimizer state of parameter {pid!r}"
        if pid not in shapes or not isinstance(entry, dict):
            return f"{where}: no such parameter, or not a mapping"
        if kinds is not None and entry and set(entry) != set(kinds):
            return f"{where} holds {sorted(entry)}, the optimizer keeps {sorted(kinds)}"
        for name, value in entry.items():
            shaped = kinds[name] if kinds is not None else getattr(value, "dim", lambda: 0)() > 0
            if not _state_value_fits(value, shapes[pid] if shaped else None):
                return f"{where}: {name!r} is {_kind(value)}, not a finite " \
                       + (f"tensor of shape {shapes[pid]}" if shaped else "number")
    return None


def _state_value_fits(value: Any, shape: tuple | None) -> bool:
    """A finite real tensor of ``shape``, or (``shape`` None) a finite one-element tensor or number."""
    if isinstance(value, torch.Tensor):
        return not value.is_complex() and bool(torch.isfinite(value).all()) and (
            tuple(value.shape) == shape if shape is not None else value.numel() == 1)
    return shape is None and type(value) in (int, float) and _finite(value)


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _state_kinds(optimizer: Any) -> dict[str, bool] | None:
    """The per-parameter state one step of ``optimizer``'s class gives a scratch parameter: name ->
    whether it has the parameter's shape (``None``: cannot tell). The live optimiser is not used."""
    base = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    ref = next((p for g in base.param_groups for p in g["params"]), None)
    if ref is None:
        return None
    probe = torch.zeros(2, 3, dtype=ref.dtype, device=ref.device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        accepted = inspect.signature(type(base)).parameters
        scratch = type(base)([probe], **{k: v for k, v in base.defaults.items() if k in accepted})
        scratch.step()
    except Exception:  # an optimiser that cannot be built like this: its state is not checked
        return None
    return {k: isinstance(v, torch.Tensor) and tuple(v.shape) == (2, 3)
            for k, v in scratch.state[probe].items()}


def _kind_problem(saved: Any, like: Any, where: str) -> str | None:
    """``None`` when ``saved`` has the structure of ``like``: the same container types, lengths and
    keys, ints for ints, finite numbers for finite numbers, tensors of the same shape."""
    if isinstance(like, (list, tuple)) and type(saved) is type(like) and len(saved) == len(like):
        return next((p for i, (s, x) in enumerate(zip(saved, like))
                     if (p := _kind_problem(s, x, f"{where}[{i}]"))), None)
    if isinstance(like, dict) and isinstance(saved, dict):
        if set(saved) != set(like):
            odd = sorted(map(repr, set(saved) ^ set(like)))
            return f"{where} keys differ from the live one's ({', '.join(odd[:3])})"
        return next((p for k in like if (p := _kind_problem(saved[k], like[k], f"{where}[{k!r}]"))),
                    None)
    if isinstance(like, float) and type(saved) in (int, float):
        ok = _finite(saved) or not math.isfinite(like)
    elif isinstance(like, torch.Tensor) and isinstance(saved, torch.Tensor):
        ok = saved.shape == like.shape and bool(torch.isfinite(saved.double()).all())
    else:
        ok = type(saved) is type(like) and not isinstance(like, (list, tuple, dict))
    return None if ok else f"{where} is {_kind(saved)}, expected {_kind(like, value=False)}"


def _kind(x: Any, value: bool = True) -> str:
    """``x`` for a one-line report: its value (``value``) or its type."""
    if isinstance(x, (list, tuple, dict)):
        return f"a {type(x).__name__} of {len(x)}"
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if value and (isinstance(x, (bool, int, float, str)) or x is None):
        return f"{x!r}"[:40]
    name = "None" if x is None else type(x).__name__
    return name if x is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


# ---------------------------------------------------------------------------------- files
def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(Path(path), checkpoint_bytes(payload), fault_point="checkpoint_write")


def load_checkpoint(path: Path, on_problem: Callable[[str], None] | None = None,
                    like: dict[str, torch.Tensor] | None = None, **expect: Any) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` when there is none.

    A file that cannot be used (unreadable, truncated, sha256 mismatch, not fitting ``like`` or
    ``expect``: the stage, optimiser and scheduler of :func:`payload_problem`), or a pickled
    ``.pt`` file in its place, is reported through ``on_problem`` (one line; also logged) and gives
    ``None``: the stage restarts. Without ``on_problem`` it raises :class:`CheckpointError`.
    """
    path = Path(path)
    ckpt = None
    legacy = path.with_suffix(LEGACY_SUFFIX)
    if path.is_file():
        try:
            ckpt = parse_checkpoint(path.read_bytes())
            reason = payload_problem(ckpt, like, **expect)
        except (OSError, ValueError) as exc:
            reason = str(exc)
        if reason:
            return _report(f"{path}: within-stage checkpoint not usable: {reason}; ignored, the "
                           "stage restarts from its beginning (delete the file to silence this)",
                           on_problem)
    elif legacy.is_file():
        problem = (f"{legacy}: pickled checkpoint (older aimm format, or planted): never loaded; "
                   "the stage restarts from its beginning (delete the file to silence this)")
        return _report(problem, on_problem)
    return ckpt


def _report(problem: str, on_problem: Callable[[str], None] | None) -> None:
    if on_problem is None:
        raise CheckpointError(problem)
    log.warning(problem)
    on_problem(problem)
    return None


__all__ = ["CheckpointError", "capture_rng", "checkpoint_bytes", "join_tensors",
           "load_checkpoint", "parse_checkpoint", "payload_problem",
           "restore_rng", "save_checkpoint", "split_tensors"]
