"""The durable record: ``records.jsonl`` and ``alarms.jsonl`` under ``<log_dir>/esdwatch/``.

Layout of an output directory (``<log_dir>/esdwatch/``, or ``<log_dir>/esdwatch/<name>/``
for a named monitor):

``records.jsonl``
    One JSON line per :class:`~esdwatch.schema.LayerRecord` (one layer at one
    snapshot), appended one snapshot at a time with a single ``write`` and flushed, so a
    crash leaves at most a truncated last line, which readers skip (and the next writer
    terminates before appending).
``alarms.jsonl``
    One JSON line per fired :class:`~esdwatch.alarms.rules.Alarm`, plus its ``segment``.
``segments.jsonl``
    One line per run segment that wrote here: ``{"segment": k, "resumed_from_step": S}``
    (``S`` is null for a fresh start).
``distributed.jsonl`` (distributed runs only)
    One line per snapshot: which rank analysed each layer (``owners``), the mode
    (``replicated`` for DDP, ``dtensor`` for FSDP2, ``fsdp1``) and per rank its number of
    layers, their relative cost and the worker's seconds (:func:`read_distributed`).

Run segments: a fresh run writes segment 0; a run resumed from a checkpoint taken at
global step S writes the next segment, with ``resumed_from_step = S``. Whatever the
interrupted run wrote *after* S is superseded: :func:`read_records` drops every record
of an older segment with ``global_step > S`` and then keeps exactly one record per
``(global_step, name)``, the latest segment's (ties: the later line). A fresh start
(``resumed_from_step`` null) over an existing file supersedes all older segments.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from esdwatch.alarms.rules import Alarm
from esdwatch.schema import LayerRecord

log = logging.getLogger(__name__)

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

RECORDS_FILE = "records.jsonl"
ALARMS_FILE = "alarms.jsonl"
SEGMENTS_FILE = "segments.jsonl"
DISTRIBUTED_FILE = "distributed.jsonl"


def _jsonable(value: Any) -> Any:
    """Plain JSON data: non-finite floats become null, numpy scalars Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _dumps(data: Mapping[str, Any]) -> str:
    try:  # records are plain already (LayerRecord.to_dict): the fast path
        return json.dumps(data, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_jsonable(data), separators=(",", ":"), allow_nan=False)


def _open_append(path: Path):
    """Open ``path`` for appending, first terminating a truncated last line."""
    fh = open(path, "a+b")
    fh.seek(0, os.SEEK_END)
    if fh.tell() > 0:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
    fh.seek(0, os.SEEK_END)
    return fh


class JsonlSink:
    """Writes records and alarms as JSON lines (see module docstring). A :class:`~esdwatch.sinks.base.Sink`.

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

    def __init__(self, directory: str | os.PathLike, *, segment: int | None = None,
                 resumed_from_step: int | None = None, fsync: bool = False):
        self.directory = Path(directory)
        self.segment = segment
        self.resumed_from_step = resumed_from_step
        self.fsync = fsync
        self._records = None
        self._alarms = None
        self._distributed = None

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

    def open(self) -> "JsonlSink":
        if self._records is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.segment is None:
            self.segment = next_segment(self.directory)
        with _open_append(self.segments_path) as fh:
            line = {"segment": int(self.segment), "resumed_from_step": self.resumed_from_step,
                    "wall_time": time.time(), "pid": os.getpid()}
            fh.write((_dumps(line) + "\n").encode())
        self._records = _open_append(self.records_path)
        self._alarms = _open_append(self.alarms_path)
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
        payload = "".join(_dumps(r.to_dict()) + "\n" for r in records)
        self._records.write(payload.encode())
        self._flush(self._records)

    def distributed(self, info: Mapping[str, Any]) -> None:
        """Append one snapshot's distributed bookkeeping (owners per layer) to ``distributed.jsonl``."""
        self.open()
        if self._distributed is None:
            self._distributed = _open_append(self.directory / DISTRIBUTED_FILE)
        self._distributed.write((_dumps(dict(info)) + "\n").encode())
        self._flush(self._distributed)

    def alarm(self, alarm: Alarm) -> None:
        self.open()
        data = alarm.to_dict()
        data["segment"] = self.segment
        self._alarms.write((_dumps(data) + "\n").encode())
        self._flush(self._alarms)

    def close(self) -> None:
        for fh in (self._records, self._alarms, self._distributed):
            if fh is not None:
                try:
                    self._flush(fh)
                finally:
                    fh.close()
        self._records = self._alarms = self._distributed = None


# ------------------------------------------------------------------------- readers


def _resolve(path: str | os.PathLike, filename: str) -> Path:
    """A file path, or a directory holding ``filename`` (itself or under ``esdwatch/``)."""
    p = Path(path)
    if p.is_dir():
        if (p / filename).exists():
            return p / filename
        if (p / "esdwatch" / filename).exists():
            return p / "esdwatch" / filename
        return p / filename
    return p


def _read_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each valid JSON-object line; a bad last line is a truncation."""
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        raw = fh.read().split(b"\n")
    out: list[tuple[int, dict]] = []
    last = max((i for i, line in enumerate(raw) if line.strip()), default=-1)
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if i == last:
                log.debug("esdwatch: %s: truncated last line skipped", path)
            else:
                log.warning("esdwatch: %s: line %d is not valid JSON, skipped", path, i + 1)
            continue
        out.append((i, obj))
    return out


def read_segments(path: str | os.PathLike) -> list[dict]:
    """The segment lines of an output directory (or of the directory of a records file)."""
    p = Path(path)
    if not p.is_dir():
        p = p.parent
    if not (p / SEGMENTS_FILE).exists() and (p / "esdwatch" / SEGMENTS_FILE).exists():
        p = p / "esdwatch"
    return [obj for _, obj in _read_lines(p / SEGMENTS_FILE) if "segment" in obj]


def _cutoffs(segments: Iterable[dict]) -> list[tuple[int, float]]:
    """(segment, step): records of older segments beyond ``step`` are superseded."""
    cuts = []
    for s in segments:
        seg = int(s.get("segment", 0))
        start = s.get("resumed_from_step")
        if start is None:
            if seg > 0:
                cuts.append((seg, -math.inf))  # a fresh start supersedes everything older
        else:
            cuts.append((seg, float(start)))
    return cuts


def _superseded(segment: int, step: float, cuts: Sequence[tuple[int, float]]) -> bool:
    return any(seg > segment and step > start for seg, start in cuts)


def read_distributed(path: str | os.PathLike) -> list[dict]:
    """The lines of ``distributed.jsonl`` (a file, or a directory holding one), as written."""
    return [obj for _, obj in _read_lines(_resolve(path, DISTRIBUTED_FILE))]


def next_segment(directory: str | os.PathLike) -> int:
    """The next free segment number of an output directory (0 for a new one)."""
    d = Path(directory)
    segs = [int(s.get("segment", 0)) for s in read_segments(d)] if (d / SEGMENTS_FILE).exists() else []
    if not segs and (d / RECORDS_FILE).exists():
        segs = [int(obj.get("segment", 0)) for _, obj in _read_lines(d / RECORDS_FILE)]
    return max(segs) + 1 if segs else 0


def read_records(path: str | os.PathLike, *, dedupe: bool = True) -> list[LayerRecord]:
    """The records of ``records.jsonl`` (a file, or a directory holding one).

    With ``dedupe`` (default), records superseded by a later run segment are dropped and
    exactly one record per ``(global_step, name)`` remains (see module docstring), in
    step order then file order. A truncated last line is skipped silently, any other
    invalid line with a warning. ``dedupe=False`` returns every valid line as written.
    """
    file = _resolve(path, RECORDS_FILE)
    rows = _read_lines(file)
    records: list[tuple[int, LayerRecord]] = []
    for lineno, obj in rows:
        try:
            records.append((lineno, LayerRecord.from_dict(obj)))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("esdwatch: %s: line %d is not a record (%s), skipped", file, lineno + 1, exc)
    if not dedupe:
        return [r for _, r in records]
    cuts = _cutoffs(read_segments(file.parent))
    best: dict[tuple[int, str], tuple[tuple[int, int], LayerRecord]] = {}
    for lineno, rec in records:
        if _superseded(rec.segment, rec.global_step, cuts):
            continue
        key = (rec.global_step, rec.name)
        rank = (rec.segment, lineno)
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, rec)
    ordered = sorted(best.values(), key=lambda item: (item[1].global_step, item[0][1]))
    return [rec for _, rec in ordered]


def read_alarms(path: str | os.PathLike, *, dedupe: bool = True) -> list[Alarm]:
    """The alarms of ``alarms.jsonl``, with superseded segments dropped as in :func:`read_records`."""
    file = _resolve(path, ALARMS_FILE)
    rows = _read_lines(file)
    cuts = _cutoffs(read_segments(file.parent)) if dedupe else []
    best: dict[tuple, tuple[tuple[int, int], Alarm]] = {}
    out: list[Alarm] = []
    for lineno, obj in rows:
        try:
            alarm = Alarm.from_dict(obj)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("esdwatch: %s: line %d is not an alarm (%s), skipped", file, lineno + 1, exc)
            continue
        if not dedupe:
            out.append(alarm)
            continue
        seg = int(obj.get("segment", 0) or 0)
        step = -math.inf if alarm.step is None else alarm.step
        if _superseded(seg, step, cuts):
            continue
        key = (alarm.step, alarm.kind, alarm.layer)
        rank = (seg, lineno)
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, alarm)
    if not dedupe:
        return out
    return [a for _, a in sorted(best.values(), key=lambda item: item[0][1])]


def copy_history(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, upto_step: int) -> int:
    """Seed a new output directory with ``src_dir``'s history up to ``upto_step``.

    Used when a resumed run logs to a new directory (e.g. a logger's next version), so
    the new directory alone holds the complete, de-duplicated history. Returns the
    number of records copied. Segment lines are copied as they are.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    records = [r for r in read_records(src) if r.global_step <= upto_step]
    alarms_keep = []
    for lineno, obj in _read_lines(src / ALARMS_FILE):
        step = obj.get("step")
        if step is None or step <= upto_step:
            alarms_keep.append(obj)
    alarms_cut = {(a.step, a.kind, a.layer) for a in read_alarms(src)}
    alarms_keep = [o for o in alarms_keep if (o.get("step"), o.get("kind"), o.get("layer")) in alarms_cut]
    with _open_append(dst / SEGMENTS_FILE) as fh:
        for seg in read_segments(src):
            fh.write((_dumps(seg) + "\n").encode())
    with _open_append(dst / RECORDS_FILE) as fh:
        fh.write("".join(_dumps(r.to_dict()) + "\n" for r in records).encode())
    with _open_append(dst / ALARMS_FILE) as fh:
        fh.write("".join(_dumps(o) + "\n" for o in alarms_keep).encode())
    return len(records)
