"""Every file rule of a run directory: where it is, what its files are called, how they are read.

The sinks write these files and the report, the CLI and the tests read them; none of them
knows a file name, the JSON-lines encoding or the run-segment rules but through this
module. It imports only :mod:`esdwatch.schema` (and numpy through it).

Layout: :func:`run_dir` is ``<log_dir>/esdwatch``, or ``<log_dir>/esdwatch/<name>`` for
a named monitor. In it:

``records.jsonl`` (:data:`RECORDS_FILE`)
    One JSON line per :class:`~esdwatch.schema.LayerRecord` (one layer at one snapshot),
    appended one snapshot at a time with a single ``write`` and flushed.
``alarms.jsonl`` (:data:`ALARMS_FILE`)
    One JSON line per fired :class:`~esdwatch.schema.Alarm`, plus its ``segment``.
``segments.jsonl`` (:data:`SEGMENTS_FILE`)
    One line per run segment that wrote here: ``{"segment": k, "resumed_from_step": S,
    "wall_time": ..., "pid": ...}`` (``S`` is null for a fresh start).
``spectra.jsonl`` (:data:`SPECTRA_FILE`, runs with ``keep_evals=True``)
    One line per (snapshot, layer): ``global_step``, ``name``, ``segment`` and the
    :class:`~esdwatch.schema.Log10Histogram` of its eigenvalues.
``distributed.jsonl`` (:data:`DISTRIBUTED_FILE`, distributed runs only)
    One line per snapshot: which rank analysed each layer (``owners``), the mode
    (``replicated`` for DDP, ``dtensor`` for FSDP2, ``fsdp1``) and per rank its number of
    layers, their relative cost and the worker's seconds.

Torn lines: a crash leaves at most a truncated last line. Readers skip it
(:func:`read_jsonl`) and the next writer terminates it before appending
(:func:`open_append`), so it stays a line of its own.

Run segments: a fresh run writes segment 0; a run resumed from a checkpoint taken at
global step S writes the next segment (:func:`next_segment`), with
``resumed_from_step = S``. Whatever an older segment wrote *after* S is superseded
(:func:`superseded`): the readers drop it and then keep exactly one line per key, the
latest segment's (ties: the later line); the key is ``(global_step, name)`` for records
and spectra, ``(step, kind, layer)`` for alarms. A fresh start (``resumed_from_step``
null) over an existing directory supersedes all older segments. A run resumed into a
new directory first gets the history up to S copied there (:func:`copy_run`), so the
new directory alone holds the whole run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from esdwatch.schema import Alarm, LayerRecord, Log10Histogram

log = logging.getLogger(__name__)

__all__ = [
    "RUN_SUBDIR",
    "RECORDS_FILE",
    "ALARMS_FILE",
    "SEGMENTS_FILE",
    "SPECTRA_FILE",
    "DISTRIBUTED_FILE",
    "run_dir",
    "find_file",
    "dumps",
    "dump_lines",
    "open_append",
    "read_jsonl",
    "is_jsonl",
    "segment_line",
    "alarm_line",
    "spectrum_line",
    "read_segments",
    "next_segment",
    "cutoffs",
    "superseded",
    "read_records",
    "read_alarms",
    "read_spectra",
    "read_distributed",
    "copy_history",
    "copy_spectra",
    "copy_run",
]

#: The folder below a log directory that holds esdwatch's files.
RUN_SUBDIR = "esdwatch"
RECORDS_FILE = "records.jsonl"
ALARMS_FILE = "alarms.jsonl"
SEGMENTS_FILE = "segments.jsonl"
SPECTRA_FILE = "spectra.jsonl"
DISTRIBUTED_FILE = "distributed.jsonl"
#: one line per scheduled snapshot that was not taken: global_step, segment, reason; a later line with
#: ``taken_after_all: true`` cancels it (the final snapshot took that step)
SKIPPED_SNAPSHOTS_FILE = "skipped_snapshots.jsonl"
#: one line per matrix found but not analysed, when the set changes: global_step, segment, name, kind, shape, reason
SKIPPED_LAYERS_FILE = "skipped_layers.jsonl"

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


# ------------------------------------------------------------------- where


def run_dir(log_dir: str | os.PathLike, name: str | None = None) -> Path:
    """A monitor's output directory: ``<log_dir>/esdwatch``, or ``<log_dir>/esdwatch/<name>``."""
    d = Path(log_dir) / RUN_SUBDIR
    return d / name if name else d


def find_file(path: str | os.PathLike, filename: str) -> Path | None:
    """``path`` if it is a file, else ``filename`` in the directory ``path`` or in its
    ``esdwatch/`` sub-directory; None when there is none of them."""
    p = Path(path)
    if not p.is_dir():
        return p if p.exists() else None
    for candidate in (p / filename, p / RUN_SUBDIR / filename):
        if candidate.exists():
            return candidate
    return None


def _resolve(path: str | os.PathLike, filename: str) -> Path:
    """The file a reader reads for ``path`` (:func:`find_file`; missing: ``path/filename``)."""
    p = Path(path)
    found = find_file(p, filename)
    if found is not None:
        return found
    return p / filename if p.is_dir() else p


# ------------------------------------------------------------- JSON lines


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


def dumps(data: Mapping[str, Any]) -> str:
    """One line of any run file (no newline): compact JSON, non-finite numbers as null."""
    try:  # records are plain already (LayerRecord.to_dict): the fast path
        return json.dumps(data, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_jsonable(data), separators=(",", ":"), allow_nan=False)


def dump_lines(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """``rows`` as the bytes of JSON lines (:func:`dumps`, each ended by a newline), for one ``write``."""
    return "".join(dumps(row) + "\n" for row in rows).encode()


def open_append(path: str | os.PathLike) -> IO[bytes]:
    """Open ``path`` for appending (binary), first terminating a torn last line."""
    fh = open(path, "a+b")
    fh.seek(0, os.SEEK_END)
    if fh.tell() > 0:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
    fh.seek(0, os.SEEK_END)
    return fh


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line index, object) of each JSON-object line of ``path`` ([] when it is missing).

    An invalid last line is a write torn by a crash and skipped silently; any other
    invalid line is skipped, with one warning for the whole file (the first such line
    and how many more). A file that is not JSON lines at all (:func:`is_jsonl`) is the
    caller's to refuse before reading it.
    """
    path = Path(path)
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        raw = fh.read().split(b"\n")
    out: list[tuple[int, dict]] = []
    bad: list[int] = []
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
                bad.append(i + 1)
            continue
        out.append((i, obj))
    _warn_skipped(path, bad, "is not valid JSON")
    return out


def _warn_skipped(path: Path, lines: Sequence[int], what: str) -> None:
    """One warning for the lines of ``path`` a reader skipped: the first, and how many more."""
    if not lines:
        return
    n = len(lines) - 1
    more = f" (and {n} more such line{'s' if n > 1 else ''})" if n else ""
    log.warning("esdwatch: %s: line %d %s, skipped%s", path, lines[0], what, more)


def is_jsonl(path: str | os.PathLike, probe: int = 1 << 16) -> bool:
    """Whether ``path`` reads as a JSON-lines file of this module: its first non-empty line
    is a JSON object, or it is a single unterminated line starting with ``{`` (the first
    write of a run, torn or longer than ``probe`` bytes). An empty file counts; a binary
    file (a NUL byte) or any other text does not. Only the first ``probe`` bytes are read.
    """
    with open(path, "rb") as fh:
        head = fh.read(probe)
    if b"\0" in head:
        return False
    lines = head.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            return isinstance(json.loads(line), dict)
        except ValueError:
            return i == len(lines) - 1 and line.lstrip().startswith(b"{")
    return True


def segment_line(segment: int, resumed_from_step: int | None) -> dict[str, Any]:
    """The line a run segment appends to ``segments.jsonl`` when it opens the directory."""
    return {
        "segment": int(segment),
        "resumed_from_step": resumed_from_step,
        "wall_time": time.time(),
        "pid": os.getpid(),
    }


def alarm_line(alarm: Alarm, segment: int | None) -> dict[str, Any]:
    """The line of ``alarms.jsonl`` for ``alarm`` fired in ``segment``."""
    data = alarm.to_dict()
    data["segment"] = segment
    return data


def spectrum_line(global_step: int, name: str, segment: int, hist: Log10Histogram) -> dict[str, Any]:
    """The line of ``spectra.jsonl`` for one layer at one snapshot."""
    row: dict[str, Any] = {"global_step": int(global_step), "name": name, "segment": int(segment)}
    row.update(hist.to_dict())
    return row


# ---------------------------------------------------------------- segments


def read_segments(path: str | os.PathLike) -> list[dict]:
    """The segment lines of an output directory (or of the directory of a file in it)."""
    p = Path(path)
    if not p.is_dir():
        p = p.parent
    if not (p / SEGMENTS_FILE).exists() and (p / RUN_SUBDIR / SEGMENTS_FILE).exists():
        p = p / RUN_SUBDIR
    return [obj for _, obj in read_jsonl(p / SEGMENTS_FILE) if "segment" in obj]


def next_segment(directory: str | os.PathLike) -> int:
    """The next free segment number of an output directory (0 for a new one)."""
    d = Path(directory)
    segs = [int(s.get("segment", 0)) for s in read_segments(d)] if (d / SEGMENTS_FILE).exists() else []
    if not segs and (d / RECORDS_FILE).exists():
        segs = [int(obj.get("segment", 0)) for _, obj in read_jsonl(d / RECORDS_FILE)]
    return max(segs) + 1 if segs else 0


def cutoffs(segments: Iterable[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """(segment, step) pairs: what an older segment wrote beyond ``step`` is superseded."""
    cuts = []
    for s in segments:
        try:
            seg = int(s.get("segment", 0))
            start = s.get("resumed_from_step")
            if start is None:
                if seg > 0:
                    cuts.append((seg, -math.inf))  # a fresh start supersedes everything older
            else:
                cuts.append((seg, float(start)))
        except (TypeError, ValueError):
            continue
    return cuts


def superseded(segment: int, step: float, cuts: Sequence[tuple[int, float]]) -> bool:
    """Whether a line of ``segment`` at ``step`` was superseded by a later segment (:func:`cutoffs`)."""
    return any(seg > segment and step > start for seg, start in cuts)


def _latest(items: Iterable[tuple[int, int, float, K, T]], cuts: Sequence[tuple[int, float]]) -> dict[K, tuple[int, T]]:
    """``{key: (line, value)}`` from (line, segment, step, key, value) items: superseded
    items dropped, then per key the latest segment's (ties: the later line)."""
    best: dict[K, tuple[tuple[int, int], T]] = {}
    for lineno, segment, step, key, value in items:
        if superseded(segment, step, cuts):
            continue
        rank = (segment, lineno)
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, value)
    return {key: (rank[1], value) for key, (rank, value) in best.items()}


def _parse(file: Path, what: str, parse: Callable[[dict], T]) -> list[tuple[int, dict, T]]:
    """(line, object, parsed) of each line of ``file`` that ``parse`` accepts (others: one warning)."""
    out = []
    bad: list[int] = []
    first_error = ""
    for lineno, obj in read_jsonl(file):
        try:
            out.append((lineno, obj, parse(obj)))
        except (KeyError, TypeError, ValueError) as exc:
            bad.append(lineno + 1)
            first_error = first_error or f"{type(exc).__name__}: {exc}"
    _warn_skipped(file, bad, f"is not {what} ({first_error})")
    return out


# ----------------------------------------------------------------- readers


def read_records(path: str | os.PathLike, *, dedupe: bool = True) -> list[LayerRecord]:
    """The records of ``records.jsonl`` (a file, or a directory holding one).

    With ``dedupe`` (default), records superseded by a later run segment are dropped and
    exactly one record per ``(global_step, name)`` remains (see module docstring), in
    step order then file order. A truncated last line is skipped silently, any other
    invalid line with a warning. ``dedupe=False`` returns every valid line as written.
    """
    file = _resolve(path, RECORDS_FILE)
    rows = _parse(file, "a record", LayerRecord.from_dict)
    if not dedupe:
        return [rec for _, _, rec in rows]
    kept = _latest(
        ((lineno, rec.segment, rec.global_step, (rec.global_step, rec.name), rec) for lineno, _, rec in rows),
        cutoffs(read_segments(file.parent)),
    )
    ordered = sorted(kept.values(), key=lambda item: (item[1].global_step, item[0]))
    return [rec for _, rec in ordered]


def read_alarms(path: str | os.PathLike, *, dedupe: bool = True) -> list[Alarm]:
    """The alarms of ``alarms.jsonl``, with superseded segments dropped as in :func:`read_records`."""
    file = _resolve(path, ALARMS_FILE)
    rows = _parse(file, "an alarm", Alarm.from_dict)
    if not dedupe:
        return [alarm for _, _, alarm in rows]
    kept = _latest(
        (
            (
                lineno,
                int(obj.get("segment", 0) or 0),
                -math.inf if alarm.step is None else alarm.step,
                (alarm.step, alarm.kind, alarm.layer),
                alarm,
            )
            for lineno, obj, alarm in rows
        ),
        cutoffs(read_segments(file.parent)),
    )
    return [alarm for _, alarm in sorted(kept.values(), key=lambda item: item[0])]


def _spectrum(obj: dict) -> tuple[tuple[int, str], int, Log10Histogram]:
    return (int(obj["global_step"]), str(obj["name"])), int(obj.get("segment", 0)), Log10Histogram.from_dict(obj)


def _read_spectra(file: Path) -> dict[tuple[int, str], tuple[int, Log10Histogram]]:
    """``{(global_step, layer): (segment, histogram)}`` after the segment rules, in key order."""
    rows = _parse(file, "a spectrum", _spectrum)
    if not rows:
        return {}
    kept = _latest(
        ((lineno, seg, key[0], key, (seg, hist)) for lineno, _, (key, seg, hist) in rows),
        cutoffs(read_segments(file.parent)),
    )
    return {key: value for key, (_, value) in sorted(kept.items())}


def read_spectra(path: str | os.PathLike) -> dict[tuple[int, str], Log10Histogram]:
    """``{(global_step, layer): Log10Histogram}`` from ``spectra.jsonl`` (a file or its directory).

    Missing file: an empty dict. Segment rules as for ``records.jsonl``; ordered by
    (global_step, layer).
    """
    return {k: hist for k, (_, hist) in _read_spectra(_resolve(path, SPECTRA_FILE)).items()}


def read_distributed(path: str | os.PathLike) -> list[dict]:
    """The lines of ``distributed.jsonl`` (a file, or a directory holding one), as written."""
    return [obj for _, obj in read_jsonl(_resolve(path, DISTRIBUTED_FILE))]


# ------------------------------------------------------------ resuming


def copy_history(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, upto_step: int) -> int:
    """Seed a new output directory with ``src_dir``'s records and alarms up to ``upto_step``.

    Used when a resumed run logs to a new directory (e.g. a logger's next version), so
    the new directory alone holds the complete, de-duplicated history. Returns the
    number of records copied. Segment lines are copied as they are.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    records = [r for r in read_records(src) if r.global_step <= upto_step]
    alarms_keep = []
    for _, obj in read_jsonl(src / ALARMS_FILE):
        step = obj.get("step")
        if step is None or step <= upto_step:
            alarms_keep.append(obj)
    alarms_cut = {(a.step, a.kind, a.layer) for a in read_alarms(src)}
    alarms_keep = [o for o in alarms_keep if (o.get("step"), o.get("kind"), o.get("layer")) in alarms_cut]
    with open_append(dst / SEGMENTS_FILE) as fh:
        fh.write(dump_lines(read_segments(src)))
    with open_append(dst / RECORDS_FILE) as fh:
        fh.write(dump_lines(r.to_dict() for r in records))
    with open_append(dst / ALARMS_FILE) as fh:
        fh.write(dump_lines(alarms_keep))
    return len(records)


def copy_spectra(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, upto_step: int) -> int:
    """Seed ``dst_dir/spectra.jsonl`` with ``src_dir``'s histograms up to ``upto_step``.

    The companion of :func:`copy_history` (which copies the segment lines these
    histograms are read against). Returns the number of histograms copied (0 without a
    source file).
    """
    kept = {k: v for k, v in _read_spectra(Path(src_dir) / SPECTRA_FILE).items() if k[0] <= upto_step}
    if not kept:
        return 0
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    with open_append(dst / SPECTRA_FILE) as fh:
        fh.write(dump_lines(spectrum_line(step, name, seg, hist) for (step, name), (seg, hist) in kept.items()))
    return len(kept)


def copy_run(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, upto_step: int) -> int:
    """Everything a run resumed from ``upto_step`` into a new directory carries over:
    :func:`copy_history` then :func:`copy_spectra`. Returns the number of records copied."""
    n = copy_history(src_dir, dst_dir, upto_step)
    copy_spectra(src_dir, dst_dir, upto_step)
    return n
