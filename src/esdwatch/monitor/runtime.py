"""The background analysis of one monitor: its executor and the buffers its snapshots are copied into.

Created lazily (a monitor that never starts owns no thread, process or buffer) and closed
at the end of the run. The executor is a thread (default) or a process
(:mod:`esdwatch.monitor.worker`); the :class:`~esdwatch.monitor.snapshot.BufferPool` has
one slot per snapshot in flight, in memory the executor can read (shared memory for a
process, the GPU for ``device="cuda"``). What is in flight is bounded by bytes
(``max_pending_bytes``: :meth:`AnalysisRuntime.has_room`), and every wait for the worker by
``drain_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

from esdwatch.monitor.options import ExecutionOptions
from esdwatch.monitor.snapshot import BufferPool
from esdwatch.monitor.worker import AnalyzeFn, Executor, Job, Result, make_executor

log = logging.getLogger("esdwatch.monitor")

__all__ = ["AnalysisRuntime", "default_pending_budget"]

#: snapshots in flight at most when max_pending is None (the memory budget decides below that)
MAX_SLOTS = 1024
#: the default budget: this fraction of the memory available at start, at most DEFAULT_BUDGET_CAP bytes
DEFAULT_BUDGET_FRACTION = 0.25
DEFAULT_BUDGET_CAP = 4 * 2**30


def default_pending_budget(on_gpu: bool) -> int:
    """A quarter of the memory available now (the GPU's for an analysis on the GPU), at most 4 GiB."""
    available = 0
    try:
        if on_gpu:
            import torch

            available = int(torch.cuda.mem_get_info()[0])
        else:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError, AttributeError):  # no such sysconf / no CUDA: assume 4 GiB free
        available = 4 * 2**30
    return max(1, min(DEFAULT_BUDGET_CAP, int(DEFAULT_BUDGET_FRACTION * available)))


class AnalysisRuntime:
    """An executor and its buffer pool, with waits that always have a bound."""

    def __init__(
        self, execution: ExecutionOptions, analyze_fn: AnalyzeFn | None, stats: dict[str, float], *, on_gpu: bool
    ):
        self.execution = execution
        self.stats = stats
        self.analyze_fn = analyze_fn
        self.on_gpu = on_gpu
        self.executor: Executor | None = None
        self.pool: BufferPool | None = None
        #: bytes of copied weights allowed in flight (resolved when the worker starts)
        self.budget_bytes = 0
        #: seq -> (step, layer names, submission time, bytes) of every snapshot in flight
        self._in_flight: dict[int, tuple[int, list[str], float, int]] = {}
        #: the seq of an analysis that outlived a bounded wait: later waits for it return at once
        self._stuck: int | None = None

    def ensure(self) -> tuple[Executor, BufferPool]:
        """The running executor and its pool (started on first use)."""
        ex = self.executor
        if ex is None:
            ex = self.executor = make_executor(
                self.execution.worker,
                self.analyze_fn,
                nice=self.execution.worker_nice,
                threads=self.execution.worker_threads,
            )
        if self.pool is None:
            slots = self.execution.max_pending or MAX_SLOTS
            self.pool = BufferPool(slots, "device" if self.on_gpu else ex.buffer_target)
            self.budget_bytes = self.execution.max_pending_bytes or default_pending_budget(self.on_gpu)
        ex.start()
        return ex, self.pool

    @property
    def in_flight(self) -> int:
        return 0 if self.executor is None else self.executor.in_flight

    @property
    def ready(self) -> bool:
        """The worker can analyse now (a worker process has finished starting)."""
        return self.executor is None or self.executor.ready

    @property
    def starting(self) -> bool:
        return self.executor is not None and not self.executor.ready

    def submit(self, job: Job) -> None:
        """Hand a snapshot to the worker (what is in flight is remembered, to name it if it hangs)."""
        assert self.executor is not None
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in job.mats)
        self._in_flight[job.seq] = (job.step, [m.name for m in job.mats], time.monotonic(), nbytes)
        self.executor.submit(job)

    def release(self, res: Result) -> None:
        """A result is back: its buffers may be reused at once."""
        self._in_flight.pop(res.seq, None)
        if res.seq == self._stuck:
            log.warning(
                "esdwatch: the analysis of the snapshot at step %d returned after all; monitoring goes on", res.step
            )
            self._stuck = None
        if self.pool is not None and res.slot >= 0:
            self.pool.release(res.slot)

    def describe_in_flight(self) -> str:
        """The oldest snapshot still being analysed: its step, its layers, for how long."""
        if not self._in_flight:
            return "no snapshot is being analysed"
        seq = min(self._in_flight)
        step, names, t0, _ = self._in_flight[seq]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"the analysis of the snapshot at step {step} (layers {shown}) has run for {time.monotonic() - t0:.1f} s"

    @property
    def pending_bytes(self) -> int:
        """Bytes of copied weights in flight."""
        return sum(entry[3] for entry in self._in_flight.values())

    def has_room(self, nbytes: int) -> bool:
        """Whether a snapshot of ``nbytes`` fits now: nothing in flight, or a free slot and room in the budget."""
        if not self._in_flight:
            return True
        return self.pool is not None and self.pool.free_slots() > 0 and self.pending_bytes + nbytes <= self.budget_bytes

    def room_shortage(self, nbytes: int) -> str:
        """Why a snapshot of ``nbytes`` does not fit (for the skip's warning and record)."""
        mib, n = 2.0**20, len(self._in_flight)
        held = f"{n} snapshot(s) ({self.pending_bytes / mib:.1f} MiB) still being analysed"
        if self.pool is not None and self.pool.free_slots() == 0:
            cap = self.execution.max_pending
            return f"{held}, the most allowed in flight ({f'max_pending={cap}' if cap else f'{MAX_SLOTS} snapshots'})"
        return (
            f"{held}; the next needs {nbytes / mib:.1f} MiB and the budget is {self.budget_bytes / mib:.0f} MiB "
            f"(max_pending_bytes)"
        )

    def wait_for_room(self, nbytes: int, timeout: float | None, collect: Callable[[Result], None]) -> bool:
        """Wait (up to ``timeout`` s) until a snapshot of ``nbytes`` fits, handing results to ``collect``.

        When the wait runs out, the oldest analysis in flight is marked stuck and named in a
        warning; later waits give up at once while it is still running, so a hung analysis
        costs the training one bounded wait, not one per snapshot.
        """
        executor, _ = self.ensure()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.has_room(nbytes) and executor.in_flight > 0:
            oldest = min(self._in_flight) if self._in_flight else None
            left = None if deadline is None else deadline - time.monotonic()
            if oldest is not None and oldest == self._stuck or (left is not None and left <= 0):
                self._mark_stuck(timeout)
                return False
            for res in self.wait(1.0 if left is None else min(1.0, left)):
                collect(res)
        return self.has_room(nbytes)

    def _mark_stuck(self, timeout: float | None) -> None:
        oldest = min(self._in_flight) if self._in_flight else None
        if oldest is None or oldest == self._stuck:
            return
        self._stuck = oldest
        log.warning(
            "esdwatch: %s and did not finish within %s s (drain_timeout); training goes on without waiting "
            "for it, the records so far are kept",
            self.describe_in_flight(),
            timeout,
        )

    @property
    def stuck(self) -> bool:
        """An analysis outlived a bounded wait and is still running."""
        return self._stuck is not None and self._stuck in self._in_flight

    def poll(self) -> list[Result]:
        return [] if self.executor is None else self.executor.poll()

    def wait(self, timeout: float) -> list[Result]:
        """Results that arrive within ``timeout`` seconds (counted as time the training waited)."""
        with self._training_waits():
            return [] if self.executor is None else self.executor.wait(timeout)

    def drain(self, timeout: float | None) -> list[Result]:
        """Every in-flight result, waiting up to ``timeout`` seconds in all."""
        with self._training_waits():
            return [] if self.executor is None else self.executor.drain(timeout)

    @contextlib.contextmanager
    def _training_waits(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stats["block_s"] += time.perf_counter() - t0

    def close(self) -> None:
        if self.executor is not None:
            # a thread stuck in an analysis cannot be joined: do not wait for it (it is a daemon)
            self.executor.close(timeout=0.5 if self.stuck else 5.0)
            self.executor = None
        self._in_flight.clear()
        if self.pool is not None:
            self.pool.clear()
            self.pool = None
