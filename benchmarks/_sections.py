"""Where a run's wall time goes: exclusive time per category, from temporary hooks.

:class:`Sections` keeps a stack of open sections; a section's time is its wall time minus that of
the sections opened inside it (exclusive time). An *opaque* section absorbs everything inside it
(a probe's forward counts as ``probe``, not ``forward``); a transparent one lets its children
count for themselves (a method's ``merge`` is ``merge``, its rehearsal steps ``rehearsal``).
Time outside every section is what the caller reports as ``other``.

:func:`profiling_hooks` installs the hooks for the duration of a ``with`` block and removes them
after (nothing is left behind: no overhead when off):

* functions are wrapped wherever ``aimm`` modules bound them (``from x import f`` included), by
  identity, so a refactor that moves a caller keeps them covered; a target that no longer exists
  is reported in :attr:`Sections.missing` instead of failing;
* methods of classes (``TrainContext.forgetting_signal``, ``EncodedExamples.batch``...) are found by
  class name in the loaded ``aimm`` modules; a registered method's own ``merge`` is a transparent
  ``merge`` section (its rehearsal steps count as ``rehearsal``);
* the model's forward: global module forward hooks (the outermost module call is one forward;
  ``nn.Embedding`` inputs count the tokens processed, per category), the optimiser step: torch's
  global optimiser step hooks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

CATEGORIES = ("forward", "backward", "optimizer", "probe", "rehearsal", "merge", "eval", "data",
              "writes", "model_load")

# (module, function, category): wrapped in every aimm module that bound it, opaque
FUNCTIONS = [
    ("aimm.data", "load_tasks", "data"),
    ("aimm.data", "memory_buffers", "data"),
    ("aimm.util", "atomic_write_bytes", "writes"),
    ("aimm.integrity", "sha256_file", "writes"),
    ("aimm.export", "save_adapter", "writes"),
    ("safetensors.torch", "save", "writes"),
    ("aimm.evaluation", "evaluate_task", "eval"),
    ("aimm.models", "load_model", "model_load"),
    ("aimm.models", "attach_lora", "model_load"),
    ("torch.nn.functional", "cross_entropy", "forward"),  # the loss belongs to the forward
] + [("aimm.merging.fusion", name, "merge") for name in (
    "snapshot", "delta", "l1_norm", "weighted_fusion", "apply_", "update_importance",
    "importance_scores", "top_mask", "mask_fusion")]

# (class name, method, category, opaque): classes looked up by name in the aimm modules
METHODS = [
    ("EncodedExamples", "from_texts", "data", True),
    ("EncodedExamples", "batch", "data", True),
    ("TrainContext", "to_device", "data", True),
    ("TrainContext", "forgetting_signal", "probe", True),
    ("TrainContext", "rehearsal_step", "rehearsal", True),
    ("MergeController", "observe", "merge", True),
    ("MergeController", "next_interval_after_merge", "merge", True),
]

# (class, method, category): torch / accelerate classes
TORCH_METHODS = [
    (torch.Tensor, "backward", "backward"),
    (torch.optim.Optimizer, "zero_grad", "optimizer"),
    (torch.optim.lr_scheduler.LRScheduler, "step", "optimizer"),
]

# modules imported before patching, so that their bindings are patched too
PRELOAD = ("aimm.engine", "aimm.training.engine", "aimm.training.loop", "aimm.training.artifacts",
           "aimm.evaluation", "aimm.export", "aimm.integrity", "aimm.data",
           "aimm.models", "aimm.merging.fusion", "aimm.methods", "aimm.encoding", "accelerate")


@dataclass
class _Frame:
    category: str
    start: float
    opaque: bool
    child: float = 0.0


class Sections:
    """Exclusive seconds, calls and tokens per (bucket, category); ``bucket`` is set by the caller."""

    def __init__(self) -> None:
        self.seconds: dict = defaultdict(float)
        self.calls: dict = defaultdict(int)
        self.tokens: dict = defaultdict(int)
        self.stack: list[_Frame] = []
        self.bucket = 0
        self.missing: list[str] = []

    def enter(self, category: str, opaque: bool = True) -> _Frame | None:
        if self.stack and self.stack[-1].opaque:
            return None  # absorbed by the enclosing opaque section
        frame = _Frame(category, time.perf_counter(), opaque)
        self.stack.append(frame)
        return frame

    def exit(self, frame: _Frame | None) -> None:
        if frame is None:
            return
        while self.stack and self.stack[-1] is not frame:  # an exception skipped some exits
            self.stack.pop()
        if self.stack:
            self.stack.pop()
        elapsed = time.perf_counter() - frame.start
        self.seconds[(self.bucket, frame.category)] += elapsed - frame.child
        self.calls[(self.bucket, frame.category)] += 1
        if self.stack:
            self.stack[-1].child += elapsed

    def count_tokens(self, n: int) -> None:
        category = self.stack[-1].category if self.stack else "other"
        self.tokens[(self.bucket, category)] += n

    def wrap(self, fn, category: str, opaque: bool = True):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            frame = self.enter(category, opaque)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit(frame)

        return timed

    def bucket_totals(self, bucket: int) -> dict:
        pick = lambda d: {c: v for (b, c), v in d.items() if b == bucket}  # noqa: E731
        return {"seconds": pick(self.seconds), "calls": pick(self.calls), "tokens": pick(self.tokens)}


def _aimm_modules() -> list:
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "aimm" or name.startswith("aimm."))]


def _find_class(name: str, attr: str):
    for module in _aimm_modules():
        cls = getattr(module, name, None)
        if inspect.isclass(cls) and cls.__module__.startswith("aimm") and hasattr(cls, attr):
            return cls
    return None


class _Patches:
    """Attribute replacements, undone in reverse order (and wherever a wrapper was re-bound)."""

    def __init__(self) -> None:
        self.undo: list[tuple[object, str, object, object]] = []  # owner, name, original, wrapper

    def set(self, owner, name: str, original, wrapper) -> None:
        self.undo.append((owner, name, original, wrapper))
        setattr(owner, name, wrapper)

    def restore(self) -> None:
        wrappers = {}
        for owner, name, original, wrapper in reversed(self.undo):
            setattr(owner, name, original)
            wrappers[id(wrapper)] = (wrapper, original)
        for module in _aimm_modules():  # modules imported while patched bound the wrapper
            for key, value in list(vars(module).items()):
                hit = wrappers.get(id(value))
                if hit is not None and hit[0] is value:
                    setattr(module, key, hit[1])


def _patch_function(patches: _Patches, sections: Sections, module_name: str, attr: str,
                    category: str) -> bool:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    original = getattr(module, attr, None)
    if not callable(original):
        return False
    wrapper = sections.wrap(original, category)
    owners = {id(module): module}
    for m in _aimm_modules():
        if any(v is original for v in vars(m).values()):
            owners[id(m)] = m
    for owner in owners.values():
        for key, value in list(vars(owner).items()):
            if value is original:
                patches.set(owner, key, original, wrapper)
    return True


def _patch_method(patches: _Patches, sections: Sections, cls, attr: str, category: str,
                  opaque: bool = True) -> None:
    static = inspect.getattr_static(cls, attr)
    if isinstance(static, classmethod):
        wrapper = classmethod(sections.wrap(static.__func__, category, opaque))
    elif isinstance(static, staticmethod):
        wrapper = staticmethod(sections.wrap(static.__func__, category, opaque))
    else:
        wrapper = sections.wrap(static, category, opaque)
    owner = next(k for k in cls.__mro__ if attr in vars(k))
    patches.set(owner, attr, static, wrapper)


@contextlib.contextmanager
def profiling_hooks(sections: Sections):
    """Install every hook of the module docstring for the ``with`` block; remove them after."""
    for name in PRELOAD:
        importlib.import_module(name)
    from accelerate import Accelerator
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    patches = _Patches()
    handles = []
    try:
        for module_name, attr, category in FUNCTIONS:
            if not _patch_function(patches, sections, module_name, attr, category):
                sections.missing.append(f"{module_name}.{attr}")
        for cls_name, attr, category, opaque in METHODS:
            cls = _find_class(cls_name, attr)
            if cls is None:
                sections.missing.append(f"{cls_name}.{attr}")
                continue
            _patch_method(patches, sections, cls, attr, category, opaque)
        from aimm.methods import METHODS as REGISTRY

        for cls in REGISTRY.values():  # a method's own merge(): its rehearsal steps stay rehearsal
            if "merge" in vars(cls):
                _patch_method(patches, sections, cls, "merge", "merge", opaque=False)
        for cls, attr, category in TORCH_METHODS + [(Accelerator, "clip_grad_norm_", "optimizer")]:
            _patch_method(patches, sections, cls, attr, category)
        handles += _forward_hooks(sections)
        step_frames: list = []
        handles.append(register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: step_frames.append(sections.enter("optimizer"))))
        handles.append(register_optimizer_step_post_hook(
            lambda opt, args, kwargs: sections.exit(step_frames.pop() if step_frames else None)))
        yield sections
    finally:
        for handle in handles:
            handle.remove()
        patches.restore()


def _forward_hooks(sections: Sections) -> list:
    from torch.nn.modules.module import (register_module_forward_hook,
                                         register_module_forward_pre_hook)

    depth = [0]
    frames: list = []

    def pre(module, inputs):
        if isinstance(module, torch.nn.Embedding) and inputs and torch.is_tensor(inputs[0]):
            sections.count_tokens(int(inputs[0].numel()))
        depth[0] += 1
        if depth[0] == 1:
            frames.append(sections.enter("forward"))

    def post(module, inputs, output):
        if depth[0] == 1 and frames:
            sections.exit(frames.pop())
        depth[0] = max(0, depth[0] - 1)

    return [register_module_forward_pre_hook(pre),
            register_module_forward_hook(post, always_call=True)]
