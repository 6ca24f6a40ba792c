"""What the TensorBoard and W&B sinks share: their common options and what a snapshot draws.

Both sinks take the same options with the same meaning (prefix and name, summary and
metrics, histograms and hist_bins, figures every ``figure_every`` snapshots, ESD figures
and the phase map) and draw the same things from a snapshot: one
:class:`~esdwatch.schema.Log10Histogram` per layer with eigenvalues, and the images of
:mod:`esdwatch.reporting.figures`. :class:`DashboardSink` holds that; each subclass
keeps its own public signature and decides how its backend receives the results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from esdwatch.schema import LatestRecords, LayerRecord, Log10Histogram, log10_histogram
from esdwatch.sinks.tags import prefix_for

log = logging.getLogger("esdwatch.sinks")

__all__ = ["DashboardSink"]


class DashboardSink:
    """Base of the TensorBoard and W&B sinks: the options and state they share (see module docstring)."""

    #: The backend's name in warnings ("TensorBoard", "W&B").
    backend = "dashboard"
    needs_evals = True

    def __init__(
        self,
        *,
        prefix: str | None,
        name: str | None,
        summary: bool,
        metrics: Sequence[str],
        histograms: bool,
        hist_bins: int,
        figures: bool,
        figure_every: int,
        esd_figures: bool,
        max_esd_figures: int | None,
        phase_map: bool,
    ) -> None:
        # no defaults here: each sink's public signature holds them (factory.sink_options reads it)
        if int(figure_every) < 1:
            raise ValueError(f"figure_every must be >= 1, got {figure_every}")
        self.prefix = prefix_for(name, prefix)
        self.summary = summary
        self.metrics = tuple(metrics)
        self.histograms = histograms
        self.hist_bins = int(hist_bins)
        self.figures = figures
        self.figure_every = int(figure_every)
        self.esd_figures = esd_figures
        self.max_esd_figures = max_esd_figures
        self.phase_map = phase_map
        self.snapshots = 0
        self._last_step: int | None = None
        self._latest: list[LayerRecord] = []
        self._by_layer = LatestRecords()  # each layer's latest record: the summary under rotation
        self._figured_step: int | None = None
        self._phases: list[tuple[int, dict[str, str]]] = []
        self._no_evals_warned = False
        self._closed = False

    def _remember(self, records: Sequence[LayerRecord], step: int) -> bool:
        """Note one snapshot (its phases for the map, its records for the figures); whether
        this snapshot is one that gets figures (every ``figure_every``, the first included)."""
        self._phases.append((step, {r.name: r.report.phase for r in records}))
        self._latest = list(records)
        self._last_step = step
        due = self.snapshots % self.figure_every == 0
        self.snapshots += 1
        return due

    def _spectra(self, records: Sequence[LayerRecord], step: int) -> list[tuple[LayerRecord, Log10Histogram]]:
        """Each layer's histogram of log10 eigenvalues on ``hist_bins`` bins; the first
        snapshot with layers lacking eigenvalues warns once (``keep_evals=True``)."""
        out = []
        missing = 0
        for rec in records:
            if rec.report.evals is None:
                missing += 1
                continue
            h = log10_histogram(rec.report.evals, bins=self.hist_bins)
            if h is not None:
                out.append((rec, h))
        if missing and not self._no_evals_warned:
            self._no_evals_warned = True
            log.warning(
                "esdwatch: %s spectra need the eigenvalues: create the monitor with keep_evals=True "
                "(%d layers without them at step %d)",
                self.backend,
                missing,
                step,
            )
        return out

    def _images(self, step: int) -> list[tuple[str, np.ndarray, str]] | None:
        """``(tag, RGB array, caption)`` of the latest snapshot's figures: the ESD of each
        analysed layer (at most ``max_esd_figures``) and the phase map so far. None when
        matplotlib is missing (warned once: figures are then off)."""
        try:
            from esdwatch.reporting import figures as F

            F.require_matplotlib()
        except ImportError as exc:
            log.warning("esdwatch: %s; %s gets no figures", exc, self.backend)
            self.figures = False
            return None
        out: list[tuple[str, Any, str]] = []
        if self.esd_figures:
            chosen = self._latest if self.max_esd_figures is None else self._latest[: self.max_esd_figures]
            for rec in chosen:
                if rec.report.ok:
                    out.append(
                        (
                            f"{self.prefix}/esd_figure/{rec.name}",
                            F.figure_to_rgb(F.esd_figure(rec, dpi=80)),
                            f"{rec.name} @ step {step}",
                        )
                    )
        if self.phase_map and self._phases:
            out.append(
                (
                    f"{self.prefix}/phase_map",
                    F.figure_to_rgb(F.phase_map_figure(snapshots=self._phases, dpi=100)),
                    f"phases up to step {step}",
                )
            )
        return out
