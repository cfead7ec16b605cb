"""The one exception type of the data layer: :class:`DataError` (defined in :mod:`aimm.errors`)."""

from __future__ import annotations

from aimm.errors import DataError

__all__ = ["DataError"]
