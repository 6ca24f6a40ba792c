"""The background analysis of one monitor: its executor and the buffers its snapshots are copied into.

Created lazily (a monitor that never starts owns no thread, process or buffer) and closed
at the end of the run. The executor is a thread (default) or a process
(:mod:`esdwatch.monitor.worker`); the :class:`~esdwatch.monitor.snapshot.BufferPool` has
one slot per snapshot that may be in flight (``max_pending``), in memory the executor
can read (shared memory for a process, the GPU for ``device="cuda"``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from esdwatch.monitor.options import ExecutionOptions
from esdwatch.monitor.snapshot import BufferPool
from esdwatch.monitor.worker import AnalyzeFn, Executor, Result, make_executor

__all__ = ["AnalysisRuntime"]


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
            self.pool = BufferPool(self.execution.max_pending, "device" if self.on_gpu else ex.buffer_target)
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

    @property
    def free_slots(self) -> int:
        return 0 if self.pool is None else self.pool.free_slots()

    def release(self, res: Result) -> None:
        """A result is back: its buffers may be reused at once."""
        if self.pool is not None and res.slot >= 0:
            self.pool.release(res.slot)

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
            self.executor.close(timeout=5.0)
            self.executor = None
        if self.pool is not None:
            self.pool.clear()
            self.pool = None
