"""The durable record: the sink that appends ``records.jsonl`` and ``alarms.jsonl``.

:class:`JsonlSink` writes a monitor's output directory (``<log_dir>/esdwatch/``, or
``<log_dir>/esdwatch/<name>/`` for a named monitor): one line per record and per alarm,
one line per run segment in ``segments.jsonl``, and the distributed bookkeeping. The
file names, the line formats, the run-segment rules and the readers belong to
:mod:`esdwatch.rundir`; the readers and the resume helpers are re-exported here, where
callers have always imported them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from esdwatch.rundir import (
    ALARMS_FILE,
    DISTRIBUTED_FILE,
    RECORDS_FILE,
    SEGMENTS_FILE,
    alarm_line,
    copy_history,
    dump_lines,
    next_segment,
    open_append,
    read_alarms,
    read_distributed,
    read_records,
    read_segments,
    segment_line,
)
from esdwatch.schema import Alarm, LayerRecord

__all__ = [
    "JsonlSink",
    "read_records",
    "read_alarms",
    "read_segments",
    "read_distributed",
    "next_segment",
    "copy_history",
    "RECORDS_FILE",
    "ALARMS_FILE",
    "SEGMENTS_FILE",
]


class JsonlSink:
    """Writes records and alarms as JSON lines (see :mod:`esdwatch.rundir`). A :class:`~esdwatch.sinks.base.Sink`.

    Records go out one snapshot at a time in a single ``write``, then a flush, so a
    crash leaves at most a torn last line (which readers skip and the next writer ends).

    Parameters
    ----------
    directory:
        The output directory (created on :meth:`open`), normally ``<log_dir>/esdwatch``.
    segment:
        This run's segment number; ``None`` takes the next free one in ``directory``.
    resumed_from_step:
        The global step of the checkpoint this run resumed from (None: fresh start).
    fsync:
        Also ``os.fsync`` after each snapshot (survives a power loss; slower).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        segment: int | None = None,
        resumed_from_step: int | None = None,
        fsync: bool = False,
    ):
        self.directory = Path(directory)
        self.segment = segment
        self.resumed_from_step = resumed_from_step
        self.fsync = fsync
        self._records: IO[bytes] | None = None
        self._alarms: IO[bytes] | None = None
        self._distributed: IO[bytes] | None = None

    @property
    def records_path(self) -> Path:
        return self.directory / RECORDS_FILE

    @property
    def alarms_path(self) -> Path:
        return self.directory / ALARMS_FILE

    @property
    def segments_path(self) -> Path:
        return self.directory / SEGMENTS_FILE

    @property
    def is_open(self) -> bool:
        return self._records is not None

    def open(self) -> JsonlSink:
        if self._records is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.segment is None:
            self.segment = next_segment(self.directory)
        with open_append(self.segments_path) as fh:
            fh.write(dump_lines([segment_line(self.segment, self.resumed_from_step)]))
        self._records = open_append(self.records_path)
        self._alarms = open_append(self.alarms_path)
        return self

    def _flush(self, fh) -> None:
        fh.flush()
        if self.fsync:
            os.fsync(fh.fileno())

    def write(self, records: Sequence[LayerRecord], step: int) -> None:
        """Append one snapshot's records in one write, then flush."""
        if not records:
            return
        self.open()
        assert self._records is not None  # open() opened it
        self._records.write(dump_lines(r.to_dict() for r in records))
        self._flush(self._records)

    def distributed(self, info: Mapping[str, Any]) -> None:
        """Append one snapshot's distributed bookkeeping (owners per layer) to ``distributed.jsonl``."""
        self.open()
        if self._distributed is None:
            self._distributed = open_append(self.directory / DISTRIBUTED_FILE)
        self._distributed.write(dump_lines([dict(info)]))
        self._flush(self._distributed)

    def alarm(self, alarm: Alarm) -> None:
        self.open()
        assert self._alarms is not None  # open() opened it
        self._alarms.write(dump_lines([alarm_line(alarm, self.segment)]))
        self._flush(self._alarms)

    def close(self) -> None:
        for fh in (self._records, self._alarms, self._distributed):
            if fh is not None:
                try:
                    self._flush(fh)
                finally:
                    fh.close()
        self._records = self._alarms = self._distributed = None
