"""Turning scheduled steps into snapshots and finished analyses into published records, in step order.

The :class:`~esdwatch.monitor.Monitor` front asks its coordinator at each hook; two
coordinators answer behind one interface (:class:`Coordinator`):

* :class:`LocalCoordinator` (one process): a due step takes a snapshot at once (or skips
  it when every buffer slot is in flight and ``on_backpressure="skip"``); finished
  analyses are published as soon as every earlier one is.
* :class:`~esdwatch.monitor.exchange.DistributedCoordinator` (several ranks): the ranks
  decide together at *exchanges* (see :mod:`esdwatch.monitor.exchange`).

Backpressure: what is in flight (copied, not yet handed back) is bounded by bytes,
``max_pending_bytes`` (and by a count if ``max_pending`` is set; one snapshot always fits:
:meth:`~esdwatch.monitor.runtime.AnalysisRuntime.has_room`). A snapshot that does not fit
is skipped with ``"skip"``: counted (``stats["skipped"]``, :attr:`Coordinator.skipped_steps`),
listed with its reason in ``skipped_snapshots.jsonl`` and warned about once; ``"block"`` makes the
training thread wait for room, at most ``drain_timeout``. The final (``at_end``) snapshot
always waits.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from esdwatch.monitor.faults import Faults
from esdwatch.monitor.options import MonitorOptions
from esdwatch.monitor.outputs import Outputs
from esdwatch.monitor.publisher import Publisher
from esdwatch.monitor.rotation import RotationPick
from esdwatch.monitor.runtime import AnalysisRuntime
from esdwatch.monitor.schedule import OverheadBudget, Schedule, SnapshotCosts
from esdwatch.monitor.snapshotter import Outcome, Snapshotter, Taken
from esdwatch.monitor.stopping import StopDecision
from esdwatch.monitor.worker import Result
from esdwatch.rundir import run_dir
from esdwatch.schema import STATUS_FAILED, LayerRecord

log = logging.getLogger("esdwatch.monitor")

__all__ = ["Coordinator", "LocalCoordinator", "MonitorParts", "new_stats"]

#: skipped steps kept in :attr:`Coordinator.skipped_steps` (the count in stats is exact)
SKIPPED_KEEP = 1000


@dataclass
class MonitorParts:
    """The collaborators of one monitor, built by :class:`~esdwatch.monitor.Monitor` and shared by its coordinator."""

    options: MonitorOptions
    schedule: Schedule
    budget: OverheadBudget
    faults: Faults
    outputs: Outputs
    publisher: Publisher
    snapshotter: Snapshotter
    runtime: AnalysisRuntime
    stop: StopDecision
    stats: dict[str, float]
    #: the model to snapshot and the module holding its FSDP1 units (looked up at each snapshot)
    model_and_root: Callable[[], tuple[torch.nn.Module, torch.nn.Module | None]]
    writer: bool

    @classmethod
    def build(
        cls,
        options: MonitorOptions,
        *,
        rank: int,
        world_size: int,
        context: Any,
        model_and_root: Callable[[], tuple[torch.nn.Module, torch.nn.Module | None]],
    ) -> MonitorParts:
        """Every part of one monitor, wired together (rank 0 writes; ``context`` goes to alarm actions)."""
        opts, writer = options, rank == 0
        stats = new_stats()
        faults = Faults(opts.strict, stats)
        directory = None if opts.log_dir is None else run_dir(opts.log_dir, opts.name)
        outputs = Outputs(directory, opts.sinks or [], faults, writer=writer, keep_evals=opts.keep_evals)
        stop = StopDecision(distributed=world_size > 1)
        schedule = Schedule(opts.every_n_steps, opts.every_n_epochs, opts.max_overhead, opts.layers_per_snapshot)
        rotating = schedule.rotation.active
        return cls(
            options=opts,
            schedule=schedule,
            budget=OverheadBudget(opts.max_overhead),
            faults=faults,
            outputs=outputs,
            publisher=Publisher(
                outputs,
                opts.alarm_policy(),
                stop,
                faults,
                writer=writer,
                context=context,
                layers_now=(lambda: schedule.rotation.units) if rotating else None,
            ),
            snapshotter=Snapshotter(
                opts.find_layers_kwargs, opts.analysis_config, faults, rank=rank, world_size=world_size
            ),
            runtime=AnalysisRuntime(opts.execution, opts.analysis.analyze_fn, stats, on_gpu=opts.analysis.on_gpu),
            stop=stop,
            stats=stats,
            model_and_root=model_and_root,
            writer=writer,
        )

    def note_busy(self) -> None:
        """Tell the budget whether analysis work (or a worker's start-up) runs alongside the step that starts now."""
        runtime = self.runtime
        self.budget.note_busy(runtime.in_flight > 0 or runtime.starting, runtime.starting and runtime.in_flight == 0)


def new_stats() -> dict[str, float]:
    """The monitor's counters (``Monitor.stats``), all zero."""
    names = (
        "snapshots skipped analysed lost failed_layers empty_snapshots hook_s snapshot_s handle_s analysis_wall_s "
        "analysis_cpu_s block_s bytes_copied exchanges exchange_s layers_analysed"
    )
    return {name: (0.0 if name.endswith("_s") else 0) for name in names.split()}


class Coordinator(abc.ABC):
    """What both coordinators share: counters, skips, the bookkeeping of a finished analysis."""

    #: whether the coordinator reduces the stop decision itself (at its exchanges)
    reduces_stop = False

    def __init__(self, parts: MonitorParts):
        self.p = parts
        self.seq = 0  # the next snapshot's sequence number
        self.snapshots = 0  # snapshots taken in this run
        self.skipped_steps: list[int] = []
        self._copy_s: dict[int, float] = {}  # seq -> seconds the training thread spent taking it
        self._next_nbytes = 0  # what the next snapshot will copy here (as much as the last one did)
        #: (layer, error) -> how many snapshots it failed in
        self.layer_failures: dict[tuple[str, str], int] = {}

    # ---- the interface the Monitor front uses
    @abc.abstractmethod
    def on_step(self, step: int, epoch: int) -> None:
        """A new optimizer step (later than the last handled): snapshot it if it is due."""

    @abc.abstractmethod
    def on_epoch_end(self, step: int, epoch: int, due: bool) -> None:
        """The end of an epoch; ``due``: under ``every_n_epochs``, a snapshot is scheduled."""

    @abc.abstractmethod
    def take_now(self, step: int, epoch: int, reason: str, *, block: bool | None = None, stop: bool = True) -> bool:
        """Take a snapshot at ``step`` (``reason``: start, step, epoch, end, manual); False if skipped."""

    @abc.abstractmethod
    def collect(self, res: Result) -> None:
        """A finished analysis of this rank: free its buffers, publish what is complete, in order."""

    @abc.abstractmethod
    def finish(self, step: int, epoch: int, drain: Callable[[], bool], *, at_end: bool) -> None:
        """End of training: the ``at_end`` snapshot (unless that step has one), then drain and flush."""

    @abc.abstractmethod
    def before_checkpoint(self, drain: Callable[[], bool], running: bool) -> None:
        """A checkpoint is about to be saved: put every snapshot in flight on disk first."""

    def flush_partial(self) -> None:  # noqa: B027 - one process publishes as results arrive: nothing is held back
        """No more exchanges (an exception, an abort): publish what can be published."""

    def raise_pending(self) -> None:
        self.p.faults.raise_pending()

    def planning_costs(self) -> SnapshotCosts:
        """The measurements the ``"auto"`` interval is planned from."""
        return self.p.budget.costs()

    def load_counts(self, snapshots: int, skipped: int) -> None:
        self.snapshots = snapshots

    # ---- shared steps
    def _block(self, block: bool | None) -> bool:
        return (self.p.options.execution.on_backpressure == "block") if block is None else block

    def _rotation(self, step: int) -> RotationPick | None:
        """This snapshot's subset of the layers (``layers_per_snapshot``; None: all), the same on every rank."""
        return self.p.schedule.rotation_choice(step, self.planning_costs(), self._rotation_bytes())

    def _rotation_bytes(self) -> int | None:
        """What one rotating snapshot may copy under ``"auto"``: half the pending budget when it is given."""
        given = self.p.options.execution.max_pending_bytes
        return None if given is None else given // 2

    def _observe(self, names: list[str], cpu_s: float, wall_s: float) -> None:
        """Measured seconds of the layers analysed together (a rank's part), for the rotation's costs."""
        if self.p.schedule.rotation.active:
            self.p.schedule.rotation.observe(names, wall_s if self.p.options.analysis.on_gpu else cpu_s)

    def _refresh_interval(self) -> None:
        self.p.schedule.plan_interval(self.planning_costs(), log_changes=self.p.writer)

    def _count_skip(self, step: int, reason: str) -> None:
        self.p.schedule.skipped(step)
        self.p.stats["skipped"] += 1
        self.skipped_steps.append(step)
        del self.skipped_steps[:-SKIPPED_KEEP]
        self.p.outputs.skipped({"global_step": step, "segment": self.p.outputs.segment, "reason": reason})
        if self.p.runtime.stuck:
            self.p.faults.warn_once(
                "stuck",
                f"esdwatch: skipped the snapshot at step {step}: {self.p.runtime.describe_in_flight()}; every "
                f"snapshot is skipped (and counted in stats['skipped']) until it returns.",
            )
            return
        ex = self.p.options.execution
        nice = (
            f", or worker_nice=0 (worker_nice={ex.worker_nice} yields the CPU to training and other "
            f"processes, so a saturated CPU starves the worker)"
            if ex.worker_nice
            else ""
        )
        self.p.faults.warn_once(
            "backpressure",
            f"esdwatch: the analysis worker is behind; skipped the snapshot at step {step}: {reason}. Skipped "
            f"snapshots are counted in stats['skipped'] and listed with their reason in skipped_snapshots.jsonl; "
            f"snapshot less often (every_n_steps='auto' follows the worker's pace), raise max_pending_bytes, or use "
            f"on_backpressure='block'{nice}.",
        )

    def _took(self, step: int, seq: int, taken: Taken) -> None:
        """Bookkeeping of a snapshot taken (submitted here, or on another rank)."""
        self._copy_s[seq] = taken.copy_s
        self._next_nbytes = taken.nbytes
        if self.skipped_steps and self.skipped_steps[-1] == step:  # e.g. the at_end snapshot of a skipped last step
            self.skipped_steps.pop()
            self.p.stats["skipped"] -= 1
            self.p.outputs.skipped({"global_step": step, "segment": self.p.outputs.segment, "taken_after_all": True})
        self.p.schedule.taken(step)
        self.snapshots += 1
        stats = self.p.stats
        stats["snapshots"] += 1
        stats["bytes_copied"] += taken.nbytes
        stats["snapshot_s"] += taken.copy_s

    def _empty(self, step: int) -> None:
        self.p.stats["empty_snapshots"] += 1
        self.p.schedule.last_snapshot_step = step

    def _account(self, res: Result) -> None:
        """This rank's bookkeeping of a finished analysis: stats, failures, the measured cost."""
        stats = self.p.stats
        lost = bool(res.error) and not res.reports  # e.g. a worker process that died: nothing was analysed
        stats["lost" if lost else "analysed"] += 1
        stats["analysis_wall_s"] += res.wall_s
        stats["analysis_cpu_s"] += res.cpu_s
        stats["layers_analysed"] += len(res.reports)
        failures: list[str] = []
        for rep in res.reports:
            if rep.status == STATUS_FAILED:
                stats["failed_layers"] += 1
                failures.append(f"{rep.name}: {rep.status_detail}")
                key = (rep.name, rep.status_detail)
                self.layer_failures[key] = self.layer_failures.get(key, 0) + 1
                # a persistent failure is logged once per run; the end-of-run summary counts them
                level = logging.WARNING if self.layer_failures[key] == 1 else logging.DEBUG
                log.log(
                    level,
                    "esdwatch: analysis of layer %r at step %d failed: %s%s",
                    rep.name,
                    res.step,
                    rep.status_detail,
                    " (logged once; counted in the end-of-run summary)" if level > 10 else "",
                )
                if res.tracebacks.get(rep.name):
                    log.debug("esdwatch: traceback for layer %r:\n%s", rep.name, res.tracebacks[rep.name])
        if res.error and not res.reports:
            failures.append(res.error.strip().splitlines()[-1])
            log.error(
                "esdwatch: analysis of the snapshot at step %d failed (layers %s): %s",
                res.step,
                ", ".join(res.names) or "?",
                res.error.strip().splitlines()[-1],
            )
        self.p.budget.charge(res.cpu_s, self._copy_s.pop(res.seq, 0.0), res.wall_s)
        if failures:
            self.p.faults.fail(f"esdwatch: analysis failed at step {res.step} (strict=True): " + "; ".join(failures))

    def _records(self, step: int, epoch: int, wall_time: float, reports: list) -> list[LayerRecord]:
        return [LayerRecord(step, epoch, wall_time, rep, self.p.outputs.segment) for rep in reports]


class LocalCoordinator(Coordinator):
    """One process: snapshots at due steps, results published in submission order as they finish."""

    reduces_stop = False

    def __init__(self, parts: MonitorParts):
        super().__init__(parts)
        self._next = 0  # the next seq to publish
        self._reorder: dict[int, Result] = {}

    def on_step(self, step: int, epoch: int) -> None:
        sched = self.p.schedule
        if sched.auto and sched.interval is None:
            self._refresh_interval()
        # "auto": the first, measuring snapshot waits until nothing runs and a worker process has started
        first = self.snapshots == 0 and self.p.runtime.in_flight == 0 and self.p.runtime.ready
        if sched.step_due(step, first_auto_allowed=first):
            sched.last_due_step = step
            self.take_now(step, epoch, "step")

    def on_epoch_end(self, step: int, epoch: int, due: bool) -> None:
        if due:
            self.take_now(step, epoch, "epoch")

    def take_now(self, step: int, epoch: int, reason: str, *, block: bool | None = None, stop: bool = True) -> bool:
        """Take a snapshot at ``step`` unless one was taken there; False if skipped."""
        if self.p.schedule.last_snapshot_step == step:
            return False  # never two snapshots of one step
        model, root = self.p.model_and_root()
        runtime, need = self.p.runtime, self._next_nbytes
        _, pool = runtime.ensure()
        if not runtime.has_room(need) and self._block(block):
            runtime.wait_for_room(need, self.p.options.execution.drain_timeout, self.collect)
        if not runtime.has_room(need):
            self._count_skip(step, runtime.room_shortage(need))
            return False
        taken = self.p.snapshotter.take(model, root, step, epoch, self.seq, pool, runtime.submit, self._rotation(step))
        if taken.plan is not None:
            self.p.outputs.skipped_layers(step, taken.plan.skipped)
        if taken.outcome is Outcome.EMPTY:
            self._empty(step)
        if taken.outcome is not Outcome.SUBMITTED:
            return False
        self.seq += 1
        self._took(step, self.seq - 1, taken)
        return True

    def collect(self, res: Result) -> None:
        """Release the slot at once; publish strictly in submission order."""
        self.p.runtime.release(res)
        self._reorder[res.seq] = res
        while self._next in self._reorder:
            ready = self._reorder.pop(self._next)
            self._next += 1
            t0 = time.perf_counter()
            self._account(ready)
            self._observe([r.name for r in ready.reports], ready.cpu_s, ready.wall_s)
            self.p.publisher.publish(ready.step, self._records(ready.step, ready.epoch, ready.wall_time, ready.reports))
            self._refresh_interval()
            self.p.stats["handle_s"] += time.perf_counter() - t0

    def finish(self, step: int, epoch: int, drain: Callable[[], bool], *, at_end: bool) -> None:
        if self.p.schedule.end_due(at_end, step):
            self.take_now(step, epoch, "end", block=True)
        drain()

    def before_checkpoint(self, drain: Callable[[], bool], running: bool) -> None:
        if self.p.runtime.in_flight:
            drain()

    def _rotation_bytes(self) -> int | None:
        budget = self.p.runtime.budget_bytes  # one process: the budget in force, given or from the memory
        return budget // 2 if budget else super()._rotation_bytes()
