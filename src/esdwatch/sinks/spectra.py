"""``spectra.jsonl``: each layer's ESD at each snapshot, as a compact log10 histogram.

``records.jsonl`` holds scalars only; the static report (``esdwatch report``) also draws
each layer's ESD at its first and last snapshot, which needs the spectrum. Storing all
eigenvalues would grow with the matrix size at every snapshot; a histogram of log10
eigenvalues on a fixed number of bins (the one the TensorBoard and W&B sinks draw) is
enough for the picture and costs ~0.3 kB per layer per snapshot.

One JSON line per (snapshot, layer)::

    {"global_step": 200, "name": "net.0", "segment": 0, "lo": 0.12, "hi": 3.4,
     "counts": [...], "num": 64, "num_floor": 0}

``lo``/``hi`` bound ``len(counts)`` equal bins of log10(lambda) (unnormalized
eigenvalues of W^T W); ``num_floor`` eigenvalues at or below lambda_max * 1e-12 sit in
the first bin. Lines are appended one snapshot at a time and flushed; a truncated last
line is skipped by :func:`read_spectra`, which also applies the run-segment rules of
``records.jsonl`` (see :mod:`esdwatch.sinks.jsonl`): one histogram per
``(global_step, name)``, the latest segment's, and nothing an older segment wrote after
a resumed run's checkpoint step.

The sink needs the eigenvalues (``keep_evals=True`` on the monitor); layers without them
are not written. A monitor with ``keep_evals=True`` adds this sink itself (next to its
``records.jsonl``) unless one was passed in ``sinks``; a run resumed into a new output
directory carries the histograms up to its checkpoint over with :func:`copy_spectra`,
as :func:`esdwatch.sinks.jsonl.copy_history` does for the records.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

from esdwatch.alarms.rules import Alarm
from esdwatch.schema import LayerRecord
from esdwatch.sinks.metrics_logger import Log10Histogram, log10_histogram

log = logging.getLogger("esdwatch.sinks")

__all__ = ["SpectraSink", "read_spectra", "copy_spectra", "SPECTRA_FILE"]

SPECTRA_FILE = "spectra.jsonl"


class SpectraSink:
    """Appends each snapshot's log10 histograms to ``<directory>/spectra.jsonl``.

    ``directory`` is the monitor's output directory (``<log_dir>/esdwatch``), next to
    ``records.jsonl``. ``bins``: histogram bins per layer.
    """

    needs_evals = True

    def __init__(self, directory: str | os.PathLike, *, bins: int = 64) -> None:
        self.directory = Path(directory)
        self.path = self.directory / SPECTRA_FILE
        self.bins = int(bins)
        self._fh = None

    def _open(self):
        if self._fh is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "ab")
            # a crash may have left a line without its newline: terminate it first
            if fh.tell() > 0:
                with open(self.path, "rb") as rf:
                    rf.seek(-1, os.SEEK_END)
                    if rf.read(1) != b"\n":
                        fh.write(b"\n")
            self._fh = fh
        return self._fh

    def write(self, records: Sequence[LayerRecord], step: int) -> None:
        lines = []
        for rec in records:
            if rec.report.evals is None:
                continue
            h = log10_histogram(rec.report.evals, bins=self.bins)
            if h is None:
                continue
            row = {"global_step": int(rec.global_step), "name": rec.name, "segment": int(rec.segment)}
            row.update(h.to_dict())
            lines.append(json.dumps(row, separators=(",", ":")) + "\n")
        if not lines:
            return
        fh = self._open()
        fh.write("".join(lines).encode())
        fh.flush()

    def alarm(self, alarm: Alarm) -> None:
        return None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _segments(directory: Path) -> list[tuple[int, float]]:
    """(segment, resumed_from_step) cut-offs of ``segments.jsonl`` (see esdwatch.sinks.jsonl)."""
    path = directory / "segments.jsonl"
    cuts: list[tuple[int, float]] = []
    if not path.exists():
        return cuts
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
            seg = int(obj.get("segment", 0))
        except (ValueError, TypeError, AttributeError):
            continue
        start = obj.get("resumed_from_step")
        if start is None:
            if seg > 0:
                cuts.append((seg, -math.inf))
        else:
            cuts.append((seg, float(start)))
    return cuts


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / SPECTRA_FILE if (p / SPECTRA_FILE).exists() or not (p / "esdwatch").is_dir() else p / "esdwatch" / SPECTRA_FILE
    return p


def _read(p: Path) -> dict[tuple[int, str], tuple[int, Log10Histogram]]:
    """``{(global_step, layer): (segment, histogram)}`` after the segment rules."""
    if not p.exists():
        return {}
    cuts = _segments(p.parent)
    best: dict[tuple[int, str], tuple[int, Log10Histogram]] = {}
    with open(p, "rb") as fh:
        raw = fh.read().split(b"\n")
    last = max((i for i, line in enumerate(raw) if line.strip()), default=-1)
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key = (int(obj["global_step"]), str(obj["name"]))
            seg = int(obj.get("segment", 0))
            hist = Log10Histogram.from_dict(obj)
        except (ValueError, KeyError, TypeError):
            if i != last:  # a truncated last line is a crash mid-write, not an error
                log.warning("esdwatch: %s: line %d is not a spectrum, skipped", p, i + 1)
            continue
        if any(s > seg and key[0] > start for s, start in cuts):
            continue
        if key not in best or seg >= best[key][0]:
            best[key] = (seg, hist)
    return dict(sorted(best.items()))


def read_spectra(path: str | os.PathLike) -> dict[tuple[int, str], Log10Histogram]:
    """``{(global_step, layer): Log10Histogram}`` from ``spectra.jsonl`` (a file or its directory).

    Missing file: an empty dict. Segment rules as for ``records.jsonl``.
    """
    return {k: v for k, (_, v) in _read(_resolve(path)).items()}


def copy_spectra(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, upto_step: int) -> int:
    """Seed ``dst_dir/spectra.jsonl`` with ``src_dir``'s histograms up to ``upto_step``.

    The companion of :func:`esdwatch.sinks.jsonl.copy_history` (which copies the segment
    lines these histograms are read against): a run resumed into a new directory keeps
    the spectra of its history. Returns the number of histograms copied (0 without a
    source file).
    """
    kept = {k: v for k, v in _read(Path(src_dir) / SPECTRA_FILE).items() if k[0] <= upto_step}
    if not kept:
        return 0
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    lines = []
    for (step, name), (seg, hist) in kept.items():
        row = {"global_step": step, "name": name, "segment": seg}
        row.update(hist.to_dict())
        lines.append(json.dumps(row, separators=(",", ":")) + "\n")
    with open(dst / SPECTRA_FILE, "ab") as fh:
        fh.write("".join(lines).encode())
    return len(lines)
