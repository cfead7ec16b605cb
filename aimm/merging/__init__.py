"""Merging math of AIMMerging: the merge-timing controller and the fusion functions.

``controller`` is pure Python; the torch-based ``fusion`` functions are imported
lazily so that ``from aimm.merging import MergeController`` does not import torch.
"""

from __future__ import annotations

from typing import Any

from .controller import (
    NORMALIZE_BY,
    OFFICIAL_FUSION_TABLE,
    VARIANTS,
    ControllerConfig,
    ControllerState,
    MergeController,
    MergeEvent,
    fusion_weights,
    official_next_interval,
    paper_next_interval,
    paper_trend,
)

_FUSION_NAMES = (
    "snapshot",
    "delta",
    "l1_norm",
    "weighted_fusion",
    "apply_",
    "init_importance",
    "update_importance",
    "importance_scores",
    "top_mask",
    "mask_fusion",
    "mask_weights",
    "mask_share",
)

__all__ = [
    "ControllerConfig",
    "ControllerState",
    "official_next_interval",
    "paper_next_interval",
    "paper_trend",
    "MergeController",
    "MergeEvent",
    "fusion_weights",
    "OFFICIAL_FUSION_TABLE",
    "VARIANTS",
    "NORMALIZE_BY",
    *_FUSION_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _FUSION_NAMES:
        from . import fusion

        return getattr(fusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
