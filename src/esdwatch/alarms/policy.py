"""Alarm policy over time: patience, actions and phase transitions.

:func:`esdwatch.alarms.rules.evaluate_alarms` says which layers of *one* snapshot cross a
threshold. :class:`AlarmPolicy` adds what needs history:

* ``patience``: an alarm of kind K on layer L *fires* only when K has been raised for L
  on ``patience[K]`` consecutive analysed snapshots, so one noisy snapshot does not fire.
  It fires once per episode (when the count reaches patience) and re-arms when the
  condition clears. A layer that disappears (removed, renamed, frozen out by filters)
  loses its counters; a layer whose analysis failed keeps them unchanged.
* phase transitions (informational, kind ``phase_transition``): a layer's phase (from
  :mod:`esdwatch.engine.phases`, ``LayerReport.phase``) changes only when the new phase has
  been seen on ``patience["phase_transition"]`` consecutive snapshots; the first known
  phase of a layer sets its baseline silently. The history of confirmed transitions is
  kept (``history``).
* history rules (:mod:`esdwatch.alarms.history`): each layer's last few analyses are kept
  (compactly, :class:`~esdwatch.alarms.history.LayerHistory`) and the history rules among
  ``rules`` judge each layer's change since its analysis ``window`` analyses back (under a
  layer rotation too); their alarms, on the layers analysed in the snapshot, go through the
  same patience counters.
* ``actions`` per kind: ``"log"`` (a log line at the alarm's severity), ``"warn"`` (a
  Python warning plus the log line), ``"stop"`` (ask the trainer to stop, decided
  identically on every rank by the caller) or any callable ``(trainer, alarm) -> None``.
  Defaults: ``non_finite`` stops (patience 1); ``scale_collapse`` logs at patience 1
  (measured, see :mod:`esdwatch.alarms.history`); every other kind logs (patience 2).

The policy is pure bookkeeping (no I/O): :class:`esdwatch.monitor.monitor.Monitor` dispatches
the actions. Its :meth:`state_dict` round-trips through a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from esdwatch.alarms.advice import advise
from esdwatch.alarms.history import DEFAULT_HISTORY_RULES, HistoryRule, LayerHistory, Snapshot
from esdwatch.alarms.rules import (
    ALARM_KINDS,
    DEFAULT_RULES,
    NON_FINITE,
    PHASE_TRANSITION,
    Alarm,
    AlarmRule,
    evaluate_alarms,
)
from esdwatch.schema import SCALE_COLLAPSE, STATUS_FAILED, STATUS_OK, LayerRecord, LayerReport, phase_or_none

__all__ = [
    "Action",
    "AlarmPolicy",
    "AnyRule",
    "replay",
    "ACTIONS",
    "DEFAULT_ACTIONS",
    "DEFAULT_PATIENCE",
    "DEFAULT_PATIENCE_BY_KIND",
]

#: an action: one of :data:`ACTIONS` or a callable ``(trainer, alarm) -> None``
Action = str | Callable[[Any, Alarm], None]
#: a rule of either kind: on one snapshot (:class:`AlarmRule`) or on the recent history (:class:`HistoryRule`)
AnyRule = AlarmRule | HistoryRule
ACTIONS: tuple[str, ...] = ("log", "warn", "stop")

DEFAULT_PATIENCE = 2
DEFAULT_PATIENCE_BY_KIND: dict[str, int] = {NON_FINITE: 1, SCALE_COLLAPSE: 1}
DEFAULT_ACTIONS: dict[str, Action] = {NON_FINITE: "stop"}

#: confirmed transitions kept per layer in the history
HISTORY_LIMIT = 100


def _check_kind(kind: str, what: str) -> None:
    if kind not in ALARM_KINDS:
        raise ValueError(f"unknown alarm kind {kind!r} in {what}; known kinds: {', '.join(ALARM_KINDS)}")


def _check_action(kind: str, action: Any) -> Action:
    if isinstance(action, str):
        if action not in ACTIONS:
            raise ValueError(
                f"alarm action for {kind!r} must be one of {ACTIONS} or a callable (trainer, alarm) -> None, "
                f"got {action!r}"
            )
        return action
    if callable(action):
        return action
    raise ValueError(f"alarm action for {kind!r} must be one of {ACTIONS} or a callable, got {type(action).__name__}")


class AlarmPolicy:
    """Patience counters, actions and phase history (see module docstring).

    Parameters
    ----------
    rules:
        Threshold rules (:class:`AlarmRule`) and history rules (:class:`HistoryRule`);
        default :data:`~esdwatch.alarms.rules.DEFAULT_RULES` plus
        :data:`~esdwatch.alarms.history.DEFAULT_HISTORY_RULES`. Given rules replace both.
        Non-finite weights always raise ``non_finite``.
    patience:
        Consecutive snapshots before an alarm fires: one int for every kind, or a
        mapping kind -> int (unlisted kinds keep their default: 1 for ``non_finite`` and
        ``scale_collapse``, 2 otherwise).
    actions:
        Mapping kind -> action (unlisted kinds keep their default: ``"stop"`` for
        ``non_finite``, ``"log"`` otherwise).
    phase_transitions:
        Emit ``phase_transition`` info alarms.
    """

    def __init__(
        self,
        rules: Sequence[AnyRule] | None = None,
        patience: int | Mapping[str, int] | None = None,
        actions: Mapping[str, Action] | None = None,
        phase_transitions: bool = True,
    ):
        every = (*DEFAULT_RULES, *DEFAULT_HISTORY_RULES) if rules is None else tuple(rules)
        self.rules: tuple[AlarmRule, ...] = tuple(r for r in every if isinstance(r, AlarmRule))
        history: list[HistoryRule] = []
        for rule in every:
            if isinstance(rule, AlarmRule):
                continue
            if not isinstance(rule, HistoryRule):
                raise TypeError(f"an alarm rule must be an AlarmRule or a HistoryRule, got {rule!r}")
            history.append(rule)
        self.history_rules: tuple[HistoryRule, ...] = tuple(history)
        #: each layer's last analyses, as the history rules read them
        self.layer_history = LayerHistory(1 + max((r.window for r in history), default=1))
        self._patience: dict[str, int] = {k: DEFAULT_PATIENCE_BY_KIND.get(k, DEFAULT_PATIENCE) for k in ALARM_KINDS}
        if isinstance(patience, Mapping):
            for kind, p in patience.items():
                _check_kind(kind, "patience")
                self._patience[kind] = self._check_patience(p)
        elif patience is not None:
            p = self._check_patience(patience)
            self._patience = {k: p for k in ALARM_KINDS}
        self._actions: dict[str, Action] = {k: DEFAULT_ACTIONS.get(k, "log") for k in ALARM_KINDS}
        for kind, action in (actions or {}).items():
            _check_kind(kind, "actions")
            self._actions[kind] = _check_action(kind, action)
        self.phase_transitions = phase_transitions
        # (kind, layer) -> consecutive snapshots raised
        self.counters: dict[tuple[str, str], int] = {}
        # layer -> {"phase", "candidate", "count", "step"}
        self.phases: dict[str, dict[str, Any]] = {}
        # layer -> [[step, from, to], ...] confirmed transitions
        self.history: dict[str, list[list[Any]]] = {}
        self.fired_total = 0

    @staticmethod
    def _check_patience(p: Any) -> int:
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"patience must be an int >= 1, got {p!r}")
        return p

    def patience_for(self, kind: str) -> int:
        return self._patience.get(kind, DEFAULT_PATIENCE)

    def action_for(self, kind: str) -> Action:
        return self._actions.get(kind, "log")

    @property
    def stopping_kinds(self) -> list[str]:
        return [k for k, a in self._actions.items() if a == "stop"]

    # ----------------------------------------------------------------- update

    def update(self, reports: Iterable[LayerReport], step: int | None, *, kept: Iterable[str] = ()) -> list[Alarm]:
        """Feed one snapshot's reports (in step order); returns the alarms that fire now.

        ``kept``: layers still in the model but not analysed in this snapshot (a rotating
        subset): their counters and phases are kept as they are, like a failed layer's.
        """
        reports = list(reports)
        kept = set(kept)
        present = {r.name for r in reports} | kept
        raised = evaluate_alarms(reports, self.rules, step=step)
        if self.history_rules:
            raised += self._history_alarms(reports, step, present)
        by_key = {(a.kind, a.layer): a for a in raised}
        frozen = {r.name for r in reports if r.status == STATUS_FAILED} | kept
        fired: list[Alarm] = []
        for key, alarm in by_key.items():
            count = self.counters.get(key, 0) + 1
            self.counters[key] = count
            patience = self.patience_for(alarm.kind)
            if count == patience:
                extra = dict(alarm.extra)
                extra.update(consecutive=count, patience=patience)
                fired.append(advise(dataclasses.replace(alarm, extra=extra)))
        for key in list(self.counters):
            kind, layer = key
            if key in by_key or layer in frozen:
                continue
            del self.counters[key]  # cleared, or the layer is gone
        if self.phase_transitions:
            fired.extend(self._update_phases(reports, step))
        for layer in list(self.phases):
            if layer not in present:
                del self.phases[layer]
        self.fired_total += len(fired)
        return fired

    def _history_alarms(self, reports: Sequence[LayerReport], step: int | None, present: set[str]) -> list[Alarm]:
        """The history rules' alarms on the layers analysed now, each judged on its own analyses."""
        self.layer_history.keep_only(present)
        self.layer_history.add(reports, step)
        analysed = {r.name for r in reports if r.status == STATUS_OK}
        views: dict[int, list[Snapshot]] = {}
        out: list[Alarm] = []
        for rule in self.history_rules:
            if rule.window not in views:
                views[rule.window] = self.layer_history.view(rule.window, step)
            out += [a for a in rule.check_history(views[rule.window]) if a.layer in analysed]
        return out

    def _update_phases(self, reports: Sequence[LayerReport], step: int | None) -> list[Alarm]:
        out: list[Alarm] = []
        patience = self.patience_for(PHASE_TRANSITION)
        for r in reports:
            if r.status != STATUS_OK or phase_or_none(r.phase) is None:  # no phase: never a transition endpoint
                continue
            st = self.phases.get(r.name)
            if st is None:
                self.phases[r.name] = {"phase": r.phase, "candidate": None, "count": 0, "step": step}
                continue
            if r.phase == st["phase"]:
                st["candidate"], st["count"] = None, 0
                continue
            if r.phase == st["candidate"]:
                st["count"] += 1
            else:
                st["candidate"], st["count"] = r.phase, 1
            if st["count"] >= patience:
                old, new = st["phase"], r.phase
                st.update(phase=new, candidate=None, count=0, step=step)
                hist = self.history.setdefault(r.name, [])
                hist.append([step, old, new])
                del hist[:-HISTORY_LIMIT]
                conf = r.phase_confidence
                out.append(
                    advise(
                        Alarm(
                            kind=PHASE_TRANSITION,
                            layer=r.name,
                            value=float(conf) if conf is not None and math.isfinite(float(conf)) else float("nan"),
                            threshold=float("nan"),
                            severity="info",
                            message=f"{r.name}: phase {old} -> {new}",
                            step=step,
                            extra={"from": old, "to": new, "consecutive": patience, "patience": patience},
                        )
                    )
                )
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "counters": [[k, layer, n] for (k, layer), n in sorted(self.counters.items())],
            "phases": {k: dict(v) for k, v in self.phases.items()},
            "history": {k: [list(t) for t in v] for k, v in self.history.items()},
            "fired_total": self.fired_total,
            "layer_history": self.layer_history.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counters = {(k, layer): int(n) for k, layer, n in state.get("counters", [])}
        self.phases = {k: dict(v) for k, v in state.get("phases", {}).items()}
        self.history = {k: [list(t) for t in v] for k, v in state.get("history", {}).items()}
        self.fired_total = int(state.get("fired_total", 0))
        if "layer_history" in state:
            self.layer_history.load(state["layer_history"])
        else:  # a checkpoint from before the history was per layer: its recent snapshots
            self.layer_history.load_snapshots(Snapshot.from_dict(s) for s in state.get("snapshots", []))


def replay(records: Iterable[LayerRecord], policy: AlarmPolicy | None = None) -> list[Alarm]:
    """The alarms ``policy`` (default: a fresh default one) fires on recorded snapshots, in step order.

    ``records``: e.g. :func:`esdwatch.rundir.read_records` of a run directory; the records
    of one step form one snapshot, and a layer recorded earlier but not at a step was not
    analysed there (a layer rotation): its counters, phase and history are kept, as the live
    monitor keeps them, unless it has been missing for more snapshots than there are layers
    (a rotation takes every layer within that many; such a layer was removed). What a live
    monitor with the same policy would have fired.
    """
    policy = AlarmPolicy() if policy is None else policy
    by_step: dict[int, list[LayerReport]] = {}
    for rec in records:
        by_step.setdefault(int(rec.global_step), []).append(rec.report)
    fired: list[Alarm] = []
    last_seen: dict[str, int] = {}  # layer -> the snapshot it was last recorded in
    for k, step in enumerate(sorted(by_step)):
        reports = by_step[step]
        last_seen.update((r.name, k) for r in reports)
        # a layer recorded earlier but not now was not analysed (a rotation): kept, as live; a rotation
        # takes every layer within as many snapshots as there are layers, so one missing longer is gone
        kept = [n for n, seen in last_seen.items() if seen < k and k - seen <= len(last_seen)]
        fired.extend(policy.update(reports, step, kept=kept))
    return fired
