"""Background executors that analyse snapshots while training goes on.

Two executors share one interface (:class:`Executor`): ``submit(job)`` from the training
thread, then ``poll()`` / ``wait(timeout)`` from the same thread to collect
:class:`Result` objects. Capacity (how many snapshots may be in flight, ``max_pending_bytes``)
is enforced by the caller through the :class:`~esdwatch.monitor.snapshot.BufferPool` slots; the
executors themselves never block on ``submit``.

``"thread"`` (:class:`ThreadExecutor`)
    One daemon thread in the training process. The analysis is torch/numpy kernels that
    release the GIL (eigendecompositions, vectorized fits), so the training thread keeps
    running Python while it works. The thread caps its own OpenMP thread count
    (``omp_set_num_threads`` through ctypes, which is thread-local in libgomp;
    ``torch.set_num_threads`` would change the training thread's count too): a multi-threaded
    eigensolver spin-waits on an oversubscribed CPU (measurements:
    ``experiments/results/engine_design_notes.md``). It can lower its scheduling priority
    (``nice``: ``os.nice``, per thread on Linux), off by default: why, in
    :class:`~esdwatch.monitor.options.ExecutionOptions` and
    ``experiments/results/worker_defaults.md``.
    Snapshots are handed over as plain (or pinned) CPU buffers: no copy, no pickling.

``"process"`` (:class:`ProcessExecutor`)
    One ``torch.multiprocessing`` process started with ``spawn`` (fork is unsafe once
    OpenMP, CUDA or Lightning's threads exist). Weights travel through shared memory
    (``share_memory_`` buffers: only a file-descriptor handle is pickled); reports come
    back pickled (a few kB). The process lowers its priority and sets its torch thread
    count. Immune to the GIL whatever the analysis does, at the price of a start-up
    (importing torch again, overlapped with the first training steps) and of a
    synchronous copy for CUDA weights (pinned memory cannot be shared between processes).
    The child does not re-import the user's ``__main__`` unless ``analyze_fn`` lives there,
    so an unguarded training script is not executed twice.

Errors: ``analyze_fn`` (default :func:`esdwatch.engine.analyzer.analyze_layers`) never raises per
layer, but if a call raises anyway the job is retried layer by layer so that the failing
layer is named (``status="failed"``, the error in ``status_detail``) and every other
layer keeps its record. A worker process that dies is detected at the next poll; its
in-flight jobs come back as :class:`Result` objects with ``error`` set and the process is
restarted on the next submit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from esdwatch.engine.analyzer import AnalysisConfig, analyze_layers
from esdwatch.engine.layers import LayerMatrix
from esdwatch.engine.threads import limit_openmp_threads
from esdwatch.schema import STATUS_FAILED, LayerReport

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext, SpawnProcess
    from multiprocessing.queues import Queue as MPQueue

    from esdwatch.monitor.snapshot import Target

log = logging.getLogger(__name__)

__all__ = [
    "AnalyzeFn",
    "Job",
    "Result",
    "Executor",
    "ThreadExecutor",
    "ProcessExecutor",
    "make_executor",
    "run_analysis",
    "WORKER_KINDS",
]

AnalyzeFn = Callable[[Sequence[LayerMatrix], AnalysisConfig], Sequence[LayerReport]]
WORKER_KINDS: tuple[str, ...] = ("thread", "process")


@dataclass
class Job:
    """One snapshot to analyse. ``wall_time`` is when the snapshot was taken."""

    seq: int
    step: int
    epoch: int
    wall_time: float
    mats: list[LayerMatrix]
    config: AnalysisConfig
    slot: int = -1
    snapshot: Any = field(default=None, repr=False)  # esdwatch.monitor.snapshot.Snapshot (thread worker only)


@dataclass
class Result:
    """The analysis of one :class:`Job`, handed back to the training thread."""

    seq: int
    step: int
    epoch: int
    wall_time: float
    slot: int
    reports: list[LayerReport]
    names: list[str] = field(default_factory=list)  # the job's layer names, in order
    error: str | None = None  # a job-level failure (traceback); failing layers are named in reports
    tracebacks: dict[str, str] = field(default_factory=dict)  # per failed layer, when known
    wall_s: float = 0.0  # wall-clock seconds the worker spent on the job
    cpu_s: float = 0.0  # CPU seconds the worker thread/process spent on it
    worker: dict[str, Any] = field(default_factory=dict)  # pid, nice, threads of the worker

    @property
    def failed(self) -> list[LayerReport]:
        return [r for r in self.reports if r.status == STATUS_FAILED]


def _failed_report(mat: LayerMatrix, exc: BaseException) -> LayerReport:
    from esdwatch.engine.analyzer import layer_report

    return layer_report(mat, status=STATUS_FAILED, status_detail=f"{type(exc).__name__}: {exc}")


def run_analysis(
    mats: Sequence[LayerMatrix], config: AnalysisConfig, analyze_fn: AnalyzeFn | None = None
) -> tuple[list[LayerReport], str | None, dict[str, str]]:
    """``analyze_fn(mats, config)``, never raising: ``(reports, job_traceback, per_layer_tracebacks)``.

    If the batched call raises, each layer is analysed alone so that only the culprit
    is reported as failed.
    """
    fn = analyze_layers if analyze_fn is None else analyze_fn
    mats = list(mats)
    reports: list[LayerReport]
    try:
        reports = list(fn(mats, config))
        if len(reports) != len(mats):
            raise RuntimeError(f"analyze_fn returned {len(reports)} reports for {len(mats)} layers")
        return reports, None, {}
    except Exception:
        job_tb = traceback.format_exc()
    reports = []
    tbs: dict[str, str] = {}
    for mat in mats:
        try:
            one = list(fn([mat], config))
            if len(one) != 1:
                raise RuntimeError(f"analyze_fn returned {len(one)} reports for 1 layer")
            reports.append(one[0])
        except Exception as exc:
            reports.append(_failed_report(mat, exc))
            tbs[mat.name] = traceback.format_exc()
    return reports, job_tb, tbs


# ------------------------------------------------------------------ priority / threads


def lower_priority(nice: int, threads: int | None, *, whole_process: bool) -> dict[str, Any]:
    """Lower the calling worker's priority and thread count; returns what was applied.

    ``nice`` is added with ``os.nice`` (on Linux it applies to the calling thread only).
    ``threads`` caps the intra-op threads: the whole process's torch pool for a worker
    process; for a worker thread only its own OpenMP team (thread-local ICV).
    """
    info: dict[str, Any] = {"pid": os.getpid(), "tid": threading.get_native_id()}
    if nice:
        try:
            info["nice"] = os.nice(int(nice))
        except (OSError, AttributeError) as exc:  # not permitted / not POSIX
            info["nice_error"] = str(exc)
    else:
        try:
            info["nice"] = os.nice(0)
        except (OSError, AttributeError):
            pass
    if threads:
        if whole_process:
            torch.set_num_threads(int(threads))
            info["threads"] = torch.get_num_threads()
        else:
            if limit_openmp_threads(int(threads)):
                info["threads"] = torch.get_num_threads()  # as torch sees it, in this thread
    return info


def _execute(job: Job, analyze_fn: AnalyzeFn | None, info: dict[str, Any], cpu_clock: Callable[[], float]) -> Result:
    t0, c0 = time.perf_counter(), cpu_clock()
    names = [m.name for m in job.mats]
    snap = job.snapshot
    try:
        if snap is not None:
            snap.wait()
        if snap is not None and snap.stream is not None and job.config.device not in (None, "cpu"):
            with torch.cuda.stream(snap.stream):
                reports, job_tb, tbs = run_analysis(job.mats, job.config, analyze_fn)
        else:
            reports, job_tb, tbs = run_analysis(job.mats, job.config, analyze_fn)
    except BaseException as exc:  # e.g. a CUDA error while waiting on the event
        reports = [_failed_report(m, exc) for m in job.mats]
        job_tb, tbs = traceback.format_exc(), {}
    return Result(
        seq=job.seq,
        step=job.step,
        epoch=job.epoch,
        wall_time=job.wall_time,
        slot=job.slot,
        reports=reports,
        names=names,
        error=job_tb,
        tracebacks=tbs,
        wall_s=time.perf_counter() - t0,
        cpu_s=cpu_clock() - c0,
        worker=dict(info),
    )


# -------------------------------------------------------------------------- executors


class Executor:
    """Interface of the analysis executors (see module docstring)."""

    kind: str = ""
    #: where snapshot buffers must live for this executor (see esdwatch.monitor.snapshot)
    buffer_target: Target = "cpu"

    def __init__(self, analyze_fn: AnalyzeFn | None = None, *, nice: int = 0, threads: int | None = 1):
        self.analyze_fn = analyze_fn
        self.nice = nice
        self.threads = threads
        self.in_flight = 0
        self.worker_info: dict[str, Any] = {}

    @property
    def ready(self) -> bool:
        """Whether the worker can analyse now (a worker process has finished starting)."""
        return True

    def start(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def submit(self, job: Job) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def poll(self) -> list[Result]:  # pragma: no cover - interface
        raise NotImplementedError

    def wait(self, timeout: float | None) -> list[Result]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self, timeout: float | None = 5.0) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def drain(self, timeout: float | None) -> list[Result]:
        """Results of every in-flight job, waiting up to ``timeout`` seconds in all."""
        out = self.poll()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.in_flight > 0:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            got = self.wait(left)
            out.extend(got)
        return out


class ThreadExecutor(Executor):
    """Analysis in one background thread of the training process."""

    kind = "thread"
    buffer_target = "cpu"

    def __init__(
        self,
        analyze_fn: AnalyzeFn | None = None,
        *,
        nice: int = 0,
        threads: int | None = 1,
        name: str = "esdwatch-worker",
    ):
        super().__init__(analyze_fn, nice=nice, threads=threads)
        self.name = name
        self._in: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        info = lower_priority(self.nice, self.threads, whole_process=False)
        self.worker_info = info
        while True:
            job = self._in.get()
            if job is None:
                return
            result = _execute(job, self.analyze_fn, info, time.thread_time)
            job = None  # drop the buffers' references before handing back
            self._out.put(result)

    def submit(self, job: Job) -> None:
        self.start()
        self.in_flight += 1
        self._in.put(job)

    def _collected(self, results: list[Result]) -> list[Result]:
        self.in_flight -= len(results)
        return results

    def poll(self) -> list[Result]:
        out: list[Result] = []
        if self.in_flight <= 0 or self._out.empty():  # the common case, every training step: no exception raised
            return out
        while True:
            try:
                out.append(self._out.get_nowait())
            except queue.Empty:
                return self._collected(out)

    def wait(self, timeout: float | None) -> list[Result]:
        if self.in_flight <= 0:
            return []
        try:
            first = self._out.get(timeout=timeout)
        except queue.Empty:
            return []
        self.in_flight -= 1
        return [first] + self.poll()

    def close(self, timeout: float | None = 5.0) -> None:
        if self._thread is None:
            return
        self._in.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "esdwatch: the analysis thread did not stop within %.1f s (left running as a daemon)", timeout or 0
            )
        self._thread = None


@contextlib.contextmanager
def _without_main_import(enabled: bool):
    """During a spawn start, keep the child from re-importing the parent's ``__main__``.

    Our worker's target and jobs live in importable modules, so the user's script (which
    may lack an ``if __name__ == "__main__"`` guard) must not run again in the child.
    """
    if not enabled:
        yield
        return
    import multiprocessing.spawn as mp_spawn

    original = mp_spawn.get_preparation_data

    def prep(name: str) -> dict:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    mp_spawn.get_preparation_data = prep
    try:
        yield
    finally:
        mp_spawn.get_preparation_data = original


def _process_main(in_q: Any, out_q: Any, analyze_fn: AnalyzeFn | None, nice: int, threads: int | None) -> None:
    info = lower_priority(nice, threads, whole_process=True)
    out_q.put(("ready", info))
    while True:
        job = in_q.get()
        if job is None:
            break
        result = _execute(job, analyze_fn, info, time.process_time)
        job = None  # unmap the shared buffers before the parent may reuse them
        out_q.put(("result", result))


class ProcessExecutor(Executor):
    """Analysis in one spawned ``torch.multiprocessing`` process (weights via shared memory)."""

    kind = "process"
    buffer_target = "shared"

    def __init__(
        self,
        analyze_fn: AnalyzeFn | None = None,
        *,
        nice: int = 0,
        threads: int | None = 1,
        start_timeout: float = 120.0,
    ):
        super().__init__(analyze_fn, nice=nice, threads=threads)
        self.start_timeout = start_timeout
        self._ctx: SpawnContext | None = None
        self._proc: SpawnProcess | None = None
        self._in: MPQueue[Any] | None = None
        self._out: MPQueue[Any] | None = None
        self._pending: dict[int, Job] = {}  # seq -> job metadata (mats dropped), for lost jobs
        self.restarts = 0

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def ready(self) -> bool:
        return self._proc is not None and bool(self.worker_info)

    def start(self) -> None:
        if self.alive:
            return
        import torch.multiprocessing as tmp

        if self._proc is not None:
            self.restarts += 1
        self.worker_info = {}  # not ready until the new process says so
        self._ctx = tmp.get_context("spawn")
        self._in = self._ctx.Queue()
        self._out = self._ctx.Queue()
        self._proc = self._ctx.Process(
            target=_process_main,
            args=(self._in, self._out, self.analyze_fn, self.nice, self.threads),
            name="esdwatch-worker",
            daemon=True,
        )
        fn_module = getattr(self.analyze_fn, "__module__", None)
        with _without_main_import(fn_module != "__main__"):
            self._proc.start()

    def submit(self, job: Job) -> None:
        self.start()
        meta = dataclasses.replace(job, mats=[], snapshot=None)
        meta.names = [m.name for m in job.mats]  # type: ignore[attr-defined]  # extra attribute on the metadata copy only
        self._pending[job.seq] = meta
        self.in_flight += 1
        assert self._in is not None  # start() created it
        self._in.put(dataclasses.replace(job, snapshot=None))

    def _take(self, item: Any) -> list[Result]:
        tag, payload = item
        if tag == "ready":
            self.worker_info = payload
            return []
        self._pending.pop(payload.seq, None)
        self.in_flight -= 1
        return [payload]

    def _lost(self) -> list[Result]:
        """Error results for the jobs of a dead worker process."""
        code = None if self._proc is None else self._proc.exitcode
        out = []
        for seq, meta in sorted(self._pending.items()):
            out.append(
                Result(
                    seq=seq,
                    step=meta.step,
                    epoch=meta.epoch,
                    wall_time=meta.wall_time,
                    slot=meta.slot,
                    reports=[],
                    names=list(getattr(meta, "names", [])),
                    error=f"esdwatch worker process died (exit code {code}); this snapshot is lost",
                )
            )
        self.in_flight -= len(out)
        self._pending.clear()
        return out

    def poll(self) -> list[Result]:
        out: list[Result] = []
        if self._out is None or (self.in_flight <= 0 and self.ready and not self._pending):
            return out  # nothing can arrive: the common case between snapshots, no system call
        while True:
            try:
                if self._out.empty():  # a pipe poll; get_nowait would take a lock and raise
                    break
                out.extend(self._take(self._out.get_nowait()))
            except queue.Empty:
                break
            except (EOFError, OSError):
                break
        if self._pending and not self.alive:
            out.extend(self._lost())
        return out

    def wait(self, timeout: float | None) -> list[Result]:
        if self.in_flight <= 0 or self._out is None:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # short slices so that a dead process is noticed
            left = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
            try:
                got = self._take(self._out.get(timeout=left))
            except queue.Empty:
                got = []
            except (EOFError, OSError):
                got = []
            if got:
                return got + self.poll()
            if self._pending and not self.alive:
                return self._lost()
            if deadline is not None and time.monotonic() >= deadline:
                return []

    def close(self, timeout: float | None = 5.0) -> None:
        if self._proc is None:
            return
        try:
            if self._proc.is_alive():
                assert self._in is not None  # created with self._proc
                self._in.put(None)
                self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(1.0)
        finally:
            for q in (self._in, self._out):
                if q is None:  # not reached: created with self._proc
                    continue
                with contextlib.suppress(Exception):
                    q.close()
                    q.cancel_join_thread()
            self._proc = None


def make_executor(
    kind: str, analyze_fn: AnalyzeFn | None = None, *, nice: int = 0, threads: int | None = 1
) -> Executor:
    """A :class:`ThreadExecutor` (``"thread"``) or :class:`ProcessExecutor` (``"process"``)."""
    if kind == "thread":
        return ThreadExecutor(analyze_fn, nice=nice, threads=threads)
    if kind == "process":
        return ProcessExecutor(analyze_fn, nice=nice, threads=threads)
    raise ValueError(f"worker must be one of {WORKER_KINDS}, got {kind!r}")
