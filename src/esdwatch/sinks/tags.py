"""How a dashboard's keys are named and filled: one rule for TensorBoard, W&B and ``log_metrics``.

* :func:`prefix_for`: ``esdwatch``, or ``esdwatch/<name>`` for a named monitor (or the
  user's own prefix);
* :data:`SCALAR_METRICS` and :func:`scalar_metrics`: the per-layer keys
  ``<prefix>/<metric>/<layer>`` (the phase as its ordinal, 0 Random-like ... 5
  Rank-collapse) and the model averages ``<prefix>/summary/<metric>``;
* :func:`dashboard_tag`: every other key (spectra, images, text, the alarm table), so
  the TensorBoard and W&B sinks name the same thing the same way.

A value that was not computed (NaN, or -1 for a count) is not logged: a dashboard shows
a gap, never a fake number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from esdwatch.schema import (
    SUMMARY_METRICS,
    LayerRecord,
    LayerReport,
    phase_ordinal,
    summarize,
)

__all__ = [
    "SCALAR_METRICS",
    "COUNT_METRICS",
    "prefix_for",
    "finite_value",
    "metric_value",
    "scalar_metrics",
    "summary_metrics",
    "dashboard_tag",
    "DASHBOARD_TAGS",
    "ESD_HISTOGRAM_DESCRIPTION",
]

#: Per-layer scalars written by every sink, as ``<prefix>/<metric>/<layer>`` (``tpl_alpha``
#: only with ``fit="TPL"`` / ``"E_TPL"``: not computed otherwise, so not logged).
SCALAR_METRICS: tuple[str, ...] = (
    "alpha",
    "alpha_weighted",
    "entropy",
    "stable_rank",
    "mp_softrank",
    "log_spectral_norm",
    "num_spikes",
    "num_traps",
    "phase",
    "tpl_alpha",
)

#: Integer metrics whose "not computed" value is -1.
COUNT_METRICS: frozenset[str] = frozenset({"num_spikes", "num_traps"})


#: The non-scalar keys, ``<prefix>/<what>`` or ``<prefix>/<what>/<layer>``: the ESD as a
#: histogram of log10 eigenvalues, its figure, the phase map, the per-layer table, the
#: phase table (phase names and the step each phase began) and every alarm.
DASHBOARD_TAGS: dict[str, str] = {
    "esd": "esd_log10_eigenvalues",
    "esd_figure": "esd_figure",
    "phase_map": "phase_map",
    "layers": "layers",
    "phases": "phases",
    "alarms": "alarms",
}

#: What an ESD histogram's x axis is (TensorBoard shows it as the tag's description).
ESD_HISTOGRAM_DESCRIPTION = (
    "x axis: log10 of the eigenvalues of W^T W (the empirical spectral density, ESD); "
    "height: how many eigenvalues fall in each of the bins. Heavy-tailed layers stretch to the right."
)


def dashboard_tag(prefix: str, what: str, layer: str | None = None) -> str:
    """``<prefix>/<what>`` or ``<prefix>/<what>/<layer>``, ``what`` one of :data:`DASHBOARD_TAGS`."""
    tag = f"{prefix}/{DASHBOARD_TAGS[what]}"
    return tag if layer is None else f"{tag}/{layer}"


def prefix_for(name: str | None = None, prefix: str | None = None) -> str:
    """``prefix`` if given, else ``esdwatch`` or ``esdwatch/<name>`` (a named monitor)."""
    if prefix:
        return prefix.rstrip("/")
    return f"esdwatch/{name}" if name else "esdwatch"


def finite_value(value: Any, metric: str = "") -> float | None:
    """``value`` as a float when it was computed (finite; a count of :data:`COUNT_METRICS` not -1), else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    if metric in COUNT_METRICS and v < 0:
        return None
    return v


def metric_value(report: LayerReport, metric: str) -> float | None:
    """The scalar a sink logs for ``metric`` of one layer (None: not computed)."""
    if metric == "phase":
        k = phase_ordinal(report.phase)
        return None if k is None else float(k)
    return finite_value(getattr(report, metric, None), metric)


def scalar_metrics(
    records: Iterable[LayerRecord],
    prefix: str = "esdwatch",
    metrics: Sequence[str] = SCALAR_METRICS,
    summary: bool = True,
    summary_of: Iterable[LayerRecord] | None = None,
) -> dict[str, float]:
    """``{"<prefix>/<metric>/<layer>": value, ..., "<prefix>/summary/<metric>": mean}``.

    Non-computed values are left out. The summary averages each of
    :data:`esdwatch.schema.SUMMARY_METRICS` over the layers where it is finite: those of
    ``summary_of`` when given (each layer's latest record, :class:`esdwatch.schema.LatestRecords`,
    for snapshots holding a rotating subset of the layers), else those of ``records``.
    """
    records = list(records)
    out: dict[str, float] = {}
    for rec in records:
        for metric in metrics:
            v = metric_value(rec.report, metric)
            if v is not None:
                out[f"{prefix}/{metric}/{rec.name}"] = v
    if summary and records:
        out.update(summary_metrics(records if summary_of is None else summary_of, prefix))
    return out


def summary_metrics(records: Iterable[LayerRecord], prefix: str = "esdwatch") -> dict[str, float]:
    """The model averages ``<prefix>/summary/<metric>`` of one snapshot (finite ones only)."""
    avg = summarize([r.report for r in records], SUMMARY_METRICS)
    return {f"{prefix}/summary/{k}": float(v) for k, v in avg.items() if math.isfinite(v)}
