"""The live monitor: framework-free, used by every framework shell (:mod:`esdwatch.integrations`).

:class:`Monitor` is a thin front over named parts, each in its own module (see
``docs/architecture.md`` for the tour).
"""

from __future__ import annotations

from esdwatch.errors import EsdwatchError, EsdwatchWarning
from esdwatch.monitor.monitor import Monitor, auto_interval

__all__ = ["EsdwatchError", "EsdwatchWarning", "Monitor", "auto_interval"]
