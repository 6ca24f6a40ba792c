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
    SKIPPED_LAYERS_FILE,
    SKIPPED_SNAPSHOTS_FILE,
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


#: bytes kept in memory per file while the disk refuses them (full, unwritable, gone); past this
#: the oldest whole lines are dropped, counted and logged
BACKLOG_LIMIT = 64 * 2**20


class JsonlSink:
    """Writes records and alarms as JSON lines (see :mod:`esdwatch.rundir`). A :class:`~esdwatch.sinks.base.Sink`.

    Records go out one snapshot at a time in a single ``write``, then a flush, so a
    crash leaves at most a torn last line (which readers skip and the next writer ends).
    A write the disk refuses (full, unwritable, the directory missing) raises for the
    caller to report, and its lines wait in memory (up to :data:`BACKLOG_LIMIT` bytes
    per file): the next write reopens the file and writes them first, so a disk that
    recovers loses nothing.

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
        self._opened = False
        self._files: dict[str, IO[bytes]] = {}
        self._backlog: dict[str, bytearray] = {}
        #: lines dropped because the backlog was full (per file name)
        self.dropped_lines: dict[str, int] = {}

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
        return self._opened

    @property
    def pending_bytes(self) -> int:
        """Bytes handed to this sink but not on disk yet (the disk refused them)."""
        return sum(len(b) for b in self._backlog.values())

    def open(self) -> JsonlSink:
        """Create the directory and start this run's segment (idempotent; OSError if the disk refuses)."""
        if self._opened:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.segment is None:
            self.segment = next_segment(self.directory)
        self._opened = True  # the segment line waits in the backlog if it cannot be written now
        self._append(SEGMENTS_FILE, dump_lines([segment_line(self.segment, self.resumed_from_step)]))
        return self

    def write(self, records: Sequence[LayerRecord], step: int) -> None:
        """Append one snapshot's records in one write, then flush."""
        if records:
            self._append(RECORDS_FILE, dump_lines(r.to_dict() for r in records))

    def distributed(self, info: Mapping[str, Any]) -> None:
        """Append one snapshot's distributed bookkeeping (owners per layer) to ``distributed.jsonl``."""
        self._append(DISTRIBUTED_FILE, dump_lines([dict(info)]))

    def skipped(self, info: Mapping[str, Any]) -> None:
        """Append a scheduled snapshot that was not taken, with its reason, to ``skipped_snapshots.jsonl``."""
        self._append(SKIPPED_SNAPSHOTS_FILE, dump_lines([dict(info)]))

    def skipped_layers(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append the matrices a snapshot found but did not analyse, and why, to ``skipped_layers.jsonl``."""
        self._append(SKIPPED_LAYERS_FILE, dump_lines(dict(r) for r in rows))

    def alarm(self, alarm: Alarm) -> None:
        self._append(ALARMS_FILE, dump_lines([alarm_line(alarm, self.segment)]))

    def _append(self, name: str, payload: bytes) -> None:
        """Append whole lines to file ``name``, after those an earlier call could not write."""
        pending = self._backlog.setdefault(name, bytearray())
        pending += payload
        try:
            self.open()
            fh = self._files.get(name)
            if fh is None:
                fh = self._files[name] = open_append(self.directory / name)  # ends a torn last line
            fh.write(pending)
            self._flush(fh)
        except OSError:
            self._drop_files()  # the next call reopens them
            self._trim(name)
            raise
        pending.clear()

    def _trim(self, name: str) -> None:
        pending = self._backlog[name]
        if len(pending) <= BACKLOG_LIMIT:
            return
        cut = pending.find(b"\n", len(pending) - BACKLOG_LIMIT) + 1 or len(pending)
        self.dropped_lines[name] = self.dropped_lines.get(name, 0) + pending[:cut].count(b"\n")
        del pending[:cut]

    def _flush(self, fh: IO[bytes]) -> None:
        fh.flush()
        if self.fsync:
            os.fsync(fh.fileno())

    def _drop_files(self) -> None:
        for fh in self._files.values():
            try:
                fh.close()
            except OSError:  # its unflushed bytes are still in the backlog
                pass
        self._files.clear()
        if not self.directory.is_dir():
            self._opened = False  # the directory went away: open() creates it again

    def close(self) -> None:
        """Write what is pending (if the disk takes it now) and close the files."""
        try:
            for name in [n for n, b in self._backlog.items() if b]:
                self._append(name, b"")
        finally:
            for fh in self._files.values():
                try:
                    self._flush(fh)
                finally:
                    fh.close()
            self._files.clear()
            self._opened = False
