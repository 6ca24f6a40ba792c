"""The sink that keeps each layer's ESD: ``spectra.jsonl``, one log10 histogram per layer and snapshot.

``records.jsonl`` holds scalars only; the static report (``esdwatch report``) also draws
each layer's ESD at its first and last snapshot, which needs the spectrum. Storing all
eigenvalues would grow with the matrix size at every snapshot; a histogram of log10
eigenvalues on a fixed number of bins (:class:`~esdwatch.schema.Log10Histogram`, the
one the TensorBoard and W&B sinks draw) is enough for the picture: a few hundred bytes
per layer and snapshot, whatever the layer's size.

One JSON line per (snapshot, layer)::

    {"global_step": 200, "name": "net.0", "segment": 0, "lo": 0.12, "hi": 3.4,
     "counts": [...], "num": 64, "num_floor": 0}

``lo``/``hi`` bound ``len(counts)`` equal bins of log10(lambda) (unnormalized
eigenvalues of W^T W); ``num_floor`` eigenvalues at or below lambda_max * 1e-12 sit in
the first bin. Lines are appended one snapshot at a time and flushed. The file rules
(its name, the torn last line, the run segments) are those of :mod:`esdwatch.rundir`,
whose :func:`read_spectra` and :func:`copy_spectra` are re-exported here.

The sink needs the eigenvalues (``keep_evals=True`` on the monitor); layers without them
are not written. A monitor with ``keep_evals=True`` adds this sink itself (next to its
``records.jsonl``) unless one was passed in ``sinks``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from esdwatch.rundir import (
    SPECTRA_FILE,
    copy_spectra,
    dump_lines,
    open_append,
    read_spectra,
    spectrum_line,
)
from esdwatch.schema import Alarm, LayerRecord, log10_histogram

__all__ = ["SpectraSink", "read_spectra", "copy_spectra", "SPECTRA_FILE"]


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
            self._fh = open_append(self.path)
        return self._fh

    def write(self, records: Sequence[LayerRecord], step: int) -> None:
        rows = []
        for rec in records:
            if rec.report.evals is None:
                continue
            h = log10_histogram(rec.report.evals, bins=self.bins)
            if h is not None:
                rows.append(spectrum_line(rec.global_step, rec.name, rec.segment, h))
        if not rows:
            return
        fh = self._open()
        fh.write(dump_lines(rows))
        fh.flush()

    def alarm(self, alarm: Alarm) -> None:
        return None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
