"""Pathologies as data: typed alarm records evaluated on layer reports (docs/metrics.md section 7).

This module is stateless: it says which layers of *one* analysis cross a threshold.
Patience (consecutive snapshots) and actions (log, warn, stop) belong to the monitor.

Default rules (:data:`DEFAULT_RULES`)
-------------------------------------
=================  ===========================  =========  ========  =============================================
kind               metric                       fires at   severity  why
=================  ===========================  =========  ========  =============================================
rank_collapse      rank_collapse_fraction       >= 0.25    error     a quarter of the M eigenvalues are
                                                                     numerically zero (< 1e-6 lambda_max): the
                                                                     Rank-collapse rule of esdwatch.engine.phases. When
                                                                     the layer has a phase, it must also be
                                                                     Rank-collapse (the phase rule also requires
                                                                     the zeros to be separated from the rest, so
                                                                     a very heavy-tailed layer whose bulk lies 6
                                                                     decades below lambda_max does not alarm).
                                                                     An all-zero layer (status "degenerate")
                                                                     always alarms, with value 1.
correlation_trap   num_traps                    >= 1       info      the randomized ESD has an eigenvalue beyond
                                                                     its own MP edge + 4 TW scales: a few
                                                                     unusually large entries (listed in
                                                                     ``extra["entries"]``)
alpha_low          alpha                        < 2        info      very heavy-tailed, possibly over-trained
alpha_high         alpha                        > 6        info      under-trained, random-like (expected at
                                                                     initialization)
non_finite         num_non_finite (status)      > 0        error     NaN/Inf weights (always checked)
=================  ===========================  =========  ========  =============================================

Every alarm carries the layer's phase (when known) in ``extra["phase"]``.

``correlation_trap`` and ``alpha_low`` are informational (issue 16): on healthy digits runs,
the README demo included, a layer drifts below alpha 2 and single marginal traps come and
go; the warning-level signals are their history versions (:mod:`esdwatch.alarms.history`:
``alpha_crossing``, ``new_traps``), measured in ``experiments/results/alarm_lead_time.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from esdwatch.schema import (
    ALARM_KINDS,
    ALPHA_HIGH,
    ALPHA_LOW,
    CORRELATION_TRAP,
    NON_FINITE,
    PHASE_TRANSITION,
    RANK_COLLAPSE,
    RANK_COLLAPSE_FRACTION,
    STATUS_DEGENERATE,
    STATUS_NON_FINITE,
    Alarm,
    LayerReport,
    phase_or_none,
)

__all__ = [
    "Alarm",
    "AlarmRule",
    "DEFAULT_RULES",
    "evaluate_alarms",
    "ALARM_KINDS",
    "RANK_COLLAPSE",
    "CORRELATION_TRAP",
    "ALPHA_LOW",
    "ALPHA_HIGH",
    "NON_FINITE",
    "PHASE_TRANSITION",
]


@dataclass(frozen=True)
class AlarmRule:
    """A threshold on one metric of a LayerReport.

    ``kind`` names the pathology; ``metric`` the LayerReport field. The alarm fires when
    the value is above ``threshold`` (``above=True``) or below it (``above=False``);
    ``inclusive`` makes the comparison ``>=`` / ``<=``. With ``phase`` set, a layer that
    has a phase must also be in that phase (a layer without one is judged on the
    threshold alone). NaN values never fire.
    """

    kind: str
    metric: str
    threshold: float
    above: bool = True
    severity: str = "warning"
    inclusive: bool = False
    phase: str | None = None

    def check(self, layer: LayerReport) -> Alarm | None:
        value = getattr(layer, self.metric, None)
        if value is None:
            return None
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(value):
            return None
        if self.above:
            crossed = value >= self.threshold if self.inclusive else value > self.threshold
        else:
            crossed = value <= self.threshold if self.inclusive else value < self.threshold
        if not crossed:
            return None
        layer_phase = getattr(layer, "phase", "") or ""
        if self.phase is not None and phase_or_none(layer_phase) is not None and layer_phase != self.phase:
            return None
        relation = (">=" if self.inclusive else ">") if self.above else ("<=" if self.inclusive else "<")
        extra = _extra(self.kind, layer)
        phase_txt = f", phase {layer_phase}" if phase_or_none(layer_phase) is not None else ""
        return Alarm(
            kind=self.kind,
            layer=layer.name,
            value=value,
            threshold=self.threshold,
            severity=self.severity,
            message=(
                f"{layer.name}: {self.metric} = {value:.4g} {relation} {self.threshold:g} "
                f"({self.kind.replace('_', ' ')}{phase_txt}){_detail(self.kind, layer)}"
            ),
            extra=extra,
        )


def _extra(kind: str, layer: LayerReport) -> dict[str, Any]:
    out: dict[str, Any] = {}
    phase = getattr(layer, "phase", "") or ""
    if phase_or_none(phase) is not None:
        out["phase"] = phase
    if kind == CORRELATION_TRAP:
        out["rand_distance"] = _finite_or_none(getattr(layer, "rand_distance", math.nan))
        out["rand_lambda_max"] = _finite_or_none(getattr(layer, "rand_lambda_max", math.nan))
        out["rand_lambda_plus"] = _finite_or_none(getattr(layer, "rand_lambda_plus", math.nan))
        entries = getattr(layer, "trap_entries", "")
        if entries:
            out["entries"] = entries
    elif kind == RANK_COLLAPSE:
        out["dead_units"] = int(getattr(layer, "dead_units", -1))
        out["numerical_rank"] = int(getattr(layer, "numerical_rank", -1))
    elif kind in (ALPHA_LOW, ALPHA_HIGH):
        out["D"] = _finite_or_none(getattr(layer, "D", math.nan))
    return out


def _detail(kind: str, layer: LayerReport) -> str:
    if kind == CORRELATION_TRAP:
        entries = getattr(layer, "trap_entries", "")
        return f"; largest entries {entries}" if entries else ""
    if kind == RANK_COLLAPSE:
        dead = int(getattr(layer, "dead_units", -1))
        return f"; {dead} dead units" if dead > 0 else ""
    return ""


def _finite_or_none(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


#: The default rules (table in the module docstring).
DEFAULT_RULES: tuple[AlarmRule, ...] = (
    AlarmRule(
        RANK_COLLAPSE,
        "rank_collapse_fraction",
        RANK_COLLAPSE_FRACTION,
        above=True,
        severity="error",
        inclusive=True,
        phase="Rank-collapse",
    ),
    AlarmRule(CORRELATION_TRAP, "num_traps", 1, above=True, severity="info", inclusive=True),
    AlarmRule(ALPHA_LOW, "alpha", 2.0, above=False, severity="info"),
    AlarmRule(ALPHA_HIGH, "alpha", 6.0, above=True, severity="info"),
)


def evaluate_alarms(
    layers: Iterable[LayerReport],
    rules: Sequence[AlarmRule] | None = None,
    *,
    step: int | None = None,
) -> list[Alarm]:
    """Alarms raised by ``layers`` under ``rules`` (default :data:`DEFAULT_RULES`).

    Non-finite weights always raise a ``non_finite`` alarm of severity ``error``; an
    all-zero layer (status ``degenerate`` with lambda_max = 0) raises ``rank_collapse``
    whenever a rank-collapse rule is among ``rules``. Other layers that are not ``ok``
    (failed) raise nothing.
    """
    rules = DEFAULT_RULES if rules is None else tuple(rules)
    alarms: list[Alarm] = []
    for layer in layers:
        if layer.status == STATUS_NON_FINITE:
            alarms.append(
                Alarm(
                    kind=NON_FINITE,
                    layer=layer.name,
                    value=float(layer.num_non_finite),
                    threshold=0.0,
                    severity="error",
                    message=f"{layer.name}: {layer.num_non_finite} non-finite weights (NaN/Inf)",
                    step=step,
                )
            )
            continue
        if layer.status == STATUS_DEGENERATE and _all_zero(layer):
            for rule in rules:
                if rule.kind == RANK_COLLAPSE:
                    alarms.append(
                        Alarm(
                            kind=RANK_COLLAPSE,
                            layer=layer.name,
                            value=1.0,
                            threshold=rule.threshold,
                            severity=rule.severity,
                            message=f"{layer.name}: all-zero matrix (complete rank collapse)",
                            step=step,
                            extra=_extra(RANK_COLLAPSE, layer),
                        )
                    )
                    break
            continue
        if not layer.ok:
            continue
        for rule in rules:
            alarm = rule.check(layer)
            if alarm is not None:
                alarms.append(dataclasses.replace(alarm, step=step) if step is not None else alarm)
    return alarms


def _all_zero(layer: LayerReport) -> bool:
    lam_max = getattr(layer, "lambda_max", math.nan)
    try:
        lam_max = float(lam_max)
    except (TypeError, ValueError):
        return False
    return lam_max == 0.0 or (not math.isfinite(lam_max) and getattr(layer, "rank_collapse_fraction", 0) == 1.0)
