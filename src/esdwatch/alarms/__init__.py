"""Alarms: which layers cross a threshold (rules), and what happens over time (policy).

* :mod:`esdwatch.alarms.rules`: stateless threshold rules evaluated on the reports of one
  analysis (:func:`evaluate_alarms`, :data:`DEFAULT_RULES`);
* :mod:`esdwatch.alarms.policy`: :class:`AlarmPolicy`, patience over consecutive
  snapshots, phase transitions and the action of each kind (log, warn, stop, a callable),
  with a ``state_dict`` for checkpoints.

The :class:`~esdwatch.schema.Alarm` record and the alarm kinds are part of the schema.
This package imports only :mod:`esdwatch.schema` and :mod:`esdwatch.errors`.
"""

from __future__ import annotations

from esdwatch.alarms.policy import ACTIONS, Action, AlarmPolicy
from esdwatch.alarms.rules import DEFAULT_RULES, AlarmRule, evaluate_alarms
from esdwatch.schema import (
    ALARM_KINDS,
    ALPHA_HIGH,
    ALPHA_LOW,
    CORRELATION_TRAP,
    NON_FINITE,
    PHASE_TRANSITION,
    RANK_COLLAPSE,
    Alarm,
)

__all__ = [
    "ACTIONS",
    "ALARM_KINDS",
    "ALPHA_HIGH",
    "ALPHA_LOW",
    "CORRELATION_TRAP",
    "DEFAULT_RULES",
    "NON_FINITE",
    "PHASE_TRANSITION",
    "RANK_COLLAPSE",
    "Action",
    "Alarm",
    "AlarmPolicy",
    "AlarmRule",
    "evaluate_alarms",
]
