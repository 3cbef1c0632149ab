"""Unconditional generators: no condition to request (RequestKind's defaults)."""
from __future__ import annotations

from .base import RequestKind


class NoCondition(RequestKind):
    pass
