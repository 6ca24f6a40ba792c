"""TensorBoard: scalars, spectra, figures, the phase map and text, on a SummaryWriter.

Works on the writer of Lightning's ``TensorBoardLogger`` (``logger.experiment``: a
``torch.utils.tensorboard`` or ``tensorboardX`` SummaryWriter) or any object with the
same methods, or on a directory (the sink then owns a ``torch.utils.tensorboard``
SummaryWriter, which needs the ``tensorboard`` extra).

What a snapshot at global step S writes (``<p>`` is the prefix, ``esdwatch`` or
``esdwatch/<name>`` for a named monitor):

``<p>/<metric>/<layer>`` (scalar)
    alpha, alpha_weighted, entropy, stable_rank, mp_softrank, log_spectral_norm,
    num_spikes, num_traps, and phase as its ordinal (0 Random-like ... 5 Rank-collapse),
    each with ``add_scalar`` (never ``add_scalars``, which makes a run directory per
    key); values that were not computed are left out.
``<p>/summary/<metric>`` (scalar)
    the model averages (:data:`esdwatch.schema.SUMMARY_METRICS`).
custom-scalars layout
    written once per writer at the first snapshot (``add_custom_scalars`` may only be
    called once per writer): one multi-line chart per metric with every layer, matched
    by tag regex so layers added later join the chart.
``<p>/esd/<layer>`` (histogram)
    the histogram of log10 eigenvalues computed by esdwatch
    (:func:`~esdwatch.schema.log10_histogram`) and written with
    ``add_histogram_raw``, so the Histograms and Distributions tabs show the ESD
    evolving; needs the eigenvalues (``keep_evals=True`` on the monitor).
``<p>/esd_figure/<layer>``, ``<p>/phase_map`` (images)
    every ``figure_every`` snapshots (the first included) and at ``close()`` for the
    last one: the ESD on log-log axes with the MP and power-law fits, and the phase map
    of every snapshot so far (:mod:`esdwatch.reporting.figures`, needs matplotlib).
``<p>/layers`` (text)
    a markdown table of every layer: phase, alpha, entropy, soft rank.
``<p>/alarms`` (text)
    one entry per alarm, at its step.

Every event is written at step S, the snapshot's global step, with the snapshot's wall
time. The sink never writes a step lower than one it wrote before (TensorBoard's
reader drops data on a step that goes back), and flushes after each snapshot so a
running ``tensorboard`` shows it at once.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from typing import Any

from esdwatch.schema import Alarm, LayerRecord, phase_name
from esdwatch.sinks.dashboard import DashboardSink
from esdwatch.sinks.tags import SCALAR_METRICS, scalar_metrics

__all__ = ["TensorBoardSink", "custom_scalars_layout", "layers_markdown", "TENSORBOARD_EXTRA_HINT"]

TENSORBOARD_EXTRA_HINT = "pip install 'esdwatch[tensorboard]'"

#: Metrics that get a multi-line chart (all layers) in the custom-scalars layout.
LAYOUT_METRICS: tuple[str, ...] = (
    "alpha",
    "entropy",
    "mp_softrank",
    "stable_rank",
    "alpha_weighted",
    "log_spectral_norm",
    "phase",
    "num_spikes",
)

# writers that already received a custom-scalars layout (add_custom_scalars: once per writer)
_LAYOUT_WRITERS: weakref.WeakSet[Any] = weakref.WeakSet()
_LAYOUT_WRITER_IDS: set[int] = set()


def custom_scalars_layout(prefix: str = "esdwatch", metrics: Sequence[str] = LAYOUT_METRICS) -> dict:
    """The custom-scalars layout: one multi-line chart of all layers per metric.

    ``{category: {chart: ["Multiline", [tag regexes]]}}`` as ``add_custom_scalars``
    takes it; the per-layer charts match ``^<prefix>/<metric>/`` and the model chart
    the summary tags.
    """
    p = re.escape(prefix)
    per_layer = {metric: ["Multiline", [rf"^{p}/{metric}/"]] for metric in metrics}
    model = {
        "alpha (layer mean)": ["Multiline", [rf"^{p}/summary/alpha$"]],
        "alpha_weighted (layer mean)": ["Multiline", [rf"^{p}/summary/alpha_weighted$"]],
        "entropy, stable rank (layer means)": ["Multiline", [rf"^{p}/summary/(entropy|stable_rank)$"]],
        "norms (layer means)": ["Multiline", [rf"^{p}/summary/log_(norm|spectral_norm|alpha_norm)$"]],
    }
    return {f"{prefix}: all layers": per_layer, f"{prefix}: model": model}


def _cell(value: Any, spec: str = ".3f") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return format(v, spec) if math.isfinite(v) else "-"


def layers_markdown(records: Sequence[LayerRecord]) -> str:
    """A markdown table of one snapshot: layer, phase, alpha, entropy, soft rank, spikes."""
    lines = [
        "| layer | phase | alpha | entropy | MP soft rank | stable rank | spikes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for rec in records:
        r = rec.report
        spikes = str(r.num_spikes) if r.num_spikes is not None and r.num_spikes >= 0 else "-"
        status = "" if r.ok else f" ({r.status})"
        lines.append(
            f"| {rec.name.replace('|', '&#124;')}{status} | {phase_name(r.phase)} | {_cell(r.alpha)} | "
            f"{_cell(r.entropy)} | {_cell(r.mp_softrank)} | {_cell(r.stable_rank, '.2f')} | {spikes} |"
        )
    return "\n".join(lines)


def _open_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(f"esdwatch's TensorBoard sink needs tensorboard: {TENSORBOARD_EXTRA_HINT}") from exc
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardSink(DashboardSink):
    """Writes esdwatch's records to TensorBoard (see the module docstring for the tags).

    Parameters
    ----------
    writer:
        A SummaryWriter (Lightning: ``TensorBoardLogger.experiment``) or a directory for
        a writer of the sink's own (closed by :meth:`close`; a user's writer is only
        flushed).
    prefix, name:
        Tag prefix (default ``esdwatch``, or ``esdwatch/<name>``).
    summary:
        Also write the model averages ``<prefix>/summary/<metric>``.
    histograms, hist_bins:
        Spectra as histograms of log10 eigenvalues, on ``hist_bins`` bins.
    figures, figure_every, esd_figures, max_esd_figures, phase_map:
        Images every ``figure_every`` snapshots: per-layer ESD figures (at most
        ``max_esd_figures`` layers, in model order; None for all) and the phase map.
    text:
        The per-layer markdown table at each snapshot (alarms are always written).
    custom_scalars:
        Write the custom-scalars layout (once per writer).
    """

    backend = "TensorBoard"

    def __init__(
        self,
        writer: Any,
        *,
        prefix: str | None = None,
        name: str | None = None,
        summary: bool = True,
        metrics: Sequence[str] = SCALAR_METRICS,
        histograms: bool = True,
        hist_bins: int = 64,
        figures: bool = True,
        figure_every: int = 10,
        esd_figures: bool = True,
        max_esd_figures: int | None = 32,
        phase_map: bool = True,
        text: bool = True,
        custom_scalars: bool = True,
    ) -> None:
        if isinstance(writer, (str, bytes)) or hasattr(writer, "__fspath__"):
            self.writer = _open_writer(writer)
            self._owns_writer = True
        else:
            if not callable(getattr(writer, "add_scalar", None)):
                raise TypeError(f"{type(writer).__name__} is not a SummaryWriter (no add_scalar)")
            self.writer = writer
            self._owns_writer = False
        super().__init__(
            prefix=prefix,
            name=name,
            summary=summary,
            metrics=metrics,
            histograms=histograms,
            hist_bins=hist_bins,
            figures=figures,
            figure_every=figure_every,
            esd_figures=esd_figures,
            max_esd_figures=max_esd_figures,
            phase_map=phase_map,
        )
        self.text = text
        self.custom_scalars = custom_scalars
        self._alarm_step: int | None = None  # the step whose alarms _alarm_lines holds
        self._alarm_lines: list[str] = []

    # ------------------------------------------------------------------ plumbing

    def _layout_once(self) -> None:
        w = self.writer
        try:
            if w in _LAYOUT_WRITERS:
                return
            _LAYOUT_WRITERS.add(w)
        except TypeError:  # not weak-referenceable
            if id(w) in _LAYOUT_WRITER_IDS:
                return
            _LAYOUT_WRITER_IDS.add(id(w))
        if not callable(getattr(w, "add_custom_scalars", None)):
            return
        w.add_custom_scalars(custom_scalars_layout(self.prefix))

    def _step(self, step: int | None) -> int:
        s = int(step) if step is not None else (self._last_step or 0)
        if self._last_step is not None and s < self._last_step:
            s = self._last_step
        return s

    def _flush(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    # ---------------------------------------------------------------- the protocol

    def write(self, records: Sequence[LayerRecord], step: int) -> None:
        if not records:
            return
        step = self._step(step)
        wall = float(records[0].wall_time) if records[0].wall_time and records[0].wall_time > 0 else None
        w = self.writer
        if self.custom_scalars:
            self._layout_once()
        for tag, value in scalar_metrics(records, self.prefix, self.metrics, self.summary).items():
            w.add_scalar(tag, value, global_step=step, walltime=wall)
        if self.histograms:
            self._write_histograms(records, step, wall)
        if self.text:
            w.add_text(f"{self.prefix}/layers", layers_markdown(records), global_step=step, walltime=wall)
        if self._remember(records, step) and self.figures:
            self._write_figures(step, wall)
        self._flush()

    def _write_histograms(self, records: Sequence[LayerRecord], step: int, wall: float | None) -> None:
        add_raw = getattr(self.writer, "add_histogram_raw", None)
        if not callable(add_raw):
            return
        for rec, h in self._spectra(records, step):
            # TensorBoard buckets are given by their right edges: an empty first bucket
            # ending at the lowest edge makes the left edge explicit.
            add_raw(
                f"{self.prefix}/esd/{rec.name}",
                min=h.vmin,
                max=h.vmax,
                num=h.num,
                sum=h.sum,
                sum_squares=h.sum_squares,
                bucket_limits=[float(x) for x in h.edges],
                bucket_counts=[0] + [int(c) for c in h.counts],
                global_step=step,
                walltime=wall,
            )

    def _write_figures(self, step: int, wall: float | None) -> None:
        images = self._images(step)
        if images is None:
            return
        for tag, rgb, _ in images:
            self.writer.add_image(tag, rgb, global_step=step, walltime=wall, dataformats="HWC")
        self._figured_step = step

    def alarm(self, alarm: Alarm) -> None:
        step = self._step(alarm.step)
        value, threshold = (_number(v, ".4g") for v in (alarm.value, alarm.threshold))
        line = (
            f"**{alarm.severity} `{alarm.kind}`** at step {alarm.step if alarm.step is not None else '?'}, "
            f"layer `{alarm.layer}`: {alarm.message} (value {value}, threshold {threshold})"
            + (f"; *advice*: {alarm.advice}" if alarm.advice else "")
        )
        # TensorBoard shows one text per tag and step: every alarm of the step goes into it
        if step != self._alarm_step:
            self._alarm_step, self._alarm_lines = step, []
        self._alarm_lines.append(line)
        self.writer.add_text(f"{self.prefix}/alarms", "\n\n".join(self._alarm_lines), global_step=step)
        self._flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.figures and self._latest and self._figured_step != self._last_step:
                self._write_figures(int(self._last_step or 0), None)
            self._flush()
        finally:
            if self._owns_writer:
                self.writer.close()

    def __repr__(self) -> str:
        return (
            f"TensorBoardSink({type(self.writer).__name__}, prefix={self.prefix!r}, figure_every={self.figure_every})"
        )


def _number(value: object, spec: str) -> str:
    """A finite number formatted with ``spec``; ``-`` for a missing or non-finite one (a transition's threshold)."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"
    return format(v, spec) if math.isfinite(v) else "-"
