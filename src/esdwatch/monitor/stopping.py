"""The stop decision: a ``"stop"`` alarm on any rank stops every rank at the same step.

A ``"stop"`` action requests a stop on this rank (:meth:`StopDecision.request`); the
decision training acts on is reduced over the ranks by :meth:`StopDecision.sync` at a
point every rank reaches together (a framework's own reduction, e.g. Lightning's
``reduce_boolean_decision``, or the monitor's communicator). With one process the local
request is the decision.
"""

from __future__ import annotations

from collections.abc import Callable

from esdwatch.schema import Alarm

__all__ = ["StopDecision"]


class StopDecision:
    """This rank's stop request, the agreed decision, and the alarms that asked for it."""

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.requested = False
        self.agreed = False
        self.reasons: list[Alarm] = []
        #: reduces a local decision over the ranks (set by a framework shell)
        self.reducer: Callable[[bool], bool] | None = None

    def request(self, alarm: Alarm | None = None) -> None:
        self.requested = True
        if alarm is not None:
            self.reasons.append(alarm)

    def sync(self, any_rank: Callable[[bool], bool] | None) -> bool:
        """Reduce the request over the ranks (``reducer``, else ``any_rank``); call on every rank."""
        decision = self.requested
        if self.reducer is not None:
            decision = bool(self.reducer(decision))
        elif any_rank is not None:
            decision = bool(any_rank(decision))
        self.agreed = decision
        return decision

    @property
    def should_stop(self) -> bool:
        """Several ranks: only the agreed decision (the same on every rank at the same step)."""
        return self.agreed if self.distributed else (self.requested or self.agreed)
