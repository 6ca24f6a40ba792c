"""Where records go: JSON lines always, plus any dashboard the user has.

* :mod:`~esdwatch.sinks.jsonl`, :mod:`~esdwatch.sinks.spectra`: the run directory's
  files (their rules and readers: :mod:`esdwatch.rundir`);
* :mod:`~esdwatch.sinks.tensorboard`, :mod:`~esdwatch.sinks.wandb` (sharing
  :mod:`~esdwatch.sinks.dashboard`), :mod:`~esdwatch.sinks.metrics_logger`: dashboards,
  with the key names of :mod:`~esdwatch.sinks.tags`; :mod:`~esdwatch.sinks.factory`
  picks one per Trainer logger.

Importing this package imports neither TensorBoard, W&B nor matplotlib: the sink
classes are loaded on first access, and each imports its package only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

from esdwatch.sinks.base import Sink

# public name -> submodule that defines it (loaded on first access)
_EXPORTS: dict[str, str] = {
    "sinks_for_loggers": "factory",
    "sink_for_logger": "factory",
    "TensorBoardSink": "tensorboard",
    "WandbSink": "wandb",
    "MetricsLoggerSink": "metrics_logger",
    "SpectraSink": "spectra",
    "read_spectra": "spectra",
    "JsonlSink": "jsonl",
    "read_records": "jsonl",
    "read_alarms": "jsonl",
}

__all__ = ["Sink"] + sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
