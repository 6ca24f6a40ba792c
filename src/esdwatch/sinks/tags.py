"""How a dashboard's keys are named and filled: one rule for TensorBoard, W&B and ``log_metrics``.

* :func:`prefix_for`: ``esdwatch``, or ``esdwatch/<name>`` for a named monitor (or the
  user's own prefix);
* :data:`SCALAR_METRICS` and :func:`scalar_metrics`: the per-layer keys
  ``<prefix>/<metric>/<layer>`` (the phase as its ordinal, 0 Random-like ... 5
  Rank-collapse) and the model averages ``<prefix>/summary/<metric>``.

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
]

#: Per-layer scalars written by every sink, as ``<prefix>/<metric>/<layer>``.
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
)

#: Integer metrics whose "not computed" value is -1.
COUNT_METRICS: frozenset[str] = frozenset({"num_spikes", "num_traps"})


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
