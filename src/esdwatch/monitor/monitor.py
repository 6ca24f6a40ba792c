"""The framework-free monitor: a thin front over named parts.

:class:`Monitor` is everything a framework shell (``ESDMonitor``) does, without the
framework. In a plain loop::

    monitor = Monitor(model, every_n_steps=100, at_start=True, log_dir="runs/exp1")
    monitor.start()                       # the step-0 baseline (at_start)
    for step, batch in enumerate(loader, start=1):
        ...                               # forward, backward, optimizer.step()
        if monitor.step(step):            # after the optimizer step; True = an alarm asked to stop
            break
    monitor.close()                       # final snapshot (at_end), drain, flush

or ``with Monitor(...) as monitor:`` (closed on exit; an exception closes without the final
snapshot but still flushes everything analysed so far).

The training thread's work per call: :meth:`Monitor.step` hands back finished analyses
(a non-blocking poll) and, at a scheduled step, copies the watched weights. Everything
else runs in the background worker. The parts, each in its own module:

=====================  ==============================================================
part                   what it does
=====================  ==============================================================
``options``            every option, checked and documented once (:class:`MonitorOptions`)
``schedule``           whether a step is due; the ``"auto"`` overhead budget
``snapshotter``        discover, share out and copy the watched matrices
``runtime``            the background executor and its buffer pool
``coordinator``        snapshots at due steps, results published in step order (one process)
``exchange``           the same for several ranks, agreed at exchanges
``publisher``          records to the outputs, the alarm policy and its actions
``outputs``            the run directory's files and the sinks, failures isolated
``faults``             internal errors, warn-once, ``strict`` mode
``stopping``           the stop decision, the same on every rank
=====================  ==============================================================

State: :meth:`Monitor.state_dict` / :meth:`Monitor.load_state_dict` keep the schedule
position, the last snapshot, the ``"auto"`` measurements, the alarm counters and phase
history, and the output directory. A resumed run writes the next run segment; what the
interrupted run wrote after the checkpoint is superseded for every reader. By default
:meth:`Monitor.state_dict` first waits (up to ``drain_timeout``) for the snapshots in
flight, so a checkpoint never refers to a snapshot whose records are not on disk.
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from esdwatch.errors import EsdwatchError, EsdwatchWarning
from esdwatch.monitor.coordinator import Coordinator, LocalCoordinator, MonitorParts
from esdwatch.monitor.distributed import Comm, checked_comm
from esdwatch.monitor.exchange import DistributedCoordinator
from esdwatch.monitor.options import MonitorOptions, takes_monitor_options
from esdwatch.monitor.schedule import auto_interval
from esdwatch.reporting.summary import run_summary
from esdwatch.schema import Alarm

log = logging.getLogger("esdwatch.monitor")

__all__ = ["Monitor", "EsdwatchError", "EsdwatchWarning", "auto_interval"]

#: monitors with a running worker, closed at interpreter exit if the user did not
_LIVE: weakref.WeakSet[Monitor] = weakref.WeakSet()


@atexit.register
def _close_live_monitors() -> None:
    for mon in list(_LIVE):
        try:
            mon.abort(timeout=min(10.0, mon.drain_timeout or 0.0))
        except Exception:  # pragma: no cover - best effort at exit
            pass


class Monitor:
    """Watch the weight spectra of a model during training, in a plain loop or under a framework shell."""

    @takes_monitor_options(
        doc="""Watch the weight spectra of ``model`` during training (see the module docstring).

    ``model`` (an ``nn.Module``) may be given later with :meth:`attach`. The runtime keywords:
    ``rank`` and ``world_size`` place this process in a distributed run (every rank runs a
    Monitor; the layers are shared out: :mod:`esdwatch.monitor.exchange`); ``comm`` is the
    run's collectives (default: ``torch.distributed``'s default group); ``root_module`` is the
    module holding FSDP1 units when it is not ``model`` (or a callable returning it at each
    snapshot); ``context`` is passed to callable alarm actions (default: this Monitor)."""
    )
    def __init__(
        self,
        model: torch.nn.Module | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        comm: Comm | None = None,
        root_module: torch.nn.Module | Callable[[], Any] | None = None,
        context: Any = None,
        **options: Any,
    ):
        self.options = opts = MonitorOptions.from_kwargs(**options)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if int(world_size) < 1 or not (0 <= int(rank) < int(world_size)):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.model = model
        self.rank, self.world_size = int(rank), int(world_size)
        self.comm = comm
        self.root_module = root_module
        self.parts = parts = MonitorParts.build(
            opts,
            rank=self.rank,
            world_size=self.world_size,
            model_and_root=self._model_and_root,
            context=self if context is None else context,
        )
        self.stats, self.stop = parts.stats, parts.stop
        self.coordinator: Coordinator = (
            DistributedCoordinator(parts, self._get_comm, self.rank, self.world_size)
            if self.distributed
            else LocalCoordinator(parts)
        )
        self._started = False
        self._closed = False
        self._finished = False  # the end-of-run summary is printed once

    # ------------------------------------------------------------------ what it holds

    @property
    def is_writer(self) -> bool:
        """Whether this process writes records, alarms and summaries (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Several ranks (``world_size > 1``): layers are shared out and gathered."""
        return self.world_size > 1

    every_n_steps = property(lambda self: self.options.every_n_steps)
    every_n_epochs = property(lambda self: self.options.every_n_epochs)
    drain_timeout = property(lambda self: self.options.execution.drain_timeout)
    name = property(lambda self: self.options.name)
    config = property(lambda self: self.parts.snapshotter.config, doc="The engine's AnalysisConfig.")
    policy = property(lambda self: self.parts.publisher.policy, doc="The AlarmPolicy.")
    sinks = property(lambda self: self.parts.outputs.sinks, doc="The sinks (the JSON-lines files apart).")
    output_dir = property(lambda self: self.parts.outputs.directory, doc="<log_dir>/esdwatch[/<name>], or None.")
    records_path = property(lambda self: self.parts.outputs.records_path)
    segment = property(lambda self: self.parts.outputs.segment, doc="This run segment (0 fresh, +1 per resume).")
    interval = property(
        lambda self: self.parts.schedule.interval,
        doc="Steps between snapshots (the chosen one under 'auto'; None before it is known).",
    )
    snapshots = property(lambda self: self.coordinator.snapshots, doc="Snapshots taken in this run.")
    skipped_steps = property(lambda self: self.coordinator.skipped_steps, doc="Steps whose snapshot was skipped.")
    in_flight = property(lambda self: self.parts.runtime.in_flight, doc="Snapshots being analysed.")
    busy = property(lambda self: self.parts.budget.busy, doc="Analysis work runs alongside the current step.")
    latest = property(lambda self: self.parts.publisher.latest, doc="The latest snapshot's records, by layer.")
    latest_step = property(lambda self: self.parts.publisher.latest_step)
    latest_summary = property(
        lambda self: self.parts.publisher.latest_summary,
        doc="The latest snapshot's model-level averages (esdwatch.schema.summarize).",
    )
    alarms = property(lambda self: self.parts.publisher.alarms, doc="Alarms fired in this run segment.")
    stop_reasons = property(lambda self: self.stop.reasons, doc="The alarms that asked to stop.")
    owners = property(lambda self: self.parts.snapshotter.owners, doc="The latest snapshot's owner rank of each layer.")
    mode = property(
        lambda self: self.parts.snapshotter.mode, doc="How the weights were held: replicated, dtensor, fsdp1."
    )

    @property
    def should_stop(self) -> bool:
        """A ``"stop"`` alarm fired (with several ranks: the decision agreed at the last exchange)."""
        return self.stop.should_stop

    @property
    def stop_reducer(self) -> Callable[[bool], bool] | None:
        """Reduces the local stop decision over the ranks (set by a framework shell)."""
        return self.stop.reducer

    @stop_reducer.setter
    def stop_reducer(self, reducer: Callable[[bool], bool] | None) -> None:
        self.stop.reducer = reducer

    @property
    def summary_prefix(self) -> str:
        return f"esdwatch/{self.name}/summary" if self.name else "esdwatch/summary"

    def attach(self, model: torch.nn.Module) -> Monitor:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        return self

    def pop_summary(self) -> dict[str, float] | None:
        """The model-level averages of the latest snapshot, once per snapshot (else None)."""
        return self.parts.publisher.pop_summary()

    # ---------------------------------------------------------------------- stopping

    def stop_sync_due(self, global_step: int) -> bool:
        """Whether the caller reduces the stop decision after ``step`` (one process); several ranks: at exchanges."""
        return not self.coordinator.reduces_stop

    def sync_stop(self) -> bool:
        """The stop decision of all ranks (any rank's stop stops all); call on every rank."""
        return self.stop.sync(self._get_comm().any if self.distributed else None)

    def request_stop(self, alarm: Alarm | None = None) -> None:
        self.stop.request(alarm)

    def _get_comm(self) -> Comm:
        self.comm = checked_comm(self.comm, self.rank, self.world_size)
        return self.comm

    def _model_and_root(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        if self.model is None:
            raise RuntimeError("esdwatch.Monitor has no model: pass one to Monitor(model, ...) or call attach(model)")
        root = self.root_module
        if root is not None and not isinstance(root, torch.nn.Module) and callable(root):
            root = root()
        return self.model, root if isinstance(root, torch.nn.Module) else self.model

    # --------------------------------------------------------------------- lifecycle

    def start(self, global_step: int = 0, epoch: int = 0, *, continuing: bool | None = None) -> None:
        """Open the outputs, start the worker and take the ``at_start`` baseline (step 0).

        Called once; :meth:`step` calls it if you don't. Takes no snapshot when resuming.
        ``continuing`` (default: ``global_step > 0``) marks a run that goes on from step
        ``global_step`` without a loaded state (e.g. a second ``fit`` on the same model):
        it writes a new segment that keeps the records up to that step.
        """
        if self._started:
            return
        t0 = time.perf_counter()
        self._started, self._closed, self._finished = True, False, False
        outputs, schedule = self.parts.outputs, self.parts.schedule
        if outputs.resumed_from is None and (global_step > 0 if continuing is None else continuing) and global_step > 0:
            outputs.resumed_from = int(global_step)
        outputs.open()
        self.parts.runtime.ensure()
        _LIVE.add(self)
        schedule.last_epoch = epoch
        if outputs.resumed_from is None or outputs.resumed_from == global_step:
            schedule.last_step = global_step
        if schedule.start_due(self.options.at_start, global_step, resuming=outputs.resumed_from is not None):
            schedule.last_due_step = 0
            self.coordinator.take_now(0, epoch, "start", stop=False)
        self.parts.note_busy()
        self.stats["hook_s"] += time.perf_counter() - t0
        self.coordinator.raise_pending()

    def step(self, global_step: int, epoch: int | None = None) -> bool:
        """Call after each optimizer step with the number of steps taken; returns :attr:`should_stop`.

        Collects finished analyses and, when ``global_step`` is a scheduled step not
        handled yet, takes a snapshot. Calling it again with the same step (gradient
        accumulation) only collects.
        """
        schedule = self.parts.schedule
        if not self._started:
            # implicit start: a step-0 baseline only if this call *is* step 0, and the
            # previous step is taken to be global_step - 1 so this one can be due
            self.start(global_step, 0 if epoch is None else epoch, continuing=False)
            if self.parts.outputs.resumed_from is None and global_step > 0:
                schedule.last_step = global_step - 1
        t0 = time.perf_counter()
        try:
            if epoch is not None:
                schedule.last_epoch = epoch
            if global_step != schedule.last_step:
                self.parts.budget.time_step(global_step, t0)  # before poll: a result handled now sees its whole cost
            self.poll()
            if global_step != schedule.last_step:
                if global_step > schedule.last_step:
                    self.coordinator.on_step(global_step, schedule.last_epoch)
                schedule.last_step = global_step
        finally:
            self.parts.note_busy()
            self.stats["hook_s"] += time.perf_counter() - t0
        self.coordinator.raise_pending()
        return self.should_stop

    def epoch_end(self, epoch: int, global_step: int | None = None) -> bool:
        """Call at the end of each training epoch (0-based); snapshots under ``every_n_epochs``.

        With several ranks this is an exchange: call it on every rank.
        """
        if not self._started:
            self.start(0 if not global_step else global_step, epoch)
        schedule = self.parts.schedule
        t0 = time.perf_counter()
        try:
            step = schedule.last_step if global_step is None else global_step
            schedule.last_epoch = epoch
            self.poll()
            due = schedule.epoch_due(epoch)
            if due:
                schedule.last_due_step = step
            self.coordinator.on_epoch_end(step, epoch, due)
            schedule.last_step = max(schedule.last_step, step)
        finally:
            self.stats["hook_s"] += time.perf_counter() - t0
        self.coordinator.raise_pending()
        return self.should_stop

    def snapshot(self, global_step: int | None = None, epoch: int | None = None, *, block: bool | None = None) -> bool:
        """Take a snapshot now (outside the schedule); False if skipped or already taken at that step."""
        if not self._started:
            self.start(0 if not global_step else global_step, epoch or 0)
        schedule = self.parts.schedule
        step = schedule.last_step if global_step is None else global_step
        ok = self.coordinator.take_now(step, schedule.last_epoch if epoch is None else epoch, "manual", block=block)
        self.coordinator.raise_pending()
        return ok

    def poll(self) -> int:
        """Hand back every finished analysis (records, sinks, alarms); returns how many."""
        results = self.parts.runtime.poll()
        for res in results:
            self.coordinator.collect(res)
        return len(results)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout`` s, default ``drain_timeout``) for every pending analysis.

        Returns True when nothing is left in flight. With several ranks this waits for
        this rank's worker only: its parts reach rank 0 at the next exchange.
        """
        runtime = self.parts.runtime
        if runtime.executor is None:
            return True
        timeout = self.drain_timeout if timeout is None else timeout
        if runtime.stuck and timeout is not None:  # it outlived one bounded wait already: no second one
            timeout = min(timeout, 1.0)
        for res in runtime.drain(timeout):
            self.coordinator.collect(res)
        if runtime.in_flight:
            log.warning(
                "esdwatch: %d snapshot(s) still being analysed after waiting %.1f s (drain_timeout): %s; their "
                "records are lost, everything analysed before is written",
                runtime.in_flight,
                timeout or 0.0,
                runtime.describe_in_flight(),
            )
        return runtime.in_flight == 0

    def finish(self, global_step: int | None = None, epoch: int | None = None) -> None:
        """End of training: the ``at_end`` snapshot, then drain and flush (outputs stay open)."""
        if not self._started or self._closed:
            return
        schedule = self.parts.schedule
        step = schedule.last_step if global_step is None else global_step
        already = self._finished
        self._finished = True
        self.coordinator.finish(
            step,
            schedule.last_epoch if epoch is None else epoch,
            self.drain,
            at_end=self.options.at_end and self.model is not None,
        )
        if self.is_writer and self.options.verbose and not already:
            print_run_summary(self)
        self.coordinator.raise_pending()

    def close(self, final: bool = True) -> None:
        """Finish (``at_end`` snapshot when ``final``), drain, stop the worker, close every sink.

        Idempotent. Errors re-raised under ``strict`` are raised after everything is closed.
        With several ranks ``close()`` (``final=True``) is collective: call it on every
        rank; ``close(final=False)`` and :meth:`abort` never communicate (the writer then
        publishes what it has received, the other ranks' unsent parts are lost).
        """
        if self._closed:
            return
        error: BaseException | None = None
        try:
            if self._started:
                if final:
                    self.finish()
                else:
                    self.drain()
                    self.coordinator.flush_partial()
        except BaseException as exc:  # strict errors: close first, then raise
            error = exc
        finally:
            self._shutdown()
        if error is not None:
            raise error
        self.coordinator.raise_pending()

    def abort(self, timeout: float | None = None) -> None:
        """After an exception: keep what is analysed (waiting up to ``timeout``), no final snapshot."""
        if self._closed:
            return
        timeout = self.drain_timeout if timeout is None else timeout
        if self.parts.runtime.in_flight:
            log.warning(
                "esdwatch: training stopped; waiting up to %s s for %d snapshot(s) still being analysed, to keep "
                "their records",
                timeout,
                self.parts.runtime.in_flight,
            )
        try:
            for res in self.parts.runtime.drain(timeout):
                try:
                    self.coordinator.collect(res)
                except Exception:  # never mask the original exception
                    log.exception("esdwatch: error while flushing results after an exception")
            self.coordinator.flush_partial()
        finally:
            self.parts.faults.take_pending()
            self._shutdown()

    def _shutdown(self) -> None:
        self._closed, self._started = True, False
        _LIVE.discard(self)
        self.parts.runtime.close()
        self.parts.outputs.close()

    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------------- state

    def state_dict(self, *, drain: bool | None = None) -> dict[str, Any]:
        """Schedule position, "auto" measurements, alarm counters, phase history, segment, output directory
        and the latest model summary (so a watched ``summary/*`` key exists again from the resumed first epoch).

        With ``drain`` (default: the ``drain_on_checkpoint`` option) the snapshots in flight
        are first analysed and written, so the checkpoint never refers to records not on
        disk; with several ranks that drain is collective (call it on every rank), and
        ``drain=False`` never communicates.
        """
        if self.options.execution.drain_on_checkpoint if drain is None else drain:
            self.coordinator.before_checkpoint(self.drain, running=self._started and not self._closed)
        p = self.parts
        return {
            "version": 1,
            "segment": p.outputs.segment,
            **p.schedule.state_dict(),
            **p.budget.state_dict(),
            "snapshots": self.coordinator.snapshots,
            "skipped": int(self.stats["skipped"]),
            "policy": p.publisher.policy.state_dict(),
            "output_dir": None if p.outputs.directory is None else str(p.outputs.directory),
            "summary": dict(p.publisher.latest_summary),  # logged again from the resumed run's first epoch
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: the next snapshot is the next scheduled step after it."""
        if not state:
            return
        p = self.parts
        p.outputs.reopen_as_resumed()
        p.outputs.segment = int(state.get("segment", 0)) + 1
        p.schedule.load_state_dict(state)
        p.outputs.resumed_from = p.schedule.last_step
        if p.schedule.auto:
            p.budget.load_state_dict(state)
        self.coordinator.load_counts(int(state.get("snapshots", 0)), int(state.get("skipped", 0)))
        p.publisher.policy.load_state_dict(state.get("policy", {}))
        p.publisher.latest_summary = {str(k): float(v) for k, v in state.get("summary", {}).items()}
        p.outputs.previous_dir = state.get("output_dir")
        if self._started:
            p.outputs.open()


def print_run_summary(mon: Monitor) -> None:
    """Print the end-of-run summary (:func:`esdwatch.reporting.summary.run_summary`) of ``mon``."""
    p = mon.parts
    try:
        text = run_summary(
            list(p.publisher.latest.values()),
            p.publisher.alarms,
            snapshots=int(mon.stats["analysed"]),
            skipped=int(mon.stats["skipped"]),
            skipped_steps=mon.skipped_steps,
            skipped_layers=p.snapshotter.skipped_layers,
            records_path=p.outputs.records_path,
            failures=mon.coordinator.layer_failures,
        )
    except Exception:  # a summary is a convenience: never fail the end of training for it
        log.exception("esdwatch: could not print the end-of-run summary")
        return
    print(text, flush=True)
