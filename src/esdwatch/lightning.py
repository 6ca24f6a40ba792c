"""``esdwatch.lightning``: the Lightning callback's public import path.

The shell lives in :mod:`esdwatch.integrations.lightning`; this module re-exports it
(``ESDMonitor``, ``LightningESDMonitor``, ``PLESDMonitor`` are created on first access,
so importing this module imports neither ``lightning`` nor ``pytorch_lightning``).
"""

from __future__ import annotations

from typing import Any

from esdwatch.integrations import lightning as _shell
from esdwatch.integrations.lightning import ESDMonitorBase, callback_class

__all__ = ["ESDMonitorBase", "ESDMonitor", "LightningESDMonitor", "PLESDMonitor", "callback_class"]


def __getattr__(name: str) -> Any:
    return getattr(_shell, name)
