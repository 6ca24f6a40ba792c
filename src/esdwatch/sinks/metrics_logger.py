"""Scalars for any Lightning logger through ``log_metrics`` (CSV, MLflow, Comet, Neptune ...).

This module also holds the pieces every dashboard sink shares, none of which imports
anything beyond numpy:

* :data:`SCALAR_METRICS` and :func:`scalar_metrics`: the per-layer scalar keys
  ``<prefix>/<metric>/<layer>`` and the model averages ``<prefix>/summary/<metric>``;
* :data:`PHASES` and :func:`phase_ordinal`: the 5+1 phases of training as ordinals
  0..5 (``Unknown`` has none);
* :func:`log10_histogram`: the histogram of log10 eigenvalues that the TensorBoard and
  W&B sinks, the spectra file and the figures all draw.

A value that was not computed (NaN, or -1 for a count) is not logged: a dashboard shows
a gap, never a fake number.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from esdwatch.alarms.rules import Alarm
from esdwatch.schema import LayerRecord
from esdwatch.schema import SUMMARY_METRICS, LayerReport, summarize

log = logging.getLogger("esdwatch.sinks")

__all__ = [
    "MetricsLoggerSink",
    "SCALAR_METRICS",
    "COUNT_METRICS",
    "PHASES",
    "UNKNOWN_PHASE",
    "phase_ordinal",
    "phase_name",
    "layer_order",
    "scalar_metrics",
    "summary_metrics",
    "Log10Histogram",
    "log10_histogram",
    "prefix_for",
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

#: The 5+1 phases in order of increasing implicit self-regularization (HTSR.md section 5);
#: a phase's ordinal is its index here.
PHASES: tuple[str, ...] = ("Random-like", "Bleeding-out", "Bulk+Spikes", "Bulk-decay", "Heavy-Tailed", "Rank-collapse")
UNKNOWN_PHASE = "Unknown"


def _norm(text: str) -> str:
    return re.sub(r"[^a-z]", "", str(text).lower())


_PHASE_BY_NORM: dict[str, int] = {_norm(p): i for i, p in enumerate(PHASES)}
_PHASE_BY_NORM.update({"bulkspike": 2, "heavytail": 4, "rankcollapsed": 5, "random": 0, "bleedout": 1})


def _phase_enum():
    try:
        from esdwatch.engine.phases import Phase
    except ImportError:  # classifier not in this build: the fallback table below
        return None
    return Phase


def phase_ordinal(phase: Any) -> int | None:
    """Ordinal 0..5 of a phase (a ``Phase`` member or its value string), None for unknown.

    Uses ``esdwatch.engine.phases.Phase`` (``Phase.parse(value).order``) when available, else
    :data:`PHASES`; either way the match is case-insensitive ("Heavy-Tailed",
    "heavy_tailed", "HEAVY_TAILED").
    """
    if phase is None:
        return None
    Phase = _phase_enum()
    if Phase is not None:
        try:
            k = int(Phase.parse(phase).order)
        except (ValueError, TypeError, AttributeError, KeyError):
            k = None
        else:
            return k if 0 <= k < len(PHASES) else None
    text = getattr(phase, "value", phase)
    return _PHASE_BY_NORM.get(_norm(text))


def phase_name(phase: Any) -> str:
    """The canonical display name of a phase ("Unknown" when it is not one of the 5+1)."""
    k = phase_ordinal(phase)
    return PHASES[k] if k is not None else UNKNOWN_PHASE


def prefix_for(name: str | None = None, prefix: str | None = None) -> str:
    """``prefix`` if given, else ``esdwatch`` or ``esdwatch/<name>`` (a named monitor)."""
    if prefix:
        return prefix.rstrip("/")
    return f"esdwatch/{name}" if name else "esdwatch"


def _finite(value: Any, metric: str = "") -> float | None:
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
    return _finite(getattr(report, metric, None), metric)


def scalar_metrics(
    records: Iterable[LayerRecord],
    prefix: str = "esdwatch",
    metrics: Sequence[str] = SCALAR_METRICS,
    summary: bool = True,
) -> dict[str, float]:
    """``{"<prefix>/<metric>/<layer>": value, ..., "<prefix>/summary/<metric>": mean}``.

    Non-computed values are left out. The summary averages each of
    :data:`esdwatch.schema.SUMMARY_METRICS` over the layers where it is finite.
    """
    records = list(records)
    out: dict[str, float] = {}
    for rec in records:
        for metric in metrics:
            v = metric_value(rec.report, metric)
            if v is not None:
                out[f"{prefix}/{metric}/{rec.name}"] = v
    if summary and records:
        out.update(summary_metrics(records, prefix))
    return out


def summary_metrics(records: Iterable[LayerRecord], prefix: str = "esdwatch") -> dict[str, float]:
    """The model averages ``<prefix>/summary/<metric>`` of one snapshot (finite ones only)."""
    avg = summarize([r.report for r in records], SUMMARY_METRICS)
    return {f"{prefix}/summary/{k}": float(v) for k, v in avg.items() if math.isfinite(v)}


def layer_order(snapshots: Iterable[Sequence[str]]) -> list[str]:
    """Layer names in model order over several snapshots (each given in model order).

    A layer that appears later is placed right after the layer that preceded it in the
    snapshot where it first appeared, so added layers slot in where they belong.
    """
    order: list[str] = []
    seen: set[str] = set()
    for names in snapshots:
        prev: str | None = None
        for name in names:
            if name not in seen:
                pos = order.index(prev) + 1 if prev is not None else 0
                if prev is None and order:
                    # first layer of this snapshot is new: before the first known layer of it
                    nxt = next((n for n in names if n in seen), None)
                    pos = order.index(nxt) if nxt is not None else len(order)
                order.insert(pos, name)
                seen.add(name)
            prev = name
    return order


# ------------------------------------------------------------------ spectra


@dataclass(frozen=True)
class Log10Histogram:
    """Histogram of log10 eigenvalues on ``bins`` equal-width bins over [lo, hi].

    ``counts`` sums to ``num`` (every eigenvalue); eigenvalues at or below
    ``floor = lambda_max * floor_rel`` (zeros, round-off negatives) are counted in the
    first bin at log10(floor), so a rank collapse shows as a spike on the left.
    ``sum`` and ``sum_squares`` are of the log10 values (TensorBoard's proto wants them).
    """

    lo: float
    hi: float
    counts: np.ndarray
    num: int
    num_floor: int
    sum: float
    sum_squares: float
    vmin: float
    vmax: float

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.counts.size + 1)

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lo": float(self.lo),
            "hi": float(self.hi),
            "counts": [int(c) for c in self.counts],
            "num": int(self.num),
            "num_floor": int(self.num_floor),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Log10Histogram":
        counts = np.asarray(data["counts"], dtype=np.int64)
        lo, hi = float(data["lo"]), float(data["hi"])
        centers = np.linspace(lo, hi, counts.size + 1)
        centers = 0.5 * (centers[:-1] + centers[1:])
        return cls(
            lo=lo, hi=hi, counts=counts, num=int(data.get("num", counts.sum())),
            num_floor=int(data.get("num_floor", 0)),
            sum=float((counts * centers).sum()), sum_squares=float((counts * centers**2).sum()),
            vmin=lo, vmax=hi,
        )


def log10_histogram(evals: Any, bins: int = 64, floor_rel: float = 1e-12) -> Log10Histogram | None:
    """Histogram of log10 of the eigenvalues ``evals`` (None if there is nothing to draw)."""
    ev = np.asarray(evals, dtype=np.float64).ravel()
    ev = ev[np.isfinite(ev)]
    if ev.size == 0:
        return None
    lam_max = float(ev.max())
    if not lam_max > 0.0:
        return None
    bins = max(1, int(bins))
    floor = lam_max * float(floor_rel)
    num_floor = int(np.count_nonzero(ev <= floor))
    x = np.log10(np.maximum(ev, floor))
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-9:  # all equal: a narrow bin around the value
        lo, hi = lo - 0.05, hi + 0.05
    counts, _ = np.histogram(x, bins=bins, range=(lo, hi))
    return Log10Histogram(
        lo=lo, hi=hi, counts=counts.astype(np.int64), num=int(ev.size), num_floor=num_floor,
        sum=float(x.sum()), sum_squares=float(np.dot(x, x)), vmin=float(x.min()), vmax=float(x.max()),
    )


# -------------------------------------------------------------------- the sink


class MetricsLoggerSink:
    """Writes the scalars of every snapshot through ``logger.log_metrics(metrics, step)``.

    For Lightning loggers without a richer esdwatch sink (CSVLogger, MLFlowLogger, ...)
    or any object with that method. Keys are those of :func:`scalar_metrics`; each fired
    alarm is logged as ``<prefix>/alarm/<kind>/<layer>`` = the value that crossed the
    threshold, at the alarm's step. ``close()`` calls ``logger.save()`` when it exists
    (CSVLogger buffers rows until then) and never closes the logger itself.
    """

    needs_evals = False

    def __init__(
        self,
        logger: Any,
        *,
        prefix: str | None = None,
        name: str | None = None,
        summary: bool = True,
        metrics: Sequence[str] = SCALAR_METRICS,
        alarms: bool = True,
    ) -> None:
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(f"{type(logger).__name__} has no log_metrics(metrics, step) method")
        self.logger = logger
        self.prefix = prefix_for(name, prefix)
        self.summary = summary
        self.metrics = tuple(metrics)
        self.alarms = alarms
        self._last_step: int | None = None

    def write(self, records: Sequence[LayerRecord], step: int) -> None:
        values = scalar_metrics(records, self.prefix, self.metrics, self.summary)
        if values:
            self.logger.log_metrics(values, step=int(step))
        self._last_step = int(step)

    def alarm(self, alarm: Alarm) -> None:
        if not self.alarms:
            return
        value = _finite(alarm.value)
        step = alarm.step if alarm.step is not None else self._last_step
        key = f"{self.prefix}/alarm/{alarm.kind}/{alarm.layer}"
        self.logger.log_metrics({key: 1.0 if value is None else value}, step=None if step is None else int(step))

    def close(self) -> None:
        save = getattr(self.logger, "save", None)
        if callable(save):
            try:
                save()
            except Exception as exc:  # the logger may already be finalized
                log.debug("esdwatch: %s.save() failed at close: %s", type(self.logger).__name__, exc)

    def __repr__(self) -> str:
        return f"MetricsLoggerSink({type(self.logger).__name__}, prefix={self.prefix!r})"
