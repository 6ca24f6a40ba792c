"""Weights & Biases: scalars, spectra, figures, a table of the latest snapshot, alerts.

Works on the run of Lightning's ``WandbLogger`` (``logger.experiment``) or any
``wandb`` run (``wandb.init(...)``, or ``wandb.run`` when none is given). Needs the
``wandb`` extra.

Steps: W&B keeps its own monotone ``_step`` and silently drops a ``log(..., step=s)``
with ``s`` below it. Results of a snapshot at global step S reach the sink after the
training loop moved on, so the sink never passes ``step=``: like Lightning's
WandbLogger it logs the step as a value, ``trainer/global_step`` = S, and declares
``define_metric("<prefix>/*", step_metric="trainer/global_step")`` so every esdwatch
chart uses it as its x axis.

What a snapshot logs, in one ``run.log`` call:

* the scalar keys of the TensorBoard sink (``<prefix>/<metric>/<layer>``, the phase as
  its ordinal, ``<prefix>/summary/<metric>``);
* ``<prefix>/esd_log10_eigenvalues/<layer>``: ``wandb.Histogram`` of log10 eigenvalues (at most 512 bins,
  W&B's limit; needs ``keep_evals=True`` on the monitor);
* every ``figure_every`` snapshots (the first included, and at ``close()`` for the last
  one): ``<prefix>/esd_figure/<layer>`` and ``<prefix>/phase_map`` images and
  ``<prefix>/layers``, a ``wandb.Table`` of the snapshot's per-layer records; the phase
  map also at every snapshot where a layer changed phase (models of at most 32 layers).

Every alarm is a row of ``<prefix>/alarms``, a ``wandb.Table`` with the columns
:data:`~esdwatch.sinks.dashboard.ALARM_COLUMNS` (step, severity, kind, layer, value,
threshold, message; empty where a value does not exist, as a phase transition's
threshold), logged once per snapshot that fired alarms, at that snapshot's step. With
wandb >= 0.19 it is an incremental table (``log_mode="INCREMENTAL"``: each log adds
the new rows, and the run page shows them all as one table); with an older wandb the
whole table so far is logged each time (W&B tables are immutable).

Alarms also call ``run.alert`` (title under 64 characters, the alarm's message as text,
level from its severity) for alarms of severity "warning" or "error" (phase transitions
are "info": logged, not alerted), rate-limited: one alert per (kind, layer) per
``alert_interval_s`` seconds and at most ``max_alerts`` per run (the monitor still logs
every alarm).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from esdwatch.schema import Alarm, LayerRecord, phase_name
from esdwatch.sinks.dashboard import ALARM_COLUMNS, DashboardSink, alarm_row
from esdwatch.sinks.tags import SCALAR_METRICS, dashboard_tag, scalar_metrics

log = logging.getLogger("esdwatch.sinks")

__all__ = ["WandbSink", "WANDB_EXTRA_HINT", "TABLE_COLUMNS", "alert_title", "MAX_HIST_BINS", "MAX_TITLE_CHARS"]

WANDB_EXTRA_HINT = "pip install 'esdwatch[wandb]'"
#: W&B histograms take at most 512 bins.
MAX_HIST_BINS = 512
#: W&B alert titles must be shorter than 64 characters.
MAX_TITLE_CHARS = 63

_SEVERITY = {"info": 0, "warning": 1, "error": 2}

#: Columns of the per-layer table (LayerRecord / LayerReport fields; phase by name). Empty
#: where not computed: ``best_fit``, ``tpl_alpha``, ``tpl_lambda`` without ``fit="TPL"`` /
#: ``"E_TPL"``; ``estimated`` (the fields the tail path estimated) on exact spectra.
TABLE_COLUMNS: tuple[str, ...] = (
    "global_step",
    "name",
    "kind",
    "N",
    "M",
    "phase",
    "alpha",
    "alpha_sigma",
    "best_fit",
    "tpl_alpha",
    "tpl_lambda",
    "alpha_weighted",
    "entropy",
    "stable_rank",
    "mp_softrank",
    "log_spectral_norm",
    "num_spikes",
    "num_traps",
    "D",
    "xmin",
    "lambda_plus",
    "lambda_max",
    "spectrum",
    "estimated",
    "status",
)


def _wandb():
    try:
        import wandb
    except ImportError as exc:
        raise ImportError(f"esdwatch's W&B sink needs wandb: {WANDB_EXTRA_HINT}") from exc
    return wandb


def alert_title(alarm: Alarm, prefix: str = "esdwatch") -> str:
    """``"<prefix> <kind>: <layer>"`` cut to fit W&B's limit (under 64 characters)."""
    title = f"{prefix} {alarm.kind.replace('_', ' ')}: {alarm.layer}"
    if len(title) > MAX_TITLE_CHARS:
        title = title[: MAX_TITLE_CHARS - 3] + "..."
    return title


def _cell(rec: LayerRecord, column: str) -> Any:
    if column == "global_step":
        return int(rec.global_step)
    if column == "phase":
        return phase_name(rec.report.phase)
    value = getattr(rec.report, column, None)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value == "" and column in ("best_fit", "estimated"):
        return None  # not computed: an empty cell, as for a NaN
    return value


class WandbSink(DashboardSink):
    """Writes esdwatch's records to a W&B run (see the module docstring).

    Parameters
    ----------
    run:
        A wandb run (Lightning: ``WandbLogger.experiment``); None for ``wandb.run``.
    prefix, name:
        Key prefix (default ``esdwatch``, or ``esdwatch/<name>``).
    summary, metrics:
        Scalars as in :func:`~esdwatch.sinks.tags.scalar_metrics`.
    histograms, hist_bins:
        Spectra as ``wandb.Histogram`` of log10 eigenvalues on ``hist_bins`` (<= 512) bins.
    figures, figure_every, esd_figures, max_esd_figures, phase_map, table:
        Images and the per-layer table every ``figure_every`` snapshots.
    alerts, alert_interval_s, max_alerts, alert_min_severity:
        ``run.alert`` for alarms of at least ``alert_min_severity`` ("info", "warning",
        "error"; default "warning": informational phase transitions do not page anyone),
        rate-limited.
    step_metric:
        The logged step key (Lightning's ``trainer/global_step``).
    clock:
        Monotonic seconds for the rate limit (tests pass their own).
    """

    backend = "W&B"

    def __init__(
        self,
        run: Any = None,
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
        table: bool = True,
        alerts: bool = True,
        alert_interval_s: float = 600.0,
        max_alerts: int = 20,
        alert_min_severity: str = "warning",
        step_metric: str = "trainer/global_step",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wb = _wandb()
        if run is None:
            run = self._wb.run
            if run is None:
                raise ValueError("WandbSink needs a run: pass one, or call wandb.init() first")
        if not callable(getattr(run, "log", None)):
            raise TypeError(f"{type(run).__name__} is not a wandb run (no log method)")
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
        if not 1 <= self.hist_bins <= MAX_HIST_BINS:
            raise ValueError(f"hist_bins must be in 1..{MAX_HIST_BINS} (W&B's histogram limit), got {self.hist_bins}")
        self.run = run
        self.table = table
        self.alerts = alerts
        self.alert_interval_s = float(alert_interval_s)
        self.max_alerts = int(max_alerts)
        if alert_min_severity not in _SEVERITY:
            raise ValueError(f"alert_min_severity must be one of {list(_SEVERITY)}, got {alert_min_severity!r}")
        self.alert_min_severity = alert_min_severity
        self.step_metric = step_metric
        self.clock = clock
        self.snapshots = 0
        self.alerts_sent = 0
        self.alerts_suppressed = 0
        self._last_alert: dict[tuple[str, str], float] = {}
        self._defined = False
        #: every alarm's row, in order; the last ``_unlogged`` are not in W&B yet
        self.alarm_rows: list[list[Any]] = []
        self._unlogged = 0
        self._alarm_step: int | None = None
        self._alarm_table: Any = None

    def _define(self) -> None:
        if self._defined:
            return
        self._defined = True
        define = getattr(self.run, "define_metric", None)
        if callable(define):
            define(self.step_metric)
            define(f"{self.prefix}/*", step_metric=self.step_metric)

    # ---------------------------------------------------------------- the protocol

    def write(self, records: Sequence[LayerRecord], step: int) -> None:
        if not records:
            return
        self._define()
        self._log_alarms()  # a previous snapshot's alarms, when end_snapshot was not called
        step = int(step)
        payload: dict[str, Any] = dict(
            scalar_metrics(records, self.prefix, self.metrics, self.summary, self._by_layer.update(records))
        )
        if self.histograms:
            payload.update(self._histograms(records, step))
        if self._remember(records, step):
            payload.update(self._media(step))
        elif self._phase_map_due():  # a layer changed phase: the map now, whatever figure_every says
            for key, rgb, caption in self._images(step, esd=False) or []:
                payload[key] = self._wb.Image(rgb, caption=caption)
        payload[self.step_metric] = step
        self.run.log(payload)

    def _histograms(self, records: Sequence[LayerRecord], step: int) -> dict[str, Any]:
        hist = self._wb.Histogram
        return {
            dashboard_tag(self.prefix, "esd", rec.name): hist(np_histogram=(h.counts.tolist(), h.edges.tolist()))
            for rec, h in self._spectra(records, step)
        }

    def _media(self, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.table and self._latest:
            rows = [[_cell(rec, c) for c in TABLE_COLUMNS] for rec in self._latest]
            out[dashboard_tag(self.prefix, "layers")] = self._wb.Table(columns=list(TABLE_COLUMNS), data=rows)
        if self.figures:
            for key, rgb, caption in self._images(step) or []:
                out[key] = self._wb.Image(rgb, caption=caption)
        self._figured_step = step
        return out

    def alarm(self, alarm: Alarm) -> None:
        if self._alarm_step is not None and alarm.step is not None and alarm.step != self._alarm_step:
            self._log_alarms()
        self.alarm_rows.append(alarm_row(alarm))
        self._unlogged += 1
        if alarm.step is not None:
            self._alarm_step = int(alarm.step)
        self._alert(alarm)

    def end_snapshot(self, step: int) -> None:
        """The snapshot at ``step`` and its alarms are complete: log its rows of the alarm table."""
        self._log_alarms()

    def _log_alarms(self) -> None:
        """The alarms not yet in W&B, as one ``run.log`` of the alarm table at their step."""
        if not self._unlogged:
            return
        new, self._unlogged = self.alarm_rows[-self._unlogged :], 0
        table = self._alarm_table
        if table is None:
            try:
                table = self._wb.Table(columns=list(ALARM_COLUMNS), log_mode="INCREMENTAL")
                self._alarm_table = table
            except TypeError:  # wandb < 0.19: no incremental tables; log the whole table anew
                table = self._wb.Table(columns=list(ALARM_COLUMNS), data=[list(r) for r in self.alarm_rows])
                new = []
        for row in new:
            table.add_data(*row)
        self._define()
        step = self._alarm_step if self._alarm_step is not None else (self._last_step or 0)
        self.run.log({dashboard_tag(self.prefix, "alarms"): table, self.step_metric: int(step)})

    def _alert(self, alarm: Alarm) -> None:
        if not self.alerts or _SEVERITY.get(alarm.severity, 1) < _SEVERITY[self.alert_min_severity]:
            return
        key = (alarm.kind, alarm.layer)
        now = float(self.clock())
        last = self._last_alert.get(key)
        if (last is not None and now - last < self.alert_interval_s) or self.alerts_sent >= self.max_alerts:
            self.alerts_suppressed += 1
            if self.alerts_sent >= self.max_alerts and self.alerts_suppressed == 1:
                log.info("esdwatch: %d W&B alerts sent, further alerts are suppressed (max_alerts)", self.alerts_sent)
            return
        self._last_alert[key] = now
        self.alerts_sent += 1
        levels = {"info": "INFO", "warning": "WARN", "error": "ERROR"}
        level = getattr(self._wb.AlertLevel, levels.get(alarm.severity, "WARN"))
        where = f" (step {alarm.step})" if alarm.step is not None else ""
        self.run.alert(
            title=alert_title(alarm, self.prefix),
            text=f"{alarm.message}{where}" + (f"\nadvice: {alarm.advice}" if alarm.advice else ""),
            level=level,
            wait_duration=max(int(self.alert_interval_s), 1),
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        unlogged = self._unlogged
        try:
            self._log_alarms()
        except Exception as exc:  # the run may be finished already
            log.warning("esdwatch: the last %d alarms were not logged to W&B: %s", unlogged, exc)
        if self._latest and self._figured_step != self._last_step and (self.figures or self.table):
            try:
                payload = self._media(int(self._last_step or 0))
                if payload:
                    payload[self.step_metric] = int(self._last_step or 0)
                    self.run.log(payload)
            except Exception as exc:  # the run may be finished already
                log.debug("esdwatch: final W&B figures not logged: %s", exc)

    def __repr__(self) -> str:
        return f"WandbSink(prefix={self.prefix!r}, figure_every={self.figure_every})"
