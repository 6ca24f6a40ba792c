"""The sink protocol: anything with ``write``, ``alarm`` and ``close`` receives records.

Sinks are always called from the training (main) thread, in step order, never from the
analysis worker, so a sink may call its logger's API directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from esdwatch.alarms.rules import Alarm
from esdwatch.schema import LayerRecord


@runtime_checkable
class Sink(Protocol):
    """Receives every snapshot's records and every alarm.

    ``write(records, step)``: the records of one snapshot (one per analysed layer, all
    with ``global_step == step``, with eigenvalues on ``record.report.evals`` when the
    monitor keeps them). ``alarm(alarm)``: an alarm that fired (after patience).
    ``close()``: the run is over; flush.

    Optional: ``end_snapshot(step)``, called (when the sink has it) once the snapshot at
    ``step`` and all its alarms were passed on, for a sink that writes a snapshot's
    alarms together (the TensorBoard and W&B sinks).
    """

    def write(self, records: Sequence[LayerRecord], step: int) -> None: ...

    def alarm(self, alarm: Alarm) -> None: ...

    def close(self) -> None: ...
