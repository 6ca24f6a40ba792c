"""Where a monitor's results go: its run directory and its sinks, each call isolated from failures.

The writer (rank 0) opens ``<log_dir>/esdwatch/`` (``<log_dir>/esdwatch/<name>/`` for a
named monitor) as a new run segment: ``records.jsonl`` and ``alarms.jsonl`` through
:class:`~esdwatch.sinks.jsonl.JsonlSink`, and, with ``keep_evals``, ``spectra.jsonl``
through a :class:`~esdwatch.sinks.spectra.SpectraSink` (the eigenvalues are in hand
anyway; a few hundred bytes per layer and snapshot keep the ESD for ``esdwatch report``)
unless the user's sinks already hold one. A resumed run writes the next segment; what
the interrupted run wrote after the checkpoint is superseded for every reader, and a run
resumed into another directory first copies the history up to the checkpoint.

Every sink call goes through :meth:`Outputs.call`: a sink that raises is reported by
:class:`~esdwatch.monitor.faults.Faults` and the other sinks still run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from esdwatch.monitor.faults import Faults
from esdwatch.rundir import RECORDS_FILE, copy_run, next_segment
from esdwatch.schema import Alarm, LayerRecord, SkippedLayer
from esdwatch.sinks.jsonl import JsonlSink
from esdwatch.sinks.spectra import SpectraSink

log = logging.getLogger("esdwatch.monitor")

__all__ = ["Outputs"]


class Outputs:
    """The run directory's files and the sinks of one monitor (files on the writer only)."""

    def __init__(self, directory: Path | None, sinks: Sequence[Any], faults: Faults, *, writer: bool, keep_evals: bool):
        self.directory = directory
        self.sinks: list[Any] = list(sinks)
        self.faults = faults
        self.writer = writer
        self.keep_evals = keep_evals
        self.segment = 0
        #: the step a resumed (or continued) run goes on from; None for a fresh run
        self.resumed_from: int | None = None
        #: the directory of the run this one resumes (from the checkpoint)
        self.previous_dir: str | None = None
        self._jsonl: JsonlSink | None = None
        self._disk_refuses = False  # the last write to the run directory failed
        self._skipped_names: tuple[str, ...] = ()  # the matrices skipped at the last snapshot, as written

    @property
    def records_path(self) -> Path | None:
        return None if self.directory is None else self.directory / RECORDS_FILE

    @property
    def is_open(self) -> bool:
        return self._jsonl is not None and self._jsonl.is_open

    def open(self) -> None:
        """Open the next run segment (the writer only; idempotent); a disk that refuses is reported, never raised."""
        out = self.directory
        if not self.writer or out is None or self._jsonl is not None:
            return
        self._to_disk(self._open_segment)
        if self.keep_evals and not any(isinstance(s, SpectraSink) for s in self.sinks):
            self.sinks.append(SpectraSink(out))

    def _open_segment(self) -> None:
        out = self.directory
        assert out is not None
        # the sink exists from here on: if the disk refuses below, the records wait in it
        self._jsonl = JsonlSink(
            out, segment=self.segment if self.resumed_from is not None else None, resumed_from_step=self.resumed_from
        )
        if self.resumed_from is not None and self.previous_dir and Path(self.previous_dir) != out:
            prev = Path(self.previous_dir)
            if (prev / RECORDS_FILE).exists() and not (out / RECORDS_FILE).exists():
                n = copy_run(prev, out, self.resumed_from)
                log.info(
                    "esdwatch: resumed into %s: copied %d records up to step %d from %s",
                    out,
                    n,
                    self.resumed_from,
                    prev,
                )
        segment = next_segment(out)
        if self.resumed_from is not None:
            segment = max(segment, self.segment)
        elif segment > 0:
            log.warning(
                "esdwatch: %s already holds the records of an earlier run; this fresh run writes segment %d, and "
                "readers (esdwatch report, read_records) show only its records from now on (the earlier ones stay "
                "in the file: read_records(..., dedupe=False)). Give each run its own log_dir or name to keep both.",
                out,
                segment,
            )
        self.segment = self._jsonl.segment = segment
        self._jsonl.open()

    def _to_disk(self, action: Callable[[], Any]) -> None:
        """A write to the run directory. A disk that refuses it (full, unwritable) costs one warning per outage:
        training goes on, the dashboards still get every snapshot, and the records wait in memory
        (:class:`~esdwatch.sinks.jsonl.JsonlSink`) until the directory takes them again."""
        try:
            action()
        except OSError as exc:
            if not self._disk_refuses:
                self._disk_refuses = True
                log.warning(
                    "esdwatch: cannot write to %s (%s: %s); training goes on, the dashboards still get every "
                    "snapshot, and the records are kept in memory and written when the directory is writable again",
                    self.directory,
                    type(exc).__name__,
                    exc,
                )
            self.faults.fail(f"esdwatch: cannot write to {self.directory}: {exc}")
            return
        if self._disk_refuses:
            self._disk_refuses = False
            log.warning("esdwatch: %s is writable again; the records held back are written", self.directory)

    def reopen_as_resumed(self) -> None:
        """A state was loaded after the outputs were opened: close them; :meth:`open` writes a resumed segment."""
        if self._jsonl is not None:
            log.warning("esdwatch: load_state_dict after the run started; reopening the outputs as a resumed segment")
            self._to_disk(self._jsonl.close)
            self._jsonl = None

    def call(self, sink: Any, what: str, action: Callable[[], Any]) -> None:
        """Run one sink call; a failure is reported once and never reaches the training loop (unless strict)."""
        try:
            action()
        except Exception as exc:
            self.faults.sink_failed(sink, what, exc)

    def _all(self) -> list[Any]:
        return ([self._jsonl] if self._jsonl is not None else []) + self.sinks

    def write(self, records: list[LayerRecord], step: int) -> None:
        if records:
            if self._jsonl is not None:
                self._to_disk(functools.partial(self._jsonl.write, records, step))
            for sink in self.sinks:
                self.call(sink, "write", functools.partial(sink.write, records, step))

    def alarm(self, alarm: Alarm) -> None:
        if self._jsonl is not None:
            self._to_disk(functools.partial(self._jsonl.alarm, alarm))
        for sink in self.sinks:
            self.call(sink, "alarm", functools.partial(sink.alarm, alarm))

    def end_snapshot(self, step: int) -> None:
        """The snapshot at ``step`` and its alarms are all out: a sink with ``end_snapshot`` writes what it batched."""
        for sink in self.sinks:
            end = getattr(sink, "end_snapshot", None)
            if callable(end):
                self.call(sink, "end_snapshot", functools.partial(end, step))

    def skipped(self, info: dict[str, Any]) -> None:
        """A scheduled snapshot that was not taken, and why (``skipped_snapshots.jsonl``)."""
        if self._jsonl is not None:
            self._to_disk(functools.partial(self._jsonl.skipped, info))

    def skipped_layers(self, step: int, skipped: Sequence[SkippedLayer]) -> None:
        """The matrices found but not analysed, and why (``skipped_layers.jsonl``), when the set changes."""
        names = tuple(s.name for s in skipped)
        if self._jsonl is None or names == self._skipped_names:
            return
        self._skipped_names = names
        rows = [{"global_step": step, "segment": self.segment, **s.to_dict()} for s in skipped]
        if rows:
            self._to_disk(functools.partial(self._jsonl.skipped_layers, rows))

    def distributed(self, info: dict[str, Any]) -> None:
        """Which rank analysed which layer of one snapshot (``distributed.jsonl``)."""
        if self._jsonl is not None:
            self._to_disk(functools.partial(self._jsonl.distributed, info))

    def close(self) -> None:
        if self._jsonl is not None and self._jsonl.pending_bytes:
            self._to_disk(self._jsonl.close)  # a last try for what the disk refused so far
            if self._jsonl.pending_bytes:
                log.error(
                    "esdwatch: %d bytes of records could not be written to %s (the disk still refuses them)",
                    self._jsonl.pending_bytes,
                    self.directory,
                )
        for sink in self._all():
            try:
                sink.close()
            except Exception as exc:
                log.warning("esdwatch: closing sink %s failed: %s", type(sink).__name__, exc)
        self._jsonl = None
