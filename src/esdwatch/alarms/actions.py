"""Running an alarm's action: ``"log"``, ``"warn"``, ``"stop"`` or a callable.

:class:`~esdwatch.alarms.policy.AlarmPolicy` decides *which* alarms fire and names the
action of each kind; :func:`run_action` carries it out:

* ``"log"``: one log line at the alarm's severity (info, warning, error);
* ``"warn"``: the log line (at least warning) and an :class:`~esdwatch.errors.EsdwatchWarning`;
* ``"stop"``: the log line and ``request_stop(alarm)`` (the caller reduces the decision
  over the ranks, so every rank stops at the same step);
* a callable ``(context, alarm) -> None`` (``context``: the Trainer in a framework shell,
  the Monitor in a plain loop): the log line, then the call; if it raises, the failure is
  logged and passed to ``on_failure`` (training goes on).

:func:`run_actions` does this for all the alarms of one snapshot, with one log line (and one
warning) per alarm kind, naming its layers, instead of one per layer: a random BERT-base
raises ``alpha_high`` on 72 matrices at once.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from esdwatch.alarms.policy import Action
from esdwatch.errors import EsdwatchWarning
from esdwatch.schema import Alarm

log = logging.getLogger("esdwatch.alarms")

__all__ = ["run_action", "run_actions"]

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def run_action(
    action: Action,
    alarm: Alarm,
    *,
    context: Any,
    request_stop: Callable[[Alarm], None],
    on_failure: Callable[[str], None] | None = None,
) -> None:
    """Carry out ``action`` for ``alarm`` (see the module docstring)."""
    level = _LEVELS.get(alarm.severity, logging.WARNING)
    text = f"esdwatch alarm [{alarm.kind}] at step {alarm.step}: {alarm.message}"
    if alarm.advice:
        text += f" -- {alarm.advice}"
    if action == "log":
        log.log(level, text)
    elif action == "warn":
        log.log(max(level, logging.WARNING), text)
        warnings.warn(text, EsdwatchWarning, stacklevel=2)
    elif action == "stop":
        log.log(max(level, logging.WARNING), text + " -> stopping training")
        request_stop(alarm)
    else:
        log.log(level, text)
        try:
            action(context, alarm)  # type: ignore[operator]  # the string actions were handled above
        except Exception as exc:
            log.exception("esdwatch: alarm action %r for %s failed", action, alarm.kind)
            if on_failure is not None:
                on_failure(f"esdwatch: alarm action for {alarm.kind} failed: {exc}")


#: layers named in one aggregated alarm line (the rest are counted)
SHOWN_PER_LINE = 8


def run_actions(
    alarms: Sequence[Alarm],
    action_for: Callable[[str], Action],
    *,
    context: Any,
    request_stop: Callable[[Alarm], None],
    on_failure: Callable[[str], None] | None = None,
) -> None:
    """Carry out the actions of one snapshot's ``alarms``: one line per kind for log, warn and stop actions."""
    groups: dict[tuple[str, str], list[Alarm]] = {}
    for alarm in alarms:
        action = action_for(alarm.kind)
        if isinstance(action, str):
            groups.setdefault((alarm.kind, action), []).append(alarm)
        else:  # a callable is called once per alarm
            run_action(action, alarm, context=context, request_stop=request_stop, on_failure=on_failure)
    for (kind, action), group in groups.items():
        if len(group) == 1:
            run_action(action, group[0], context=context, request_stop=request_stop, on_failure=on_failure)
            continue
        level = max(_LEVELS.get(a.severity, logging.WARNING) for a in group)
        shown = "; ".join(a.message for a in group[:SHOWN_PER_LINE])
        more = f"; and {len(group) - SHOWN_PER_LINE} more" if len(group) > SHOWN_PER_LINE else ""
        text = f"esdwatch alarm [{kind}] at step {group[0].step} on {len(group)} layers: {shown}{more}"
        if group[0].advice:
            text += f" -- {group[0].advice}"
        if action == "stop":
            for alarm in group:
                request_stop(alarm)
            text += " -> stopping training"
        if action in ("warn", "stop"):
            level = max(level, logging.WARNING)
        log.log(level, text)
        if action == "warn":
            warnings.warn(text, EsdwatchWarning, stacklevel=2)
