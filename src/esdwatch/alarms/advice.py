"""One line per alarm kind on what a user could do about it (``Alarm.advice``).

Shown with the alarm in ``alarms.jsonl``, the dashboards (TensorBoard text, W&B alerts)
and the end-of-run summary. ``{layer}`` is replaced by the layer's name.
"""

from __future__ import annotations

import dataclasses

from esdwatch.schema import (
    ALPHA_CROSSING,
    ALPHA_HIGH,
    ALPHA_LOW,
    CORRELATION_FLOW,
    CORRELATION_TRAP,
    NEW_TRAPS,
    NON_FINITE,
    PHASE_TRANSITION,
    RANK_COLLAPSE,
    SCALE_COLLAPSE,
    Alarm,
)

__all__ = ["ADVICE", "advise"]

ADVICE: dict[str, str] = {
    RANK_COLLAPSE: "units of {layer} are dying: penalty, weight decay or learning rate too strong for it?",
    CORRELATION_TRAP: "a few large entries in {layer} (extra['entries']): informational unless they persist and grow",
    ALPHA_LOW: "{layer} is very heavy-tailed (alpha < 2): informational; watch validation for over-fitting",
    ALPHA_HIGH: "{layer} is random-like: expected early in training; if it persists, is {layer} learning at all?",
    NON_FINITE: "NaN/Inf in {layer}: lower the learning rate, clip gradients, check loss scaling",
    PHASE_TRANSITION: "informational: {layer} changed phase",
    SCALE_COLLAPSE: "{layer}'s scale moved against the other layers': learning rate, decay or an edit on {layer}?",
    ALPHA_CROSSING: "{layer} fell below alpha 2: over-fitting or learning rate too high? check validation now",
    NEW_TRAPS: "traps appeared in {layer}: learning rate too high for layer {layer}? lower it or clip gradients",
    CORRELATION_FLOW: "{layer}'s alpha broke from its neighbours': something acts on {layer} alone (LR, freeze, edit)?",
}


def advise(alarm: Alarm) -> Alarm:
    """``alarm`` with its kind's advice, unless it already has one (custom kinds have none)."""
    if alarm.advice or alarm.kind not in ADVICE:
        return alarm
    return dataclasses.replace(alarm, advice=ADVICE[alarm.kind].format(layer=alarm.layer))
