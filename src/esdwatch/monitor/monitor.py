"""The framework-free monitor: schedule, snapshot, background analysis, records and alarms.

:class:`Monitor` is everything ESDMonitor does, without Lightning. In a plain loop::

    monitor = Monitor(model, every_n_steps=100, at_start=True, log_dir="runs/exp1")
    monitor.start()                       # the step-0 baseline (at_start)
    for step, batch in enumerate(loader, start=1):
        ...                               # forward, backward, optimizer.step()
        if monitor.step(step):            # after the optimizer step; True = an alarm asked to stop
            break
    monitor.close()                       # final snapshot (at_end), drain, flush

or ``with Monitor(...) as monitor:`` (closed on exit; an exception closes without the final
snapshot but still flushes everything analysed so far).

The training thread's work per call
-----------------------------------
``step()`` collects finished analyses (a non-blocking queue poll) and, at a scheduled
step, re-discovers the layers (:func:`esdwatch.engine.layers.find_layers`, so added, removed or
replaced layers appear and disappear cleanly) and copies their weights into reusable
buffers (:mod:`esdwatch.monitor.snapshot`). That is all: eigenvalues, fits, phases and traps run
in the worker (:mod:`esdwatch.monitor.worker`). Finished results are handed back to the training
thread and processed there in step order: records appended to ``records.jsonl``
(:class:`~esdwatch.sinks.jsonl.JsonlSink`), every sink's ``write``, the alarm policy
(:mod:`esdwatch.alarms.policy`) and its actions. A sink never runs on the worker.

Schedule
--------
Exactly one of ``every_n_steps`` (an int, or ``"auto"``) and ``every_n_epochs``; with
neither, ``"auto"``. ``every_n_steps=n`` snapshots the first step that reaches each
multiple of n (``global_step`` = optimizer steps taken, so gradient accumulation never
duplicates a step). ``at_start`` adds step 0 (the initialization baseline, fresh runs
only), ``at_end`` the final weights (skipped when the last step was already snapshotted).
``"auto"`` measures what each snapshot costs the training and spaces snapshots so that
this cost stays within ``max_overhead`` of the training time. The cost is measured, not
guessed: the step time while no analysis runs is tracked, and the time the steps lose
while an analysis runs (the measured slowdown, which on a busy machine can exceed the
worker's CPU seconds) is charged to that snapshot; a snapshot costs the larger of that
slowdown and the worker's CPU seconds plus the copy. Whatever is spent beyond the budget
so far (the first, measuring snapshot at step ``AUTO_FIRST_STEP``; a worker process's
start-up) is paid back by waiting longer, so the total converges to ``max_overhead``.
The interval is also kept longer than 1.25 x the worker's wall time per analysis, so it
never falls behind. The interval follows every measurement; its larger changes are
logged.

Default worker: ``"thread"``, ``worker_nice=0``
-----------------------------------------------
The analysis is torch and numpy kernels (batched ``eigvalsh``, the vectorized power-law
scan, the closed-form MP fit), which release the GIL for nearly all their time, and the
worker thread caps its own OpenMP team at ``worker_threads`` (default 1; thread-local:
the training thread keeps its count). It has no start-up cost, no second interpreter,
and hands snapshots over without any copy or pickling. The overhead benchmark
(``experiments/bench_overhead.py``; its results and the history of its runs in
``experiments/results/bench_overhead.md``) chose both defaults on CPU (2 cores shared
with other jobs, 1.49M-parameter MLP, 4 matrices, every_n_steps=50):

* the thread worker cost the training about its own work or less (monitored minus
  unmonitored time 0.11 to 1.31 x the analysis of the same snapshots alone, over seven
  runs at load 0.1 to 5.6) with the hooks at 0.8-1.7% of training time; the process
  worker had to import torch and esdwatch again (1.7-6 s, competing with the training
  for the same cores), cost 1.3 to 2.7 x its analysis under load and skipped a third
  of the snapshots even on a quiet machine;
* ``worker_nice=10`` costs the training less while a core is free, but on a loaded
  machine the niced thread is starved: it analysed 2 of 12 scheduled snapshots and
  skipped 10 in most runs (load 1.8 and above). ``worker_nice=0`` shares the cores
  fairly; a thread preempted while it holds the GIL would also stall the training
  thread, which a low priority makes likelier. Raise ``worker_nice`` when skipping
  snapshots is preferable to sharing the cores.

Under ``every_n_steps="auto"`` (the default schedule), ``max_overhead=0.05``, the worker's
CPU time was 3.5-5% of the training time; the slowdown was +0.036 measured within the run
and +0.037 against paired unmonitored runs when the training used both cores (torch's
default; ``--train-threads 2``), about 0 when a core was free. With the training on both
cores, the thread worker at ``every_n_steps=50`` kept the hooks at 1.9% of the training
time and cost 1.17 x its own analysis time. On a GPU machine (training on the GPU,
CPU cores mostly idle) the thread worker needs no start-up either; the benchmark's GPU
targets were not measurable in this task (no GPU). Choose ``worker="process"`` when the
analysis runs Python-heavy code (a custom ``analyze_fn``, the reference ``powerlaw``
package): the GIL then makes a thread cost the training loop far more than the work
itself.

Backpressure
------------
At most ``max_pending`` snapshots are in flight (copied, not yet handed back). When the
worker is behind, ``on_backpressure="skip"`` (default) skips the snapshot, counts it
(``stats["skipped"]``) and warns once; ``"block"`` makes the training thread wait for a
free slot. The final (``at_end``) snapshot always blocks.

Alarms
------
:class:`~esdwatch.alarms.policy.AlarmPolicy`: ``alarm_rules``, ``alarm_patience`` and
``alarm_actions`` (``"log"``, ``"warn"``, ``"stop"`` or a callable
``(context, alarm) -> None``; ``context`` is the Lightning ``Trainer`` under
ESDMonitor, this Monitor in a plain loop). ``"stop"`` sets :attr:`should_stop`; with
several processes the decision goes through :meth:`sync_stop` (every rank at the same
point), which the Lightning shell routes to ``trainer.strategy.reduce_boolean_decision``.

Faults
------
A layer whose analysis raises is recorded with ``status="failed"`` and logged with its
name and step; training continues. ``strict=True`` re-raises it (as
:class:`EsdwatchError`) on the training thread, after its records are written.
Non-finite weights are an alarm (``non_finite``, stop by default), their record is kept.
A model with no analyzable layer gets one :class:`EsdwatchWarning` and training continues.

Spectra
-------
``keep_evals=True`` hands each layer's eigenvalues to the sinks and also writes them, as
compact log10 histograms, to ``spectra.jsonl`` next to ``records.jsonl``
(:class:`~esdwatch.sinks.spectra.SpectraSink`, added by the writer when it opens its
outputs unless ``sinks`` already holds one), so ``esdwatch report`` draws each layer's
ESD without extra wiring: the eigenvalues are in hand anyway, and a few hundred bytes per
layer and snapshot keep the picture after the run (``records.jsonl`` holds scalars only).

State
-----
:meth:`state_dict` / :meth:`load_state_dict` keep the schedule position, the last
snapshot, the auto interval, the alarm counters and the phase history, and the output
directory. A resumed run writes the next run segment; what the interrupted run wrote
after the checkpoint is superseded for every reader (:func:`esdwatch.sinks.jsonl.read_records`).
By default :meth:`state_dict` first waits (up to ``drain_timeout``) for the snapshots in
flight, so a checkpoint never refers to a snapshot whose records are not on disk.

Distributed runs (``world_size > 1``; details in :mod:`esdwatch.monitor.distributed`)
------------------------------------------------------------------------------
Every rank runs a Monitor (``rank``, ``world_size``; ``torch.distributed`` initialized,
or a ``comm``). The layers are shared out by cost (``S * N * M**2``, largest first to the
least loaded rank, identical on every rank), each rank copies and analyses only its
share, and the parts meet at *exchanges*: one ``all_gather_object`` at points every rank
reaches together: the scheduled snapshot steps, every :meth:`epoch_end`, the end of
training (:meth:`close`/:meth:`finish`) and :meth:`state_dict` (Lightning saves
checkpoints on every rank). At an exchange every rank receives every finished part,
publishes (in step order) each snapshot whose parts are all in, and so holds the same
:attr:`latest_summary`; rank 0 alone writes ``records.jsonl``, ``alarms.jsonl``,
``distributed.jsonl`` (which rank analysed which layer) and the sinks, and runs the
alarm policy. A snapshot is taken only when every rank has a free slot (else skipped on
every rank); ``"auto"`` plans from the costs all ranks sent (the largest cost, the
smallest step time) and, before the first cost is known, exchanges every
``AUTO_FIRST_STEP`` steps, so the interval and the snapshot steps are the same on every
rank. Right after each exchange the stop decision is reduced over the ranks
(:meth:`sync_stop`; Lightning: ``reduce_boolean_decision``), so a ``"stop"`` alarm on a
layer analysed by any rank stops every rank at the same step; :attr:`should_stop` is
that agreed decision. Strict-mode errors travel with the exchange and are raised on
every rank. A snapshot's records reach ``records.jsonl`` at the first exchange after
its analysis (the next scheduled step, at the latest the end of training), so the
training thread never waits for another rank's analysis. Sharded weights: a DTensor
(FSDP2) matrix is gathered to its owner only; FSDP1 units are unsharded one at a time.
After an exception (:meth:`abort`) nothing is communicated: rank 0 writes what it has
received and its own finished parts.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, Union

import torch

from esdwatch.alarms.policy import Action, AlarmPolicy
from esdwatch.alarms.rules import Alarm, AlarmRule
from esdwatch.engine.analyzer import AnalysisConfig
from esdwatch.monitor.distributed import Comm, ShardPlan, default_comm, fsdp1_units, is_dtensor, plan_snapshot
from esdwatch.engine.layers import LayerMatrix, find_layers
from esdwatch.errors import EsdwatchError, EsdwatchWarning
from esdwatch.schema import STATUS_FAILED, LayerRecord, SkippedLayer, summarize
from esdwatch.sinks.jsonl import RECORDS_FILE, JsonlSink, copy_history, next_segment
from esdwatch.sinks.spectra import SpectraSink, copy_spectra
from esdwatch.monitor.snapshot import BufferPool
from esdwatch.monitor.worker import WORKER_KINDS, AnalyzeFn, Executor, Job, Result, make_executor

log = logging.getLogger("esdwatch.monitor.monitor")

__all__ = ["Monitor", "EsdwatchError", "EsdwatchWarning", "auto_interval"]

EveryNSteps = Union[int, Literal["auto"], None]
BACKPRESSURE = ("skip", "block")
#: first snapshot step of every_n_steps="auto" when there is no at_start baseline
AUTO_FIRST_STEP = 10
#: an auto interval is logged again only when it differs from the last one logged by more than this
AUTO_HYSTERESIS = 0.25
_EMA = 0.2
_SKIPPED_KEEP = 1000


#: monitors with a running worker, closed at interpreter exit if the user did not
_LIVE: "weakref.WeakSet[Monitor]" = weakref.WeakSet()


@atexit.register
def _close_live_monitors() -> None:
    for mon in list(_LIVE):
        try:
            mon.abort(timeout=min(10.0, mon.drain_timeout or 0.0))
        except Exception:  # pragma: no cover - best effort at exit
            pass


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    names = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32}
    key = str(value).replace("torch.", "")
    if key not in names:
        raise ValueError(f"dtype must be 'float64' or 'float32', got {value!r}")
    return names[key]


def auto_interval(cost_s: float, wall_s: float, step_s: float, max_overhead: float, keepup: float = 1.25,
                  debt_s: float = 0.0) -> int:
    """Steps between snapshots so that analysis stays within ``max_overhead`` of training.

    ``cost_s``: what one snapshot costs the training (see :class:`Monitor`, "auto":
    the larger of the worker's CPU seconds plus the snapshot copy, and the measured
    slowdown of the training steps while it ran); ``wall_s``: the worker's wall time per
    analysis; ``step_s``: training seconds per step (without analysis running);
    ``debt_s``: overhead spent so far beyond the budget (negative: under it). The
    interval is the larger of ``(cost_s + debt_s) / (max_overhead * step_s)`` (the
    budget, paying back any debt) and ``keepup * wall_s / step_s`` (the worker finishes
    before the next snapshot is due).
    """
    if not (step_s > 0) or not math.isfinite(step_s):
        raise ValueError(f"step_s must be a positive number, got {step_s}")
    debt = float(debt_s) if math.isfinite(float(debt_s)) else 0.0
    budget = max(0.0, cost_s + debt) / (max_overhead * step_s)
    catch_up = keepup * wall_s / step_s
    return max(1, int(math.ceil(max(budget, catch_up))))


class Monitor:
    """Watch the weight spectra of ``model`` during training (see module docstring).

    Parameters
    ----------
    model:
        The ``nn.Module`` to watch (may be given later with :meth:`attach`).
    every_n_steps, every_n_epochs, at_start, at_end, max_overhead:
        Schedule (module docstring). ``max_overhead`` is the budget of ``"auto"``.
    layers, exclude, types, min_evals, max_evals, conv_mode, conv2d_norm:
        Layer selection, as in :func:`esdwatch.analyze`.
    dtype, device, method, mp_fit, phases, traps, keep_evals, xmin, xmax, fix_fingers, seed:
        Analysis options (:class:`esdwatch.engine.analyzer.AnalysisConfig`); ``dtype`` is
        ``"float64"`` or ``"float32"``; ``device="cuda"`` analyses on the GPU (side stream,
        thread worker only); ``keep_evals`` hands each layer's eigenvalues to the sinks
        and writes ``spectra.jsonl`` (module docstring, "Spectra").
    worker, max_pending, on_backpressure, drain_timeout, worker_nice, worker_threads:
        The executor (module docstring). ``drain_timeout``: seconds to wait for pending
        analyses at the end, at a checkpoint and after an exception.
    drain_on_checkpoint:
        :meth:`state_dict` waits for in-flight snapshots first (default True).
    alarm_rules, alarm_patience, alarm_actions, phase_transitions:
        The alarm policy (:class:`esdwatch.alarms.policy.AlarmPolicy`).
    log_dir:
        Records go to ``<log_dir>/esdwatch/records.jsonl`` (``<log_dir>/esdwatch/<name>/``
        for a named monitor). ``None``: no file (results still reach the sinks and
        :attr:`latest`).
    name:
        Distinguishes two monitors on one model (sub-directory, summary keys).
    sinks:
        Objects with ``write(records, step)``, ``alarm(alarm)``, ``close()``
        (:class:`esdwatch.sinks.base.Sink`), called on this thread in step order. A
        :class:`~esdwatch.sinks.spectra.SpectraSink` given here replaces the one
        ``keep_evals`` adds.
    strict:
        Re-raise analysis and sink failures on the training thread.
    rank, world_size:
        This process's place in a distributed run (single process: 0, 1). With
        ``world_size > 1`` every rank runs a Monitor and the layers are shared out
        (module docstring, "Distributed runs").
    comm:
        The collectives of a distributed run (:class:`esdwatch.monitor.distributed.Comm`);
        default: ``torch.distributed``'s default group (initialized by then).
    root_module:
        The module that holds FSDP1 units when it is not ``model`` itself (Lightning:
        ``trainer.strategy.model``), or a callable returning it at each snapshot.
    analyze_fn:
        Replaces :func:`esdwatch.engine.analyzer.analyze_layers` (must be picklable for
        ``worker="process"``).
    context:
        Passed to callable alarm actions (default: this Monitor).
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        *,
        every_n_steps: EveryNSteps = None,
        every_n_epochs: int | None = None,
        at_start: bool = False,
        at_end: bool = True,
        max_overhead: float = 0.05,
        layers: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: Iterable[Any] | None = None,
        min_evals: int = 50,
        max_evals: int | None = 15000,
        conv_mode: str = "pooled",
        conv2d_norm: bool = True,
        dtype: str | torch.dtype = "float64",
        device: str | None = None,
        method: str = "auto",
        mp_fit: bool = True,
        phases: bool = True,
        traps: bool = True,
        keep_evals: bool = False,
        xmin: float | None = None,
        xmax: float | None = None,
        fix_fingers: bool = False,
        seed: int = 0,
        worker: str = "thread",
        max_pending: int = 1,
        on_backpressure: str = "skip",
        drain_timeout: float = 120.0,
        worker_nice: int = 0,
        worker_threads: int | None = 1,
        drain_on_checkpoint: bool = True,
        alarm_rules: Sequence[AlarmRule] | None = None,
        alarm_patience: int | Mapping[str, int] | None = None,
        alarm_actions: Mapping[str, Action] | None = None,
        phase_transitions: bool = True,
        log_dir: str | os.PathLike | None = None,
        name: str | None = None,
        sinks: Sequence[Any] | None = None,
        strict: bool = False,
        rank: int = 0,
        world_size: int = 1,
        comm: Comm | None = None,
        root_module: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
        analyze_fn: AnalyzeFn | None = None,
        context: Any = None,
    ):
        # ---- validation: every bad argument is a clear error now, not a crash mid-run
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError("give exactly one of every_n_steps and every_n_epochs, not both")
        if every_n_steps is None and every_n_epochs is None:
            every_n_steps = "auto"
        if every_n_steps is not None and every_n_steps != "auto":
            if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
                raise ValueError(f"every_n_steps must be a positive int or 'auto', got {every_n_steps!r}")
        if every_n_epochs is not None:
            if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
                raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        if not (0 < float(max_overhead) < 1):
            raise ValueError(f"max_overhead must be a fraction in (0, 1), got {max_overhead!r}")
        if worker not in WORKER_KINDS:
            raise ValueError(f"worker must be one of {WORKER_KINDS}, got {worker!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if on_backpressure not in BACKPRESSURE:
            raise ValueError(f"on_backpressure must be one of {BACKPRESSURE}, got {on_backpressure!r}")
        if drain_timeout is not None and drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds or None, got {drain_timeout!r}")
        if device is not None and str(device).startswith("cuda") and worker == "process":
            raise ValueError("device='cuda' analyses on the GPU from the training process: use worker='thread'")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if int(world_size) < 1 or not (0 <= int(rank) < int(world_size)):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

        self.model = model
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.at_start = bool(at_start)
        self.at_end = bool(at_end)
        self.max_overhead = float(max_overhead)
        self.layer_options = dict(
            include=layers, exclude=exclude, types=types, min_evals=min_evals, max_evals=max_evals,
            conv_mode=conv_mode, conv2d_norm=conv2d_norm,
        )
        self.config = AnalysisConfig(
            dtype=_dtype(dtype), device=None if device is None else str(device), method=method,  # type: ignore[arg-type]
            xmin=xmin, xmax=xmax, fix_fingers=fix_fingers, mp_fit=mp_fit, phases=phases, traps=traps,
            keep_evals=keep_evals, seed=seed,
        )
        self.worker = worker
        self.max_pending = max_pending
        self.on_backpressure = on_backpressure
        self.drain_timeout = drain_timeout
        self.worker_nice = worker_nice
        self.worker_threads = worker_threads
        self.drain_on_checkpoint = drain_on_checkpoint
        self.policy = AlarmPolicy(alarm_rules, alarm_patience, alarm_actions, phase_transitions)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.name = name
        self.sinks: list[Any] = list(sinks or [])
        self.strict = strict
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.comm = comm
        self.root_module = root_module
        self.analyze_fn = analyze_fn
        self.context = context
        #: reduces the local stop decision over ranks (set by the Lightning shell)
        self.stop_reducer: Callable[[bool], bool] | None = None

        # ---- runtime state (threads, files) is created lazily: see start()
        self._executor: Executor | None = None
        self._pool: BufferPool | None = None
        self._jsonl: JsonlSink | None = None
        self._started = False
        self._closed = False
        self._seq = 0
        self._next_seq = 0
        self._reorder: dict[int, Result] = {}
        self._snap_cost: dict[int, float] = {}
        self._broken_sinks: set[int] = set()
        self._warned: set[str] = set()
        self._pending_error: EsdwatchError | None = None

        # ---- persistent state (state_dict)
        self.segment = 0
        self._resumed_from: int | None = None
        self._prev_dir: str | None = None
        self._last_step = 0  # last global step handled by step()
        self._last_epoch = 0
        self._last_snapshot_step: int | None = None
        self._auto_base = 0  # under "auto": the step the interval counts from
        self._last_due_step: int | None = None
        self._interval: int | None = None if every_n_steps == "auto" else (every_n_steps if isinstance(every_n_steps, int) else None)
        self._cost_ema: float | None = None
        self._wall_ema: float | None = None
        self._step_s: float | None = None
        self._t_prev: tuple[int, float] | None = None
        # "auto" bookkeeping of what the analysis costs the training, measured (see _time_step)
        self._step_idle: float | None = None  # seconds per step while no analysis runs
        self._busy_prev = False  # an analysis (or a worker start-up) ran during the current step
        self._starting_prev = False  # ... and it was the worker process starting
        self._excess = 0.0  # training seconds lost while the current analysis ran
        self._spent = 0.0  # overhead spent so far (each snapshot's cost, the worker start-up)
        self._steps_timed = 0  # training steps timed (the budget accrues with them)
        self._outliers = 0  # consecutive steps > 10x the usual (epoch ends, validation, or a new regime)
        self._logged_interval: int | None = None
        self.snapshots = 0
        self.skipped_steps: list[int] = []
        self.stats: dict[str, float] = {
            "snapshots": 0, "skipped": 0, "analysed": 0, "failed_layers": 0, "empty_snapshots": 0,
            "hook_s": 0.0, "snapshot_s": 0.0, "handle_s": 0.0, "analysis_wall_s": 0.0, "analysis_cpu_s": 0.0,
            "block_s": 0.0, "bytes_copied": 0, "exchanges": 0, "exchange_s": 0.0, "layers_analysed": 0,
        }

        # ---- distributed runs (world_size > 1): see esdwatch.monitor.distributed
        self._local_parts: list[dict[str, Any]] = []  # this rank's finished parts, not yet exchanged
        self._parts: dict[int, dict[int, dict[str, Any]]] = {}  # seq -> rank -> part (every rank)
        self._snap_meta: dict[int, dict[str, Any]] = {}  # seq -> step, epoch, names, owners, ...
        self._owned_idx: dict[int, list[int]] = {}  # seq -> indices (into names) this rank analyses
        self._next_pub = 0  # next snapshot seq to publish
        self._attempts = 0  # snapshot decisions taken (identical on every rank)
        self._exchange_step: int | None = None
        self._peer_costs: list[Any] = []
        self._dist_error: EsdwatchError | None = None
        self.mode: str | None = None  # "replicated", "dtensor", "fsdp1" once a distributed snapshot ran
        #: the latest snapshot's owner rank of each layer (distributed runs)
        self.owners: dict[str, int] = {}

        self._stop_local = False
        self._stop_global = False
        self.stop_reasons: list[Alarm] = []
        #: the records of the latest handled snapshot, by layer name
        self.latest: dict[str, LayerRecord] = {}
        self.latest_step: int | None = None
        self.latest_summary: dict[str, float] = {}
        self._summary_fresh = False
        self.alarms: list[Alarm] = []  # alarms fired in this segment

    # ------------------------------------------------------------------ properties

    @property
    def is_writer(self) -> bool:
        """Whether this process writes records, alarms and summaries (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Several ranks (``world_size > 1``): layers are shared out and gathered (module docstring)."""
        return self.world_size > 1

    @property
    def interval(self) -> int | None:
        """Steps between snapshots (the chosen one under ``"auto"``; None before it is known)."""
        return self._interval

    @property
    def output_dir(self) -> Path | None:
        if self.log_dir is None:
            return None
        d = self.log_dir / "esdwatch"
        return d / self.name if self.name else d

    @property
    def records_path(self) -> Path | None:
        d = self.output_dir
        return None if d is None else d / RECORDS_FILE

    @property
    def should_stop(self) -> bool:
        """A ``"stop"`` alarm fired here (or, after :meth:`sync_stop`, on any rank).

        With several ranks: only the decision agreed by all ranks at the last exchange,
        so every rank sees the same value at the same step.
        """
        if self.distributed:
            return self._stop_global
        return self._stop_local or self._stop_global

    @property
    def busy(self) -> bool:
        """Whether analysis work (or a worker process's start-up) runs alongside the current training step."""
        return self._busy_prev

    @property
    def in_flight(self) -> int:
        return 0 if self._executor is None else self._executor.in_flight

    @property
    def summary_prefix(self) -> str:
        return f"esdwatch/{self.name}/summary" if self.name else "esdwatch/summary"

    def attach(self, model: torch.nn.Module) -> "Monitor":
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        return self

    # -------------------------------------------------------------- distributed seam

    def assign_layers(self, mats: list[LayerMatrix]) -> list[LayerMatrix]:
        """The matrices this rank analyses in a single-process run (default: all).

        Distributed runs share the layers out in :func:`esdwatch.monitor.distributed.plan_snapshot`
        (cost-balanced, identical on every rank) instead.
        """
        return mats

    def gather_records(self, step: int, records: list[LayerRecord]) -> list[LayerRecord] | None:
        """Single process: the records of one snapshot to publish (default: all of them).

        Distributed runs gather at the exchanges (:meth:`_sync_point`), never here.
        """
        return records if self.is_writer else None

    def stop_sync_due(self, global_step: int) -> bool:
        """Whether the caller should reduce the stop decision after ``step(global_step)``.

        One process: every step (the reduction is local). Several: never; the monitor
        reduces it itself at each exchange, on every rank (:attr:`should_stop` is the
        agreed decision).
        """
        return not self.distributed

    def sync_stop(self) -> bool:
        """The stop decision of all ranks (any rank's stop stops all); call on every rank."""
        decision = self._stop_local
        if self.stop_reducer is not None:
            decision = bool(self.stop_reducer(decision))
        elif self.distributed:
            decision = self._get_comm().any(decision)
        self._stop_global = decision
        return decision

    def _get_comm(self) -> Comm:
        if self.comm is None:
            self.comm = default_comm(self.world_size)
        if (self.comm.rank, self.comm.world_size) != (self.rank, self.world_size):
            raise RuntimeError(
                f"esdwatch: Monitor(rank={self.rank}, world_size={self.world_size}) does not match its "
                f"communicator (rank {self.comm.rank} of {self.comm.world_size})"
            )
        return self.comm

    def _root(self) -> torch.nn.Module | None:
        root = self.root_module
        if root is not None and not isinstance(root, torch.nn.Module) and callable(root):
            root = root()
        return root if isinstance(root, torch.nn.Module) else self.model

    def request_stop(self, alarm: Alarm | None = None) -> None:
        self._stop_local = True
        if alarm is not None:
            self.stop_reasons.append(alarm)

    # ------------------------------------------------------------------- lifecycle

    def _ensure_worker(self) -> None:
        if self._executor is None:
            self._executor = make_executor(self.worker, self.analyze_fn, nice=self.worker_nice, threads=self.worker_threads)
        if self._pool is None:
            target = self._executor.buffer_target
            if self.config.device is not None and str(self.config.device).startswith("cuda"):
                target = "device"
            self._pool = BufferPool(self.max_pending, target)  # type: ignore[arg-type]
        self._executor.start()
        _LIVE.add(self)

    def _open_outputs(self) -> None:
        if not self.is_writer or self.output_dir is None or (self._jsonl is not None and self._jsonl.is_open):
            return
        out = self.output_dir
        if self._resumed_from is not None and self._prev_dir and Path(self._prev_dir) != out:
            prev = Path(self._prev_dir)
            if (prev / RECORDS_FILE).exists() and not (out / RECORDS_FILE).exists():
                n = copy_history(prev, out, self._resumed_from)
                copy_spectra(prev, out, self._resumed_from)
                log.info("esdwatch: resumed into %s: copied %d records up to step %d from %s", out, n, self._resumed_from, prev)
        segment = next_segment(out)
        if self._resumed_from is not None:
            segment = max(segment, self.segment)
        self.segment = segment
        self._jsonl = JsonlSink(out, segment=segment, resumed_from_step=self._resumed_from).open()
        if self.config.keep_evals and not any(isinstance(s, SpectraSink) for s in self.sinks):
            # the eigenvalues are kept: keep their histograms for `esdwatch report` too (module docstring)
            self.sinks.append(SpectraSink(out))

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
        self._started = True
        self._closed = False
        if continuing is None:
            continuing = global_step > 0
        if self._resumed_from is None and continuing and global_step > 0:
            self._resumed_from = int(global_step)
        self._open_outputs()
        self._ensure_worker()
        self._last_epoch = epoch
        if self._resumed_from is None or self._resumed_from == global_step:
            self._last_step = global_step
        if self.at_start and global_step == 0 and self._resumed_from is None and self._last_snapshot_step is None:
            self._last_due_step = 0
            if self.distributed:
                self._sync_point(0, epoch, take=True, reason="start", stop=False)
            else:
                self._snapshot(0, epoch, reason="start")
        self._note_busy()
        self.stats["hook_s"] += time.perf_counter() - t0
        self._raise_pending()

    def step(self, global_step: int, epoch: int | None = None) -> bool:
        """Call after each optimizer step with the number of steps taken; returns :attr:`should_stop`.

        Collects finished analyses and, when ``global_step`` is a scheduled step not
        handled yet, takes a snapshot. Calling it again with the same step (gradient
        accumulation) only collects.
        """
        if not self._started:
            # implicit start: a step-0 baseline only if this call *is* step 0, and the
            # previous step is taken to be global_step - 1 so this one can be due
            self.start(global_step, 0 if epoch is None else epoch, continuing=False)
            if self._resumed_from is None and global_step > 0:
                self._last_step = global_step - 1
        t0 = time.perf_counter()
        try:
            if epoch is not None:
                self._last_epoch = epoch
            if global_step != self._last_step:
                self._time_step(global_step, t0)  # before poll: a result handled now sees its whole cost
            self.poll()
            if global_step != self._last_step:
                if global_step > self._last_step:
                    if self.distributed:
                        self._step_dist(global_step)
                    elif self._due(global_step):
                        self._last_due_step = global_step
                        self._snapshot(global_step, self._last_epoch, reason="step")
                self._last_step = global_step
        finally:
            self._note_busy()
            self.stats["hook_s"] += time.perf_counter() - t0
        self._raise_pending()
        return self.should_stop

    def _note_busy(self) -> None:
        """Whether analysis work runs alongside the training step that starts now."""
        ex = self._executor
        starting = ex is not None and not ex.ready
        self._busy_prev = ex is not None and (ex.in_flight > 0 or starting)
        self._starting_prev = starting and ex is not None and ex.in_flight == 0

    def _step_dist(self, step: int) -> None:
        due = self._due_dist(step)
        # "auto" before the first cost is known: exchange every AUTO_FIRST_STEP steps to learn it
        probe = (not due and self.every_n_steps == "auto" and self._interval is None and self._attempts > 0
                 and step % AUTO_FIRST_STEP == 0)
        if due:
            self._last_due_step = step
        if due or probe:
            self._sync_point(step, self._last_epoch, take=due, reason="step")

    def epoch_end(self, epoch: int, global_step: int | None = None) -> bool:
        """Call at the end of each training epoch (0-based); snapshots under ``every_n_epochs``.

        With several ranks this is an exchange: call it on every rank.
        """
        if not self._started:
            self.start(0 if not global_step else global_step, epoch)
        t0 = time.perf_counter()
        try:
            step = self._last_step if global_step is None else global_step
            self._last_epoch = epoch
            self.poll()
            due = self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0
            if due:
                self._last_due_step = step
            if self.distributed:
                self._sync_point(step, epoch, take=due, reason="epoch")
            elif due:
                self._snapshot(step, epoch, reason="epoch")
            self._last_step = max(self._last_step, step)
        finally:
            self.stats["hook_s"] += time.perf_counter() - t0
        self._raise_pending()
        return self.should_stop

    def snapshot(self, global_step: int | None = None, epoch: int | None = None, *, block: bool | None = None) -> bool:
        """Take a snapshot now (outside the schedule); False if skipped or already taken at that step."""
        if not self._started:
            self.start(0 if not global_step else global_step, epoch or 0)
        step = self._last_step if global_step is None else global_step
        epoch = self._last_epoch if epoch is None else epoch
        if self.distributed:
            before = self.snapshots
            self._sync_point(step, epoch, take=True, reason="manual", block=block)
            ok = self.snapshots > before
        else:
            ok = self._snapshot(step, epoch, reason="manual", block=block)
        self._raise_pending()
        return ok

    def poll(self) -> int:
        """Hand back every finished analysis (records, sinks, alarms); returns how many."""
        if self._executor is None:
            return 0
        results = self._executor.poll()
        for res in results:
            self._collect(res)
        return len(results)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout`` s, default ``drain_timeout``) for every pending analysis.

        Returns True when nothing is left in flight. With several ranks this waits for
        this rank's worker only (no communication): its parts reach rank 0 at the next
        exchange.
        """
        if self._executor is None:
            return True
        timeout = self.drain_timeout if timeout is None else timeout
        t0 = time.perf_counter()
        for res in self._executor.drain(timeout):
            self._collect(res)
        self.stats["block_s"] += time.perf_counter() - t0
        left = self._executor.in_flight
        if left:
            log.warning(
                "esdwatch: %d snapshot(s) still being analysed after %.1f s (drain_timeout); their records are lost",
                left, timeout or 0.0,
            )
        return left == 0

    def finish(self, global_step: int | None = None, epoch: int | None = None) -> None:
        """End of training: the ``at_end`` snapshot, then drain and flush (outputs stay open)."""
        if not self._started or self._closed:
            return
        step = self._last_step if global_step is None else global_step
        epoch = self._last_epoch if epoch is None else epoch
        if self.distributed:
            # every rank: the final snapshot, then each drains its own worker, then the last exchanges
            if self.at_end and self.model is not None and self._last_snapshot_step != step:
                self._sync_point(step, epoch, take=True, reason="end", block=True, stop=False)
            self.drain()
            self._sync_point(step, epoch, take=False, reason="end", stop=False)
            if self.strict:  # errors raised while rank 0 published the last parts reach every rank
                self._sync_point(step, epoch, take=False, reason="end", stop=False)
            self._raise_pending()
            return
        if self.at_end and self.model is not None and self._last_snapshot_step != step:
            self._snapshot(step, epoch, reason="end", block=True)
        self.drain()
        self._raise_pending()

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
                    if self.distributed:
                        self._flush_partial()
        except BaseException as exc:  # strict errors: close first, then raise
            error = exc
        finally:
            self._shutdown()
        if error is not None:
            raise error
        self._raise_pending()

    def abort(self, timeout: float | None = None) -> None:
        """After an exception: keep what is analysed (waiting up to ``timeout``), no final snapshot."""
        if self._closed:
            return
        try:
            if self._executor is not None:
                for res in self._executor.drain(self.drain_timeout if timeout is None else timeout):
                    try:
                        self._collect(res)
                    except Exception:  # never mask the original exception
                        log.exception("esdwatch: error while flushing results after an exception")
            if self.distributed:
                self._flush_partial()
        finally:
            self._pending_error = None
            self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        self._started = False
        _LIVE.discard(self)
        if self._executor is not None:
            self._executor.close(timeout=5.0)
            self._executor = None
        if self._pool is not None:
            self._pool.clear()
            self._pool = None
        for sink in ([self._jsonl] if self._jsonl is not None else []) + self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("esdwatch: closing sink %s failed: %s", type(sink).__name__, exc)
        self._jsonl = None

    def __enter__(self) -> "Monitor":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -------------------------------------------------------------------- schedule

    def _time_step(self, global_step: int, now: float) -> None:
        """Time the training step(s) since the previous call; split idle and busy steps.

        Steps with no analysis running give the idle step time; during an analysis (or a
        worker process's start-up) the time beyond it is what the analysis cost the
        training: the "auto" schedule budgets that, measured, not the worker's CPU time
        alone (on a busy machine the slowdown can be twice the worker's CPU seconds).
        """
        prev = self._t_prev
        self._t_prev = (global_step, now)
        if prev is None or global_step <= prev[0]:
            return
        n = global_step - prev[0]
        dt = (now - prev[1]) / n
        if self._step_s is None:
            self._step_s = dt
        elif dt < 10 * self._step_s:  # an epoch boundary / validation / checkpoint is not a step
            self._step_s += _EMA * (dt - self._step_s)
            self._outliers = 0
        else:
            self._outliers += 1
            if self._outliers < 5:
                return
            self._step_s = dt  # five long steps in a row: the step time itself has changed
            self._step_idle = None
            self._outliers = 0
        self._steps_timed += n
        if not self._busy_prev:
            self._step_idle = dt if self._step_idle is None else self._step_idle + _EMA * (dt - self._step_idle)
        elif self._step_idle is not None:
            excess = (dt - self._step_idle) * n
            if self._starting_prev:
                self._spent += max(0.0, excess)  # the worker process's start-up: paid from the budget
            else:
                self._excess += excess

    def _due(self, step: int) -> bool:
        if self.every_n_epochs is not None:
            return False
        if self.every_n_steps == "auto":
            if self._interval is None:
                self._refresh_interval()
            if self._interval is None:
                # first measurement: one snapshot, then wait for its cost; a worker process
                # first finishes starting (its start-up is not the snapshot's cost)
                ready = self._executor is None or self._executor.ready
                return self.snapshots == 0 and self.in_flight == 0 and step >= AUTO_FIRST_STEP and ready
            return step >= self._auto_base + self._interval
        n = int(self.every_n_steps)  # type: ignore[arg-type]
        return step > 0 and step // n > self._last_step // n

    def _local_costs(self) -> tuple[float | None, float | None, float | None, float]:
        """(cost per snapshot, worker wall time, idle seconds per step, debt) measured here."""
        step_s = self._step_idle if self._step_idle is not None else self._step_s
        debt = 0.0
        if step_s is not None:
            debt = self._spent - self.max_overhead * self._steps_timed * step_s
        return self._cost_ema, self._wall_ema, step_s, debt

    def _interval_inputs(self) -> tuple[float | None, float | None, float | None, float]:
        """(cost per snapshot, worker wall time, seconds per step, debt) that "auto" plans with.

        Several ranks: from the values every rank sent at the last exchange (identical on
        every rank): the largest cost, wall time and debt (the slowest rank sets the
        pace), the smallest step time.
        """
        if not self.distributed:
            return self._local_costs()
        costs = [c for c in self._peer_costs if c and c[0] is not None]
        steps = [c[2] for c in self._peer_costs if c and c[2]]
        if not costs or not steps:
            return None, None, None, 0.0
        return (max(c[0] for c in costs), max((c[1] or 0.0) for c in costs), min(steps),
                max(float(c[3] or 0.0) for c in costs))

    def _refresh_interval(self) -> None:
        cost, wall, step_s, debt = self._interval_inputs()
        if self.every_n_steps != "auto" or cost is None or step_s is None or step_s <= 0:
            return
        new = auto_interval(cost, wall or 0.0, step_s, self.max_overhead, debt_s=debt)
        self._interval = new
        old = self._logged_interval
        if not self.is_writer or (old is not None and abs(new - old) <= AUTO_HYSTERESIS * old):
            return  # the interval follows every measurement; the log only its larger changes
        self._logged_interval = new
        log.info(
            "esdwatch: every_n_steps='auto' -> %d steps (analysis costs %.3g s per snapshot, %.3g s wall; "
            "training %.3g s per step; budget %.0f%%, %+.3g s spent beyond it so far)",
            new, cost, wall or 0.0, step_s, 100 * self.max_overhead, debt,
        )

    # -------------------------------------------------------------------- snapshot

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(message)
        warnings.warn(message, EsdwatchWarning, stacklevel=3)

    def _discover(self) -> tuple[list[LayerMatrix], list[SkippedLayer]]:
        with torch.no_grad():
            return find_layers(self.model, **self.layer_options)

    def _snapshot(self, step: int, epoch: int, *, reason: str, block: bool | None = None) -> bool:
        if self.model is None:
            raise RuntimeError("esdwatch.Monitor has no model: pass one to Monitor(model, ...) or call attach(model)")
        if self._last_snapshot_step == step:
            return False  # never two snapshots of one step
        t0 = time.perf_counter()
        self._ensure_worker()
        private: list[bool] | None = None
        try:
            if fsdp1_units(self._root()):  # FSDP1 on one rank: discover inside each unit's summon
                plan = plan_snapshot(self.model, self.layer_options, 0, 1, root=self._root())
                mats, skipped, private = [m for _, m in plan.owned], plan.skipped, plan.private
            else:
                mats, skipped = self._discover()
                if any(is_dtensor(m.weight) for m in mats):  # DTensor weights on a one-rank mesh
                    private = [is_dtensor(m.weight) for m in mats]
                    mats = [dataclasses.replace(m, weight=m.weight.full_tensor()) if p else m
                            for m, p in zip(mats, private)]
        except Exception as exc:  # a model find_layers cannot walk: skip, never break training
            self._internal_error("discovering the layers", step, exc)
            return False
        if not mats:
            self.stats["empty_snapshots"] += 1
            self._last_snapshot_step = step
            why = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
            self._warn_once(
                "no_layers",
                f"esdwatch: no analyzable layer in the model at step {step} "
                f"({len(skipped)} candidate(s) skipped{': ' + why if why else ''}); nothing is recorded until one "
                f"appears. Adjust layers/exclude/types or min_evals={self.layer_options['min_evals']}.",
            )
            return False
        if "layers_logged" not in self._warned:
            self._warned.add("layers_logged")
            log.info("esdwatch: watching %d matrices (%d skipped%s)", len(mats), len(skipped),
                     ": " + "; ".join(f"{s.name}: {s.reason}" for s in skipped[:10]) if skipped else "")
        if private is None:
            mats = self.assign_layers(mats)
        assert self._pool is not None and self._executor is not None
        slot = self._pool.acquire()
        block = (self.on_backpressure == "block") if block is None else block
        if slot is None and block:
            tb = time.perf_counter()
            while slot is None:
                got = self._executor.wait(1.0)
                for res in got:
                    self._collect(res)
                slot = self._pool.acquire()
                if slot is None and self._executor.in_flight == 0:
                    break  # nothing will free a slot (should not happen)
            self.stats["block_s"] += time.perf_counter() - tb
        if slot is None:
            self._count_skip(step)
            return False
        try:
            snap = self._pool.copy(slot, mats, private)
        except Exception as exc:  # e.g. out of (pinned) memory: skip this snapshot
            self._pool.release(slot)
            self._internal_error("copying the weights", step, exc)
            return False
        except BaseException:
            self._pool.release(slot)
            raise
        wall_time = time.time()
        job = Job(seq=self._seq, step=step, epoch=epoch, wall_time=wall_time, mats=snap.mats,
                  config=self.config, slot=slot, snapshot=snap)
        self._seq += 1
        self._executor.submit(job)
        self._last_snapshot_step = step
        self._auto_base = step
        self.snapshots += 1
        self.stats["snapshots"] += 1
        self.stats["bytes_copied"] += snap.nbytes
        cost = time.perf_counter() - t0
        self._snap_cost[job.seq] = cost
        self.stats["snapshot_s"] += cost
        return True

    # ------------------------------------------------------------- result hand-back

    def _collect(self, res: Result) -> None:
        """Release the slot at once; process results strictly in submission order."""
        if self._pool is not None and res.slot >= 0:
            self._pool.release(res.slot)
        if self.distributed:
            # this rank's part of a snapshot: sent at the next exchange, published when complete
            self._account(res)
            self._local_parts.append(self._part(res.seq, res.wall_time, res.reports, res.error, res.cpu_s, res.wall_s))
            return
        self._reorder[res.seq] = res
        while self._next_seq in self._reorder:
            r = self._reorder.pop(self._next_seq)
            self._next_seq += 1
            self._handle(r)

    def _part(self, seq: int, wall_time: float, reports: list, error: str | None, cpu_s: float = 0.0,
              wall_s: float = 0.0) -> dict[str, Any]:
        return {"seq": seq, "rank": self.rank, "wall_time": wall_time, "reports": list(reports),
                "error": error if (error and not reports) else None, "cpu_s": cpu_s, "wall_s": wall_s}

    def _account(self, res: Result) -> None:
        """This rank's bookkeeping of a finished analysis: stats, failures, measured cost."""
        self.stats["analysed"] += 1
        self.stats["analysis_wall_s"] += res.wall_s
        self.stats["analysis_cpu_s"] += res.cpu_s
        self.stats["layers_analysed"] += len(res.reports)
        snap_cost = self._snap_cost.pop(res.seq, 0.0)
        failures: list[str] = []
        for rep in res.reports:
            if rep.status == STATUS_FAILED:
                self.stats["failed_layers"] += 1
                failures.append(f"{rep.name}: {rep.status_detail}")
                log.warning("esdwatch: analysis of layer %r at step %d failed: %s", rep.name, res.step, rep.status_detail)
                tb = res.tracebacks.get(rep.name)
                if tb:
                    log.debug("esdwatch: traceback for layer %r:\n%s", rep.name, tb)
        if res.error and not res.reports:
            failures.append(res.error.strip().splitlines()[-1])
            log.error("esdwatch: analysis of the snapshot at step %d failed (layers %s): %s",
                      res.step, ", ".join(res.names) or "?", res.error.strip().splitlines()[-1])
        # auto interval: what this snapshot cost the training, measured: the larger of the
        # worker's CPU time (+ the copy) and the slowdown of the steps it overlapped
        impact, self._excess = self._excess, 0.0
        cost = max(res.cpu_s + snap_cost, impact)
        self._spent += cost
        self._cost_ema = cost if self._cost_ema is None else self._cost_ema + _EMA * (cost - self._cost_ema)
        self._wall_ema = res.wall_s if self._wall_ema is None else self._wall_ema + _EMA * (res.wall_s - self._wall_ema)
        if failures and self.strict and self._pending_error is None:
            self._pending_error = EsdwatchError(
                f"esdwatch: analysis failed at step {res.step} (strict=True): " + "; ".join(failures)
            )

    def _publish(self, step: int, records: list[LayerRecord]) -> None:
        """A complete snapshot: the writer writes it and runs the alarm policy; every rank keeps the summary."""
        if self.is_writer:
            self._write(records, step)
            try:
                fired = self.policy.update([r.report for r in records], step)
            except Exception as exc:
                fired = []
                self._internal_error("evaluating the alarms", step, exc)
            for alarm in fired:
                self._emit_alarm(alarm)
        self.latest = {r.name: r for r in records}
        self.latest_step = step
        self.latest_summary = summarize([r.report for r in records])
        self._summary_fresh = True

    def _handle(self, res: Result) -> None:
        t0 = time.perf_counter()
        self._account(res)
        records = [LayerRecord(res.step, res.epoch, res.wall_time, rep, self.segment) for rep in res.reports]
        gathered = self.gather_records(res.step, records)
        if gathered is not None and self.is_writer:
            self._publish(res.step, gathered)
        self._refresh_interval()
        self.stats["handle_s"] += time.perf_counter() - t0

    # ------------------------------------------------------------ distributed runs

    def _sync_point(self, step: int, epoch: int, *, take: bool, reason: str, block: bool | None = None,
                    stop: bool = True) -> None:
        """One exchange, on every rank at the same point (see :mod:`esdwatch.monitor.distributed`).

        Sends this rank's finished parts, publishes every snapshot now complete, updates
        the auto interval, takes (or skips, on every rank) the snapshot when ``take``,
        and reduces the stop decision when ``stop``.
        """
        comm = self._get_comm()
        self._ensure_worker()
        self.poll()
        block = (self.on_backpressure == "block") if block is None else block
        assert self._pool is not None and self._executor is not None
        if take and block:
            tb = time.perf_counter()
            while self._pool.free_slots() == 0 and self._executor.in_flight > 0:
                for res in self._executor.wait(1.0):
                    self._collect(res)
            self.stats["block_s"] += time.perf_counter() - tb
        err, self._pending_error = self._pending_error, None
        payload = {
            "rank": self.rank,
            "parts": self._local_parts,
            "free": self._pool.free_slots() > 0,
            "cost": self._local_costs(),
            "error": None if err is None else str(err),
        }
        t0 = time.perf_counter()
        gathered = comm.all_gather_object(payload)
        self._local_parts = []
        self.stats["exchanges"] += 1
        self.stats["exchange_s"] += time.perf_counter() - t0
        self._exchange_step = step
        for p in gathered:
            for part in p["parts"]:
                self._parts.setdefault(int(part["seq"]), {})[int(p["rank"])] = part
        self._publish_ready()
        self._peer_costs = [p["cost"] for p in gathered]
        self._refresh_interval()
        if take:
            self._attempts += 1
            if all(p["free"] for p in gathered):
                self._snapshot_dist(step, epoch, reason=reason)
            else:
                self._count_skip(step)
        if stop:
            self.sync_stop()
        errors = [f"rank {p['rank']}: {p['error']}" for p in gathered if p["error"]]
        if errors and self._dist_error is None:
            self._dist_error = EsdwatchError("; ".join(errors))

    def _snapshot_dist(self, step: int, epoch: int, *, reason: str) -> bool:
        """Discover, share out, materialize and submit this rank's part (every rank)."""
        if self._last_snapshot_step == step:
            return False
        assert self._pool is not None and self._executor is not None
        t0 = time.perf_counter()
        try:
            plan: ShardPlan = plan_snapshot(self.model, self.layer_options, self.rank, self.world_size,
                                            root=self._root())
        except Exception as exc:
            self._internal_error("discovering and sharing the layers", step, exc)
            return False
        if plan.mode != self.mode:
            self.mode = plan.mode
            if self.is_writer:
                log.info("esdwatch: %d ranks share the analysis (%s weights)", self.world_size, plan.mode)
        if not plan.names:
            self.stats["empty_snapshots"] += 1
            self._last_snapshot_step = step
            self._warn_once("no_layers", f"esdwatch: no analyzable layer in the model at step {step}; nothing is "
                                         "recorded until one appears. Adjust layers/exclude/types or min_evals.")
            return False
        seq = self._seq
        self._seq += 1
        self._snap_meta[seq] = {"step": step, "epoch": epoch, "names": plan.names, "owners": plan.owners,
                                "costs": plan.costs, "mode": plan.mode, "reason": reason}
        self.owners = plan.owner_of()
        owned = [m for _, m in plan.owned]
        wall_time = time.time()
        slot = self._pool.acquire() if owned else None
        if owned and slot is None:  # cannot happen: every rank reported a free slot
            self._local_parts.append(self._part(seq, wall_time, [], "no free snapshot slot"))
        elif owned:
            try:
                snap = self._pool.copy(slot, owned, plan.private)
            except Exception as exc:
                self._pool.release(slot)
                self._internal_error("copying the weights", step, exc)
                self._local_parts.append(self._part(seq, wall_time, [], f"copying the weights failed: {exc}"))
            else:
                self._executor.submit(Job(seq=seq, step=step, epoch=epoch, wall_time=wall_time, mats=snap.mats,
                                          config=self.config, slot=slot, snapshot=snap))
                self.stats["bytes_copied"] += snap.nbytes
        else:
            self._local_parts.append(self._part(seq, wall_time, [], None))  # nothing to analyse here
        self._last_snapshot_step = step
        self._auto_base = step
        self.snapshots += 1
        self.stats["snapshots"] += 1
        cost = time.perf_counter() - t0
        self._snap_cost[seq] = cost
        self.stats["snapshot_s"] += cost
        return True

    def _publish_ready(self) -> None:
        """Publish, in order, every snapshot whose parts from all ranks have arrived."""
        while True:
            parts = self._parts.get(self._next_pub)
            if parts is None or len(parts) < self.world_size:
                return
            seq = self._next_pub
            self._next_pub += 1
            del self._parts[seq]
            self._publish_parts(seq, self._snap_meta.pop(seq, None), parts)

    def _publish_parts(self, seq: int, meta: dict[str, Any] | None, parts: dict[int, dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        if meta is None:
            return
        order = {n: i for i, n in enumerate(meta["names"])}
        reports = [rep for rk in sorted(parts) for rep in parts[rk]["reports"]]
        reports.sort(key=lambda r: order.get(r.name, len(order)))
        wall_time = parts[0]["wall_time"] if 0 in parts else min(p["wall_time"] for p in parts.values())
        step, epoch = int(meta["step"]), int(meta["epoch"])
        missing = [r for r in range(self.world_size) if r not in parts]
        if self.is_writer:
            for rk, p in sorted(parts.items()):
                if p["error"]:
                    log.error("esdwatch: rank %d's part of the snapshot at step %d failed: %s", rk, step,
                              str(p["error"]).strip().splitlines()[-1])
            if missing:
                log.warning("esdwatch: the snapshot at step %d is written without the layers of rank(s) %s "
                            "(never received)", step, missing)
            if self._jsonl is not None:
                by_rank = []
                for rk in range(self.world_size):
                    mine = [i for i, o in enumerate(meta["owners"]) if o == rk]
                    p = parts.get(rk, {})
                    by_rank.append({"rank": rk, "layers": len(mine), "cost": float(sum(meta["costs"][i] for i in mine)),
                                    "analysis_wall_s": p.get("wall_s"), "analysis_cpu_s": p.get("cpu_s"),
                                    "received": rk in parts})
                try:
                    self._jsonl.distributed({"global_step": step, "segment": self.segment, "world_size": self.world_size,
                                             "mode": meta["mode"], "owners": dict(zip(meta["names"], meta["owners"])),
                                             "ranks": by_rank})
                except Exception as exc:
                    self._sink_failed(self._jsonl, "distributed", exc)
        records = [LayerRecord(step, epoch, wall_time, rep, self.segment) for rep in reports]
        self._publish(step, records)
        self.stats["handle_s"] += time.perf_counter() - t0

    def _flush_partial(self) -> None:
        """No more exchanges (exception, abort): the writer publishes what it has, the others warn."""
        for part in self._local_parts:
            self._parts.setdefault(int(part["seq"]), {})[self.rank] = part
        unsent = len(self._local_parts)
        self._local_parts = []
        if not self.is_writer:
            if unsent:
                log.warning("esdwatch: rank %d: %d analysed snapshot part(s) could not reach rank 0 (training ended "
                            "without an exchange after them)", self.rank, unsent)
            self._parts.clear()
            return
        for seq in sorted(self._parts):
            parts = self._parts.pop(seq)
            try:
                self._publish_parts(seq, self._snap_meta.pop(seq, None), parts)
            except Exception:  # never mask the original exception
                log.exception("esdwatch: error while flushing the snapshot %d", seq)
        self._parts.clear()

    def _due_dist(self, step: int) -> bool:
        """Like :meth:`_due` but from state identical on every rank."""
        if self.every_n_epochs is not None:
            return False
        if self.every_n_steps == "auto":
            if self._interval is None:
                return self._attempts == 0 and step >= AUTO_FIRST_STEP
            return step >= self._auto_base + self._interval
        n = int(self.every_n_steps)  # type: ignore[arg-type]
        return step > 0 and step // n > self._last_step // n

    def _count_skip(self, step: int) -> None:
        self._auto_base = step
        self.stats["skipped"] += 1
        self.skipped_steps.append(step)
        del self.skipped_steps[:-_SKIPPED_KEEP]
        nice = (f", or worker_nice=0 (worker_nice={self.worker_nice} yields the CPU to training and other "
                f"processes, so a saturated CPU starves the worker)") if self.worker_nice else ""
        self._warn_once(
            "backpressure",
            f"esdwatch: the analysis worker is still busy; skipped the snapshot at step {step} "
            f"(on_backpressure='skip', max_pending={self.max_pending}). Skipped snapshots are counted in "
            f"stats['skipped']; snapshot less often (every_n_steps='auto' follows the worker's pace), raise "
            f"max_pending, use on_backpressure='block'{nice}.",
        )

    def _internal_error(self, what: str, step: int, exc: Exception) -> None:
        """A failure of esdwatch itself: logged (with traceback once per kind), never fatal unless strict."""
        self.stats["internal_errors"] = self.stats.get("internal_errors", 0) + 1
        key = f"internal:{what}"
        first = key not in self._warned
        self._warned.add(key)
        log.error("esdwatch: %s failed at step %d (%s: %s); this snapshot is skipped, training continues",
                  what, step, type(exc).__name__, exc, exc_info=first)
        if self.strict and self._pending_error is None:
            self._pending_error = EsdwatchError(f"esdwatch: {what} failed at step {step}: {exc}")

    def _raise_pending(self) -> None:
        if self.distributed:
            # only errors shared at an exchange: every rank raises the same one at the same point
            if self._dist_error is not None:
                err, self._dist_error = self._dist_error, None
                raise err
            return
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err

    def _sink_failed(self, sink: Any, what: str, exc: Exception) -> None:
        key = id(sink)
        if key not in self._broken_sinks:
            self._broken_sinks.add(key)
            log.warning("esdwatch: sink %s failed in %s: %s: %s (further failures of this sink are logged at debug level)",
                        type(sink).__name__, what, type(exc).__name__, exc, exc_info=True)
        else:
            log.debug("esdwatch: sink %s failed again in %s: %s", type(sink).__name__, what, exc)
        if self.strict and self._pending_error is None:
            self._pending_error = EsdwatchError(f"esdwatch: sink {type(sink).__name__}.{what} failed: {exc}")

    def _write(self, records: list[LayerRecord], step: int) -> None:
        if not records:
            return
        if self._jsonl is not None:
            try:
                self._jsonl.write(records, step)
            except Exception as exc:
                self._sink_failed(self._jsonl, "write", exc)
        for sink in self.sinks:
            try:
                sink.write(records, step)
            except Exception as exc:
                self._sink_failed(sink, "write", exc)

    def _emit_alarm(self, alarm: Alarm) -> None:
        self.alarms.append(alarm)
        if self._jsonl is not None:
            try:
                self._jsonl.alarm(alarm)
            except Exception as exc:
                self._sink_failed(self._jsonl, "alarm", exc)
        for sink in self.sinks:
            try:
                sink.alarm(alarm)
            except Exception as exc:
                self._sink_failed(sink, "alarm", exc)
        action = self.policy.action_for(alarm.kind)
        level = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}.get(alarm.severity, logging.WARNING)
        text = f"esdwatch alarm [{alarm.kind}] at step {alarm.step}: {alarm.message}"
        if action == "log":
            log.log(level, text)
        elif action == "warn":
            log.log(max(level, logging.WARNING), text)
            warnings.warn(text, EsdwatchWarning, stacklevel=2)
        elif action == "stop":
            log.log(max(level, logging.WARNING), text + " -> stopping training")
            self.request_stop(alarm)
        else:
            log.log(level, text)
            try:
                action(self.context if self.context is not None else self, alarm)
            except Exception as exc:
                log.exception("esdwatch: alarm action %r for %s failed", action, alarm.kind)
                if self.strict and self._pending_error is None:
                    self._pending_error = EsdwatchError(f"esdwatch: alarm action for {alarm.kind} failed: {exc}")

    def pop_summary(self) -> dict[str, float] | None:
        """The model-level averages of the latest snapshot, once per snapshot (else None)."""
        if not self._summary_fresh:
            return None
        self._summary_fresh = False
        return dict(self.latest_summary)

    # ---------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, alarm counters, phase history, segment and output directory.

        With ``drain_on_checkpoint`` (default) the snapshots in flight are first
        analysed and written, so the checkpoint never refers to records not on disk.
        """
        if self.distributed:
            if self.drain_on_checkpoint and self._started and not self._closed:
                # collective (Lightning saves checkpoints on every rank): drain here, then one exchange
                # so that rank 0 writes every part before the checkpoint refers to it
                self.drain()
                self._sync_point(self._last_step, self._last_epoch, take=False, reason="checkpoint", stop=False)
        elif self.drain_on_checkpoint and self._executor is not None and self._executor.in_flight:
            self.drain()
        return {
            "version": 1,
            "segment": self.segment,
            "last_step": self._last_step,
            "last_epoch": self._last_epoch,
            "last_snapshot_step": self._last_snapshot_step,
            "interval": self._interval,
            "cost_ema": self._cost_ema,
            "wall_ema": self._wall_ema,
            "step_s": self._step_s,
            "snapshots": self.snapshots,
            "skipped": int(self.stats["skipped"]),
            "policy": self.policy.state_dict(),
            "output_dir": None if self.output_dir is None else str(self.output_dir),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: the next snapshot is the next scheduled step after it."""
        if not state:
            return
        if self._jsonl is not None and self._jsonl.is_open:
            log.warning("esdwatch: load_state_dict after the run started; reopening the outputs as a resumed segment")
            self._jsonl.close()
            self._jsonl = None
        self.segment = int(state.get("segment", 0)) + 1
        self._last_step = int(state.get("last_step", 0))
        self._resumed_from = self._last_step
        self._last_epoch = int(state.get("last_epoch", 0))
        lss = state.get("last_snapshot_step")
        self._last_snapshot_step = None if lss is None else int(lss)
        self._auto_base = self._last_snapshot_step or 0
        if self.every_n_steps == "auto":
            self._interval = state.get("interval")
            self._cost_ema = state.get("cost_ema")
            self._wall_ema = state.get("wall_ema")
            self._step_s = state.get("step_s")
        self.snapshots = int(state.get("snapshots", 0))
        self._attempts = self.snapshots + int(state.get("skipped", 0))
        self.policy.load_state_dict(state.get("policy", {}))
        self._prev_dir = state.get("output_dir")
        if self._started:
            self._open_outputs()
