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
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

from esdwatch.alarms.policy import Action
from esdwatch.errors import EsdwatchWarning
from esdwatch.schema import Alarm

log = logging.getLogger("esdwatch.alarms")

__all__ = ["run_action"]

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
