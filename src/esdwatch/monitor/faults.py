"""Faults of the live monitor: logged once, never fatal to training unless ``strict``.

A failure inside esdwatch (discovering the layers, copying the weights, evaluating the
alarms), in a sink, in an alarm action or in the analysis of a layer is logged with its
name and step, and training continues. Under ``strict=True`` the first such failure is
kept as an :class:`~esdwatch.errors.EsdwatchError` and raised on the training thread at
the next hook, after the records of that snapshot are written (:meth:`Faults.raise_pending`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from esdwatch.errors import EsdwatchError, EsdwatchWarning

log = logging.getLogger("esdwatch.monitor")

__all__ = ["Faults"]


class Faults:
    """Warn-once bookkeeping and the pending strict-mode error of one monitor."""

    def __init__(self, strict: bool, stats: dict[str, float]):
        self.strict = strict
        self.stats = stats
        self.pending: EsdwatchError | None = None
        self._warned: set[str] = set()
        self._broken_sinks: set[int] = set()

    def first_time(self, key: str) -> bool:
        """True the first time ``key`` is seen (then never again)."""
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

    def warn_once(self, key: str, message: str) -> None:
        """Log ``message`` and raise it as an :class:`EsdwatchWarning`, once per ``key``."""
        if self.first_time(key):
            log.warning(message)
            warnings.warn(message, EsdwatchWarning, stacklevel=4)

    def fail(self, message: str) -> None:
        """Keep ``message`` as the error to raise under ``strict`` (the first one wins)."""
        if self.strict and self.pending is None:
            self.pending = EsdwatchError(message)

    def internal_error(self, what: str, step: int, exc: Exception) -> None:
        """A failure of esdwatch itself: logged (with its traceback once per kind), the snapshot skipped."""
        self.stats["internal_errors"] = self.stats.get("internal_errors", 0) + 1
        log.error(
            "esdwatch: %s failed at step %d (%s: %s); this snapshot is skipped, training continues",
            what,
            step,
            type(exc).__name__,
            exc,
            exc_info=self.first_time(f"internal:{what}"),
        )
        self.fail(f"esdwatch: {what} failed at step {step}: {exc}")

    def sink_failed(self, sink: Any, what: str, exc: Exception) -> None:
        """A sink raised: warned once per sink (then at debug level); the other sinks still run."""
        if id(sink) not in self._broken_sinks:
            self._broken_sinks.add(id(sink))
            log.warning(
                "esdwatch: sink %s failed in %s: %s: %s (further failures of this sink are logged at debug level)",
                type(sink).__name__,
                what,
                type(exc).__name__,
                exc,
                exc_info=True,
            )
        else:
            log.debug("esdwatch: sink %s failed again in %s: %s", type(sink).__name__, what, exc)
        self.fail(f"esdwatch: sink {type(sink).__name__}.{what} failed: {exc}")

    def take_pending(self) -> EsdwatchError | None:
        err, self.pending = self.pending, None
        return err

    def raise_pending(self) -> None:
        err = self.take_pending()
        if err is not None:
            raise err
