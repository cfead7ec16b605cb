"""Continual-learning methods: small plug-ins behind :class:`aimm.methods.base.Method`.

Add a method: write ``aimm/methods/<name>.py`` with a ``Method`` subclass and register it here.
"""

from __future__ import annotations

from aimm.methods.base import Method, NoOptions, Stage
from aimm.methods.aimmerging import AIMMerging
from aimm.methods.baselines import MultiTask, Replay, SeqLoRA, SingleTask
from aimm.methods.recurrent_kif import RecurrentKIF

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (SeqLoRA, Replay, MultiTask, SingleTask, AIMMerging, RecurrentKIF)
}


def register(cls: type[Method]) -> type[Method]:
    """Register a method class under its ``name`` (usable as a decorator)."""
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, options: dict | None = None) -> Method:
    cls = METHODS[name]
    return cls(cls.parse_options(options or {}))


__all__ = ["METHODS", "Method", "NoOptions", "Stage", "build_method", "register"]
