"""Alarms: which layers cross a threshold (rules), and what happens over time (policy).

* :mod:`esdwatch.alarms.rules`: stateless threshold rules evaluated on the reports of one
  analysis (:func:`evaluate_alarms`, :data:`DEFAULT_RULES`);
* :mod:`esdwatch.alarms.policy`: :class:`AlarmPolicy`, patience over consecutive
  snapshots, phase transitions and the action of each kind (log, warn, stop, a callable),
  with a ``state_dict`` for checkpoints;
* :mod:`esdwatch.alarms.history`: rules on a layer's recent history (scale collapse, alpha
  crossing 2, new traps, correlation flow), :data:`DEFAULT_HISTORY_RULES`;
* :func:`replay`: the alarms a policy would have fired on a recorded history
  (``records.jsonl``), to tune rules without training again;
* :mod:`esdwatch.alarms.advice`: one line of advice per alarm kind.

The :class:`~esdwatch.schema.Alarm` record and the alarm kinds are part of the schema.
This package imports only :mod:`esdwatch.schema` and :mod:`esdwatch.errors`.
"""

from __future__ import annotations

from esdwatch.alarms.advice import ADVICE, advise
from esdwatch.alarms.history import (
    DEFAULT_HISTORY_RULES,
    AlphaCrossingRule,
    CorrelationFlowRule,
    HistoryRule,
    LayerHistory,
    NewTrapsRule,
    ScaleJumpRule,
    Snapshot,
    evaluate_history,
)
from esdwatch.alarms.policy import ACTIONS, Action, AlarmPolicy, AnyRule, replay
from esdwatch.alarms.rules import DEFAULT_RULES, AlarmRule, evaluate_alarms
from esdwatch.schema import (
    ALARM_KINDS,
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

__all__ = [
    "ACTIONS",
    "ADVICE",
    "ALARM_KINDS",
    "ALPHA_CROSSING",
    "ALPHA_HIGH",
    "ALPHA_LOW",
    "CORRELATION_FLOW",
    "CORRELATION_TRAP",
    "DEFAULT_HISTORY_RULES",
    "DEFAULT_RULES",
    "NEW_TRAPS",
    "NON_FINITE",
    "PHASE_TRANSITION",
    "RANK_COLLAPSE",
    "SCALE_COLLAPSE",
    "Action",
    "Alarm",
    "AlarmPolicy",
    "AlarmRule",
    "AlphaCrossingRule",
    "AnyRule",
    "CorrelationFlowRule",
    "HistoryRule",
    "LayerHistory",
    "NewTrapsRule",
    "ScaleJumpRule",
    "Snapshot",
    "advise",
    "evaluate_alarms",
    "evaluate_history",
    "replay",
]
