"""Scalars for any Lightning logger through ``log_metrics`` (CSV, MLflow, Comet, Neptune ...).

:class:`MetricsLoggerSink` is the sink for a logger that has no richer esdwatch sink: it
logs the keys of :mod:`esdwatch.sinks.tags` (the same as the TensorBoard and W&B sinks)
and one key per alarm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from esdwatch.schema import Alarm, LatestRecords, LayerRecord
from esdwatch.sinks.tags import SCALAR_METRICS, finite_value, prefix_for, scalar_metrics

log = logging.getLogger("esdwatch.sinks")

__all__ = ["MetricsLoggerSink"]


class MetricsLoggerSink:
    """Writes the scalars of every snapshot through ``logger.log_metrics(metrics, step)``.

    For Lightning loggers without a richer esdwatch sink (CSVLogger, MLFlowLogger, ...)
    or any object with that method. Keys are those of :func:`scalar_metrics`; each fired
    alarm is logged as ``<prefix>/alarm/<kind>/<layer>`` = the value that crossed the
    threshold, at the alarm's step. ``close()`` calls ``logger.save()`` when it exists
    (CSVLogger buffers rows until then) and never closes the logger itself.
    """

    needs_evals = False

    def __init__(
        self,
        logger: Any,
        *,
        prefix: str | None = None,
        name: str | None = None,
        summary: bool = True,
        metrics: Sequence[str] = SCALAR_METRICS,
        alarms: bool = True,
    ) -> None:
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(f"{type(logger).__name__} has no log_metrics(metrics, step) method")
        self.logger = logger
        self.prefix = prefix_for(name, prefix)
        self.summary = summary
        self.metrics = tuple(metrics)
        self.alarms = alarms
        self._last_step: int | None = None
        self._by_layer = LatestRecords()  # each layer's latest record: the summary under rotation

    def write(self, records: Sequence[LayerRecord], step: int) -> None:
        values = scalar_metrics(records, self.prefix, self.metrics, self.summary, self._by_layer.update(records))
        if values:
            self.logger.log_metrics(values, step=int(step))
        self._last_step = int(step)

    def alarm(self, alarm: Alarm) -> None:
        if not self.alarms:
            return
        value = finite_value(alarm.value)
        step = alarm.step if alarm.step is not None else self._last_step
        key = f"{self.prefix}/alarm/{alarm.kind}/{alarm.layer}"
        self.logger.log_metrics({key: 1.0 if value is None else value}, step=None if step is None else int(step))

    def close(self) -> None:
        save = getattr(self.logger, "save", None)
        if callable(save):
            try:
                save()
            except Exception as exc:  # the logger may already be finalized
                log.debug("esdwatch: %s.save() failed at close: %s", type(self.logger).__name__, exc)

    def __repr__(self) -> str:
        return f"MetricsLoggerSink({type(self.logger).__name__}, prefix={self.prefix!r})"
