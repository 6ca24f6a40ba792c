"""Publishing a complete snapshot: its records to the outputs, the alarm policy and its actions.

A snapshot is published once all its layers are analysed (and, with several ranks, once
every rank's part has arrived), in step order, on the training thread. The writer (rank
0) writes the records, runs :class:`~esdwatch.alarms.AlarmPolicy` and carries out each
fired alarm's action (:func:`~esdwatch.alarms.actions.run_action`); every rank keeps the
latest records and the model-level summary, so a framework's checkpoint or
early-stopping callback sees the same values on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from esdwatch.alarms.actions import run_actions
from esdwatch.alarms.policy import AlarmPolicy
from esdwatch.monitor.faults import Faults
from esdwatch.monitor.outputs import Outputs
from esdwatch.monitor.stopping import StopDecision
from esdwatch.schema import Alarm, LayerRecord, summarize

__all__ = ["Publisher"]


class Publisher:
    """Writes complete snapshots, fires their alarms and keeps the latest results."""

    def __init__(
        self,
        outputs: Outputs,
        policy: AlarmPolicy,
        stop: StopDecision,
        faults: Faults,
        *,
        writer: bool,
        context: Any,
        layers_now: Callable[[], Collection[str]] | None = None,
    ):
        self.outputs = outputs
        self.policy = policy
        self.stop = stop
        self.faults = faults
        self.writer = writer
        #: passed to callable alarm actions (the Trainer in a framework shell, else the Monitor)
        self.context = context
        #: the records of the latest published snapshot, by layer name
        self.latest: dict[str, LayerRecord] = {}
        self.latest_step: int | None = None
        self.latest_summary: dict[str, float] = {}
        self.summary_fresh = False
        #: alarms fired in this run segment
        self.alarms: list[Alarm] = []
        #: rotation (layers_per_snapshot): the model's layers now; each snapshot holds some of them
        self.layers_now = layers_now

    def publish(self, step: int, records: list[LayerRecord]) -> None:
        """One complete snapshot, in step order.

        Under rotation it holds some of the layers: :attr:`latest` keeps each current
        layer's latest record, the summary is over those, and the alarm policy keeps its
        counters of the layers not analysed this time.
        """
        latest = {r.name: r for r in records}
        if self.layers_now is not None:
            now = self.layers_now()
            latest = {**{n: r for n, r in self.latest.items() if n in now}, **latest}
        analysed = {r.name for r in records}
        kept = [n for n in latest if n not in analysed]
        if self.writer:
            self.outputs.write(records, step)
            try:
                fired = self.policy.update([r.report for r in records], step, kept=kept)
            except Exception as exc:
                fired = []
                self.faults.internal_error("evaluating the alarms", step, exc)
            self.alarms.extend(fired)
            for alarm in fired:
                self.outputs.alarm(alarm)
            self.outputs.end_snapshot(step)
            run_actions(
                fired,
                self.policy.action_for,
                context=self.context,
                request_stop=self.stop.request,
                on_failure=self.faults.fail,
            )
        self.latest = latest
        self.latest_step = step
        self.latest_summary = summarize([r.report for r in latest.values()])
        self.summary_fresh = True

    def pop_summary(self) -> dict[str, float] | None:
        """The latest summary, once per published snapshot (else None)."""
        if not self.summary_fresh:
            return None
        self.summary_fresh = False
        return dict(self.latest_summary)
