"""What the TensorBoard and W&B sinks share: their common options and what a snapshot draws.

Both sinks take the same options with the same meaning (prefix and name, summary and
metrics, histograms and hist_bins, figures every ``figure_every`` snapshots, ESD figures
and the phase map) and draw the same things from a snapshot: one
:class:`~esdwatch.schema.Log10Histogram` per layer with eigenvalues, and the images of
:mod:`esdwatch.reporting.figures`. :class:`DashboardSink` holds that; each subclass
keeps its own public signature and decides how its backend receives the results.

What users read in both dashboards is also made here, once: the phase table
(:func:`phases_markdown`: each layer's phase by name, since which step, and what it was
before) and the alarm rows (:data:`ALARM_COLUMNS`, :func:`alarm_row`,
:func:`alarms_markdown`), where a value that does not exist (a phase transition has no
threshold) is left empty, never shown as ``nan``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from esdwatch.schema import (
    PHASE_TRANSITION,
    Alarm,
    LatestRecords,
    LayerRecord,
    LayerReport,
    Log10Histogram,
    log10_histogram,
    phase_name,
)
from esdwatch.sinks.tags import dashboard_tag, finite_value, prefix_for

log = logging.getLogger("esdwatch.sinks")

__all__ = ["DashboardSink", "ALARM_COLUMNS", "PhaseSpan", "alarm_row", "alarms_markdown", "phases_markdown"]

#: A phase change redraws the phase map at once in models of at most this many layers
#: (one figure; the ESD figures of ``figure_every`` cost one per layer).
PHASE_MAP_ON_CHANGE_MAX_LAYERS = 32

#: Columns of the alarm table (W&B) and of the alarm text (TensorBoard).
ALARM_COLUMNS: tuple[str, ...] = (
    "global_step",
    "severity",
    "kind",
    "layer",
    "value",
    "threshold",
    "message",
    "advice",
)

#: A layer's current phase, the first step of the snapshots in it, and the phase before (None: none yet).
PhaseSpan = tuple[str, int, str | None]


def alarm_row(alarm: Alarm) -> list[Any]:
    """One alarm as a row of :data:`ALARM_COLUMNS`; a value or threshold that does not exist is None.

    A phase transition has no threshold, and its value is the classifier's confidence.
    """
    return [
        None if alarm.step is None else int(alarm.step),
        alarm.severity,
        alarm.kind,
        alarm.layer,
        finite_value(alarm.value),
        finite_value(alarm.threshold),
        alarm.message,
        alarm.advice,
    ]


def _md(text: Any) -> str:
    return str(text).replace("|", "&#124;").replace("\n", " ")


def alarms_markdown(alarms: Sequence[Alarm]) -> str:
    """A markdown list of one step's alarms, one line each in the order given (no step: the
    dashboard shows it): ``- **severity** `kind`, layer `name`: message (value v, threshold t); advice``.

    Only the numbers that exist are shown: a phase transition has no threshold, and its
    value is the classifier's confidence.
    """
    lines = []
    for a in alarms:
        _, severity, kind, layer, value, threshold, message, advice = alarm_row(a)
        numbers = [
            f"{'confidence' if kind == PHASE_TRANSITION else 'value'} {value:.4g}" if value is not None else "",
            f"threshold {threshold:.4g}" if threshold is not None else "",
        ]
        shown = ", ".join(n for n in numbers if n)
        tail = f" ({shown})" if shown else ""
        hint = f"; *advice*: {_md(advice)}" if advice else ""
        lines.append(f"- **{severity}** `{kind}`, layer `{layer}`: {_md(message)}{tail}{hint}")
    return "\n".join(lines)


def _alpha_text(report: LayerReport) -> str:
    """``alpha ± alpha_sigma`` (its CSN standard error), ``alpha`` alone, or empty when not computed."""
    alpha, sigma = finite_value(report.alpha), finite_value(report.alpha_sigma)
    if alpha is None:
        return ""
    return f"{alpha:.3f}" if sigma is None else f"{alpha:.3f} ± {sigma:.3f}"


def phases_markdown(records: Sequence[LayerRecord], spans: dict[str, PhaseSpan], step: int) -> str:
    """A markdown table of one snapshot's phases: layer, phase (bold where it changed at
    this snapshot; marked where it is an estimate of the tail path), since step, the phase
    before, alpha with its standard error, and the best tail law when the monitor fits
    them (``fit="TPL"`` / ``"E_TPL"``)."""
    best_fit = any(rec.report.best_fit for rec in records)
    head = "| layer | phase | since step | before | alpha |" + (" best fit |" if best_fit else "")
    lines = [head, "|---|---|---:|---|---:|" + ("---|" if best_fit else "")]
    for rec in records:
        phase, since, before = spans.get(rec.name, (phase_name(rec.report.phase), step, None))
        shown = f"**{phase}** (new)" if since == step and before is not None else phase
        if "phase" in rec.report.estimated_fields:
            shown += " (≈ estimate: tail path)"
        row = f"| {_md(rec.name)} | {shown} | {since} | {before or ''} | {_alpha_text(rec.report)} |"
        lines.append(row + (f" {rec.report.best_fit} |" if best_fit else ""))
    return "\n".join(lines)


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
        #: each layer's phase, since which step, and the phase before
        self.phase_spans: dict[str, PhaseSpan] = {}
        #: whether a layer changed phase since the phase map was last drawn
        self._phases_changed = False
        self._phase_map_step: int | None = None
        self._no_evals_warned = False
        self._closed = False

    def _remember(self, records: Sequence[LayerRecord], step: int) -> bool:
        """Note one snapshot (its phases for the map, its records for the figures); whether
        this snapshot is one that gets figures (every ``figure_every``, the first included)."""
        self._phases.append((step, {r.name: r.report.phase for r in records}))
        for rec in records:
            phase = phase_name(rec.report.phase)
            span = self.phase_spans.get(rec.name)
            if span is None or span[0] != phase:
                self.phase_spans[rec.name] = (phase, step, None if span is None else span[0])
                self._phases_changed = self._phases_changed or span is not None
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

    def _phase_map_due(self) -> bool:
        """Whether a layer changed phase since the phase map was last drawn, in a model of at
        most :data:`PHASE_MAP_ON_CHANGE_MAX_LAYERS` layers (the map is then drawn at this
        snapshot too, whatever ``figure_every`` says: a change is what users look for; a
        larger model's map, slower to draw on the training thread, keeps the cadence)."""
        # the map draws every layer seen, not only this snapshot's (a rotation's subset)
        small = len(self.phase_spans) <= PHASE_MAP_ON_CHANGE_MAX_LAYERS
        return self.figures and self.phase_map and self._phases_changed and small

    def _images(self, step: int, esd: bool = True) -> list[tuple[str, np.ndarray, str]] | None:
        """``(tag, RGB array, caption)`` of the latest snapshot's figures: the ESD of each
        analysed layer (at most ``max_esd_figures``; not when ``esd`` is False) and the
        phase map so far. None when matplotlib is missing (warned once: figures are then off)."""
        try:
            from esdwatch.reporting import figures as F

            F.require_matplotlib()
        except ImportError as exc:
            log.warning("esdwatch: %s; %s gets no figures", exc, self.backend)
            self.figures = False
            return None
        out: list[tuple[str, Any, str]] = []
        if self.esd_figures and esd:
            chosen = self._latest if self.max_esd_figures is None else self._latest[: self.max_esd_figures]
            for rec in chosen:
                if rec.report.ok:
                    out.append(
                        (
                            dashboard_tag(self.prefix, "esd_figure", rec.name),
                            F.figure_to_rgb(F.esd_figure(rec, dpi=80)),
                            f"{rec.name} @ step {step}",
                        )
                    )
        if self.phase_map and self._phases and self._phase_map_step != step:
            self._phases_changed = False
            self._phase_map_step = step
            out.append(
                (
                    dashboard_tag(self.prefix, "phase_map"),
                    F.figure_to_rgb(F.phase_map_figure(snapshots=self._phases, dpi=100)),
                    f"phases up to step {step}",
                )
            )
        return out
