"""Continual-learning methods: small plug-ins behind :class:`aimm.methods.base.Method`.

Add a method: write ``aimm/methods/<name>.py`` with a ``Method`` subclass (its facts as class
attributes) and add the class to :data:`METHODS` below; nothing else in the package names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aimm.errors import ConfigError
from aimm.methods.agem import AGEM
from aimm.methods.aimmerging import AIMMerging
from aimm.methods.base import Method, NoOptions, Stage
from aimm.methods.baselines import MultiTask, Replay, SeqLoRA, SingleTask
from aimm.methods.continual_merging import (DareLinear, DareTies, MagMax, OPCM, TaskArithmetic, Ties,
                                            WeightAverage)
from aimm.methods.ewc import EWC
from aimm.methods.incremental_lora import IncLoRA
from aimm.methods.lwf import LwF
from aimm.methods.olora import OLoRA
from aimm.methods.progprompt import ProgPrompt
from aimm.methods.recurrent_kif import RecurrentKIF
from aimm.methods.seq_ft import SeqFT
from aimm.util import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from aimm.config import RunConfig

#: The registry: method name -> class (the one way to register a method).
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (SeqLoRA, Replay, MultiTask, SingleTask, AIMMerging, RecurrentKIF,
                              EWC, AGEM, LwF, SeqFT, ProgPrompt, IncLoRA, OLoRA,
                              TaskArithmetic, Ties, DareLinear, DareTies, MagMax, OPCM, WeightAverage)
}


def build_method(cfg: "RunConfig", *, source: str = "config") -> Method:
    """The method of ``cfg`` with its validated ``method_options``.

    Raises :class:`ConfigError` (``<source>: method=...`` or ``<source>: method_options: ...``)
    for an unknown method or a bad option. :meth:`RunConfig.validate` checks only the config's
    own fields; this checks the method's.
    """
    cls = METHODS.get(cfg.method) if isinstance(cfg.method, str) else None
    if cls is None:
        raise ConfigError(f"{source}: method={cfg.method!r}: unknown; choose one of "
                          f"{', '.join(METHODS)}" + did_you_mean(cfg.method, METHODS))
    try:
        return cls(cls.parse_options(cfg.method_options or {}))
    except ConfigError as exc:
        raise ConfigError(f"{source}: method_options: {exc}") from exc


__all__ = ["METHODS", "Method", "NoOptions", "Stage", "build_method"]
