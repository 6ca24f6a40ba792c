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
    called once per writer): first one phase chart per layer (one line each, so a
    change is a visible step; at most :data:`MAX_PHASE_CHARTS` layers), then one
    multi-line chart per metric with every layer, matched by tag regex so layers added
    later join the chart. TensorBoard smooths every line by default (the slider on the
    left): set it to 0 to see the phase steps unsmoothed.
``<p>/esd_log10_eigenvalues/<layer>`` (histogram)
    the histogram of log10 eigenvalues computed by esdwatch
    (:func:`~esdwatch.schema.log10_histogram`), written as ``add_histogram_raw`` writes
    it, plus a description (:data:`~esdwatch.sinks.tags.ESD_HISTOGRAM_DESCRIPTION`: the
    x axis is log10 eigenvalues), so the Histograms and Distributions tabs show the ESD
    evolving; needs the eigenvalues (``keep_evals=True`` on the monitor).
``<p>/esd_figure/<layer>``, ``<p>/phase_map`` (images)
    every ``figure_every`` snapshots (the first included) and at ``close()`` for the
    last one: the ESD on log-log axes with the MP and power-law fits, and the phase map
    of every snapshot so far (:mod:`esdwatch.reporting.figures`, needs matplotlib);
    the phase map also at every snapshot where a layer changed phase (models of
    at most 32 layers).
``<p>/phases`` (text)
    a markdown table of every layer's phase by name, the step it began, the phase
    before (a change at this snapshot in bold) and alpha.
``<p>/layers`` (text)
    a markdown table of every layer: phase, alpha, entropy, soft rank.
``<p>/alarms`` (text)
    a markdown table of every alarm of a snapshot (step, severity, kind, layer, value,
    threshold, message; a phase transition has no threshold), written once per snapshot.

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

from esdwatch.schema import PHASES, Alarm, LayerRecord, phase_name
from esdwatch.sinks.dashboard import DashboardSink, alarms_markdown, phases_markdown
from esdwatch.sinks.tags import ESD_HISTOGRAM_DESCRIPTION, SCALAR_METRICS, dashboard_tag, scalar_metrics

__all__ = ["TensorBoardSink", "custom_scalars_layout", "layers_markdown", "TENSORBOARD_EXTRA_HINT", "MAX_PHASE_CHARTS"]

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

#: At most this many layers get a phase chart of their own (the phase map shows all of them).
MAX_PHASE_CHARTS = 32

#: The phase ordinals, as a chart's title says them.
PHASE_SCALE = ", ".join(f"{k} {name}" for k, name in enumerate(PHASES))

#: the layers each writer's Custom Scalars layout was written with
_LAYOUT_LAYERS: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()
_LAYOUT_LAYERS_BY_ID: dict[int, tuple[str, ...]] = {}


def custom_scalars_layout(
    prefix: str = "esdwatch", metrics: Sequence[str] = LAYOUT_METRICS, layers: Sequence[str] = ()
) -> dict:
    """The custom-scalars layout: a phase chart per layer, and one multi-line chart of all layers per metric.

    ``{category: {chart: ["Multiline", [tag regexes]]}}`` as ``add_custom_scalars``
    takes it. The phase charts (the first :data:`MAX_PHASE_CHARTS` of ``layers``) match
    one tag each, ``^<prefix>/phase/<layer>$``, so each has one line whose steps are
    the phase changes; the per-metric charts match ``^<prefix>/<metric>/`` and the
    model charts the summary tags.
    """
    p = re.escape(prefix)
    out: dict = {}
    if layers and "phase" in metrics:
        out[f"{prefix}: phase per layer ({PHASE_SCALE}; set smoothing to 0)"] = {
            f"phase: {layer}": ["Multiline", [rf"^{p}/phase/{re.escape(layer)}$"]]
            for layer in list(layers)[:MAX_PHASE_CHARTS]
        }
    per_layer = {metric: ["Multiline", [rf"^{p}/{metric}/"]] for metric in metrics}
    model = {
        "alpha (layer mean)": ["Multiline", [rf"^{p}/summary/alpha$"]],
        "alpha_weighted (layer mean)": ["Multiline", [rf"^{p}/summary/alpha_weighted$"]],
        "entropy, stable rank (layer means)": ["Multiline", [rf"^{p}/summary/(entropy|stable_rank)$"]],
        "norms (layer means)": ["Multiline", [rf"^{p}/summary/log_(norm|spectral_norm|alpha_norm)$"]],
    }
    out[f"{prefix}: all layers"] = per_layer
    out[f"{prefix}: model"] = model
    return out


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
        self._alarm_step: int | None = None  # the step whose alarms _alarms holds
        self._alarms: list[Alarm] = []  # written once the snapshot's alarms are complete
        self._add_histogram = _histogram_writer(self.writer)

    # ------------------------------------------------------------------ plumbing

    def _layout_once(self, layers: Sequence[str]) -> None:
        """Write the Custom Scalars layout once per writer, and again when layers appear that it lacks.

        Under ``layers_per_snapshot`` the first snapshot holds a subset of the layers, so the
        per-layer phase charts grow with the layers seen (TensorBoard shows the latest layout).
        """
        w = self.writer
        try:
            written = _LAYOUT_LAYERS.get(w)
            table: Any = _LAYOUT_LAYERS
            key: Any = w
        except TypeError:  # not weak-referenceable
            written = _LAYOUT_LAYERS_BY_ID.get(id(w))
            table, key = _LAYOUT_LAYERS_BY_ID, id(w)
        if written is not None and set(layers) <= set(written):
            return
        names = tuple(written or ()) + tuple(n for n in layers if n not in (written or ()))
        table[key] = names
        if not callable(getattr(w, "add_custom_scalars", None)):
            return
        w.add_custom_scalars(custom_scalars_layout(self.prefix, layers=names))

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
        self._write_alarms()  # a previous snapshot's alarms, when end_snapshot was not called
        latest = self._by_layer.update(records)  # every layer's latest record (a rotation's subset otherwise)
        if self.custom_scalars:
            self._layout_once([r.name for r in latest])
        for tag, value in scalar_metrics(records, self.prefix, self.metrics, self.summary, latest).items():
            w.add_scalar(tag, value, global_step=step, walltime=wall)
        if self.histograms:
            self._write_histograms(records, step, wall)
        figures_due = self._remember(records, step) and self.figures
        if self.text:
            w.add_text(dashboard_tag(self.prefix, "layers"), layers_markdown(records), global_step=step, walltime=wall)
            text = phases_markdown(latest, self.phase_spans, step)
            w.add_text(dashboard_tag(self.prefix, "phases"), text, global_step=step, walltime=wall)
        if figures_due:
            self._write_figures(step, wall)
        elif self._phase_map_due():
            self._write_figures(step, wall, esd=False)
        self._flush()

    def _write_histograms(self, records: Sequence[LayerRecord], step: int, wall: float | None) -> None:
        add_raw = self._add_histogram
        if add_raw is None:
            return
        for rec, h in self._spectra(records, step):
            # TensorBoard buckets are given by their right edges: an empty first bucket
            # ending at the lowest edge makes the left edge explicit.
            add_raw(
                dashboard_tag(self.prefix, "esd", rec.name),
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

    def _write_figures(self, step: int, wall: float | None, esd: bool = True) -> None:
        images = self._images(step, esd=esd)
        if images is None:
            return
        for tag, rgb, _ in images:
            self.writer.add_image(tag, rgb, global_step=step, walltime=wall, dataformats="HWC")
        if esd:
            self._figured_step = step

    def alarm(self, alarm: Alarm) -> None:
        # TensorBoard shows one text per tag and step: a snapshot's alarms are kept and
        # written together, once, by end_snapshot (or the next write, or close)
        step = self._step(alarm.step)
        if step != self._alarm_step:
            self._write_alarms()
            self._alarm_step = step
        self._alarms.append(alarm)

    def end_snapshot(self, step: int) -> None:
        """The snapshot at ``step`` and its alarms are complete: write its alarm table."""
        self._write_alarms()

    def _write_alarms(self) -> None:
        if not self._alarms or self._alarm_step is None:
            return
        alarms, self._alarms = self._alarms, []
        tag = dashboard_tag(self.prefix, "alarms")
        self.writer.add_text(tag, alarms_markdown(alarms), global_step=self._alarm_step)
        self._flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._write_alarms()
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


def _histogram_writer(writer: Any) -> Any:
    """``add_histogram_raw`` of ``writer``, or for torch's SummaryWriter the same summary
    with :data:`ESD_HISTOGRAM_DESCRIPTION` as its description (TensorBoard shows it on
    the chart: the x axis is log10 eigenvalues). None when the writer has neither."""
    add_raw = getattr(writer, "add_histogram_raw", None)
    if not callable(add_raw):
        return None
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if not type(writer).__module__.startswith("torch.utils.tensorboard") or not callable(get_file_writer):
        return add_raw  # another writer (tensorboardX, a user's): its own summary protos
    from torch.utils.tensorboard.summary import histogram_raw

    described_tags: set[str] = set()

    def described(tag: str, *, global_step: int, walltime: float | None, **hist: Any) -> None:
        summary = histogram_raw(tag, **hist)
        if tag not in described_tags:  # TensorBoard keeps a tag's first metadata
            described_tags.add(tag)
            metadata = summary.value[0].metadata
            metadata.plugin_data.plugin_name = "histograms"
            metadata.summary_description = ESD_HISTOGRAM_DESCRIPTION
        get_file_writer().add_summary(summary, global_step, walltime)

    return described
