"""ESDMonitor: the Lightning callback, a thin shell over :class:`esdwatch.monitor.monitor.Monitor`.

``lightning.pytorch`` and ``pytorch_lightning`` are separate class hierarchies: a
Trainer of one rejects the other's callbacks, and so does LightningCLI's
``class_path`` validation. The logic therefore lives in the framework-free
:class:`ESDMonitorBase`, and one thin subclass exists per installed package, created
on first access (importing this module imports neither package):

* ``esdwatch.integrations.lightning.LightningESDMonitor``: a ``lightning.pytorch.Callback``
* ``esdwatch.integrations.lightning.PLESDMonitor``: a ``pytorch_lightning.Callback``
* ``esdwatch.integrations.lightning.ESDMonitor``: ``LightningESDMonitor`` if ``lightning`` is
  installed, else ``PLESDMonitor``.

::

    from esdwatch.integrations.lightning import ESDMonitor
    trainer = Trainer(callbacks=[ESDMonitor(every_n_steps=200)])

LightningCLI (``configs/esdwatch.yaml``)::

    trainer:
      callbacks:
        - class_path: esdwatch.integrations.lightning.ESDMonitor
          init_args: {every_n_steps: 200, at_start: true}

Lightning specifics handled here: ``global_step`` counts optimizer steps (gradient
accumulation calls ``on_train_batch_end`` several times per step; each step is handled
once); nothing runs during sanity checking or under ``fast_dev_run``; threads, queues
and files are created in ``setup("fit")`` and dropped by ``__getstate__`` (``ddp_spawn``
pickles callbacks); :attr:`state_key` includes the arguments that tell two monitors
apart; the stop decision is reduced with ``trainer.strategy.reduce_boolean_decision`` by
every rank at the same hooks (scheduled steps and epoch ends), never inside
rank-zero-only code. Records go to ``<log_dir>/esdwatch/records.jsonl`` with
``log_dir`` the first logger's ``log_dir`` (else its ``save_dir``, else the Trainer's
``default_root_dir``), found by attribute, not by logger class; a named monitor writes
``<log_dir>/esdwatch/<name>/`` and its logger sinks tag everything ``esdwatch/<name>/...``
(its ``name`` is passed to :func:`esdwatch.sinks.sinks_for_loggers`), so several monitors
share a Trainer and its loggers without overwriting each other. Model-level averages are
logged with ``pl_module.log`` as ``esdwatch/summary/<metric>`` (not sent to the loggers:
the sinks write the real time series), so ``ModelCheckpoint(monitor=...)`` and
``EarlyStopping`` can use them.

Distributed strategies (see :mod:`esdwatch.monitor.distributed`): under DDP / ``ddp_spawn`` each
rank analyses a cost-balanced share of the layers and the results meet at exchanges
(scheduled steps, epoch ends, checkpoints, the end of training) on every rank; rank 0
writes the records, every rank logs the same ``esdwatch/summary/*`` values (so a
``ModelCheckpoint`` monitoring one decides identically on every rank: tested with
``ddp_spawn``), and the stop decision is reduced with ``reduce_boolean_decision`` right
after each exchange. The wrapped model is looked up at each snapshot as
``trainer.strategy.model`` (strategies wrap it after ``setup``): with Lightning's
``"fsdp"`` strategy (FSDP1) the layers are unsharded one FSDP unit at a time
(``summon_full_params(unit, recurse=False, writeback=False)``) and only each matrix's
owner copies it; with ``ModelParallelStrategy`` / FSDP2 the DTensor weights are gathered
to their owner only. These FSDP paths are tested with torch's FSDP1 and FSDP2 on CPU in
plain loops (``tests/test_fsdp.py``); Lightning's ``"fsdp"`` strategy refuses CPU, so
the Lightning FSDP run itself is unverified without a GPU machine.
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings
from typing import Any, Callable, Literal, Optional, Union

from esdwatch.alarms.rules import Alarm, AlarmRule
from esdwatch.monitor.monitor import Monitor

log = logging.getLogger("esdwatch.integrations.lightning")

__all__ = ["ESDMonitorBase", "ESDMonitor", "LightningESDMonitor", "PLESDMonitor", "callback_class"]

#: subclass name -> the package whose Callback it derives from
_FRAMEWORKS: dict[str, str] = {"LightningESDMonitor": "lightning.pytorch", "PLESDMonitor": "pytorch_lightning"}


class ESDMonitorBase:
    """Watch the weight spectra (heavy-tailed self-regularization) of the model while it trains.

    Snapshots copy the selected weights at the scheduled steps; a background worker
    computes every metric, phase and alarm; results are written in step order to
    ``<log_dir>/esdwatch/records.jsonl`` (and ``alarms.jsonl``) and to the sinks.
    See :class:`esdwatch.monitor.monitor.Monitor` for the full semantics.

    Args:
        every_n_steps: snapshot every n optimizer steps, or "auto" to stay within
            ``max_overhead``; exactly one of every_n_steps / every_n_epochs ("auto" if neither).
        every_n_epochs: snapshot at the end of every n-th training epoch.
        at_start: also snapshot the initial weights (global step 0, fresh runs only).
        at_end: also snapshot the final weights after the last step.
        max_overhead: training-time fraction the analysis may cost under "auto".
        layers: name patterns of the matrices to watch (globs, or "re:" regexes).
        exclude: name patterns to leave out.
        types: layer kinds to watch ("linear", "conv2d", "embedding", "attention", ...).
        min_evals: skip matrices whose ESD has fewer eigenvalues.
        max_evals: skip matrices whose ESD has more eigenvalues (None: no limit).
        conv_mode: "pooled" (one ESD per conv layer) or "slices" (one per kernel position).
        conv2d_norm: weightwatcher's Conv2d normalization.
        dtype: eigenvalue precision, "float64" or "float32".
        device: where the analysis runs (None: on CPU copies; "cuda": on the GPU, side stream).
        method: eigenvalue route, "auto", "gram" or "svd".
        mp_fit: fit the Marchenko-Pastur bulk.
        phases: classify each layer's training phase.
        traps: run the correlation-trap test.
        keep_evals: hand the eigenvalues to the sinks (spectra plots) and write their histograms to
            spectra.jsonl next to records.jsonl, for esdwatch report (a SpectraSink in sinks replaces that one).
        worker: "thread" (default; chosen by experiments/bench_overhead.py, see esdwatch.monitor.monitor) or "process".
        max_pending: snapshots in flight at most.
        on_backpressure: "skip" (count and skip a snapshot while the worker is busy) or "block".
        drain_timeout: seconds to wait for pending analyses at the end, at checkpoints and after errors.
        worker_nice: niceness added to the worker (default 0: a niced worker is starved on a busy CPU).
        worker_threads: intra-op threads of the worker.
        drain_on_checkpoint: finish in-flight analyses before a checkpoint is saved.
        alarm_rules: threshold rules (default esdwatch.alarms.rules.DEFAULT_RULES).
        alarm_patience: consecutive snapshots before an alarm fires (int, or per alarm kind).
        alarm_actions: per alarm kind: "log", "warn", "stop" or a callable (trainer, alarm) -> None.
        phase_transitions: emit informational phase_transition alarms.
        log_dir: output directory (default: the first logger's log_dir, else default_root_dir).
        name: distinguishes two monitors on one Trainer (state key, output sub-directory
            ``esdwatch/<name>/``, summary keys and logger tags ``esdwatch/<name>/...``); two
            monitors with the same log_dir need distinct names (an error at setup otherwise).
        sinks: extra sinks (objects with write(records, step), alarm(alarm), close()).
        logger_sinks: also build sinks for the Trainer's loggers (esdwatch.sinks.sinks_for_loggers).
        sink_options: keyword options for those sinks (figure_every, hist_bins, ...), passed to
            esdwatch.sinks.sinks_for_loggers; an option no sink knows is an error at setup.
        log_summary: log model-level averages as esdwatch/summary/<metric> via pl_module.log.
        strict: re-raise analysis and sink failures in the training loop.
        analyze_fn: replaces esdwatch.engine.analyzer.analyze_layers (picklable for worker="process").
    """

    def __init__(
        self,
        every_n_steps: Union[int, Literal["auto"], None] = None,
        every_n_epochs: Optional[int] = None,
        at_start: bool = False,
        at_end: bool = True,
        max_overhead: float = 0.05,
        layers: Union[str, list[str], None] = None,
        exclude: Union[str, list[str], None] = None,
        types: Optional[list[str]] = None,
        min_evals: int = 50,
        max_evals: Optional[int] = 15000,
        conv_mode: Literal["pooled", "slices"] = "pooled",
        conv2d_norm: bool = True,
        dtype: Literal["float64", "float32"] = "float64",
        device: Optional[str] = None,
        method: Literal["auto", "gram", "svd"] = "auto",
        mp_fit: bool = True,
        phases: bool = True,
        traps: bool = True,
        keep_evals: bool = False,
        worker: Literal["thread", "process"] = "thread",
        max_pending: int = 1,
        on_backpressure: Literal["skip", "block"] = "skip",
        drain_timeout: float = 120.0,
        worker_nice: int = 0,
        worker_threads: Optional[int] = 1,
        drain_on_checkpoint: bool = True,
        alarm_rules: Optional[list[AlarmRule]] = None,
        alarm_patience: Union[int, dict[str, int], None] = None,
        alarm_actions: Optional[dict[str, Union[str, Callable[[Any, Alarm], None]]]] = None,
        phase_transitions: bool = True,
        log_dir: Optional[str] = None,
        name: Optional[str] = None,
        sinks: Optional[list[Any]] = None,
        logger_sinks: bool = True,
        sink_options: Optional[dict[str, Any]] = None,
        log_summary: bool = True,
        strict: bool = False,
        analyze_fn: Optional[Callable[..., Any]] = None,
    ):
        super().__init__()
        self._monitor_kwargs: dict[str, Any] = dict(
            every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, at_start=at_start, at_end=at_end,
            max_overhead=max_overhead, layers=layers, exclude=exclude, types=types, min_evals=min_evals,
            max_evals=max_evals, conv_mode=conv_mode, conv2d_norm=conv2d_norm, dtype=dtype, device=device,
            method=method, mp_fit=mp_fit, phases=phases, traps=traps, keep_evals=keep_evals, worker=worker,
            max_pending=max_pending, on_backpressure=on_backpressure, drain_timeout=drain_timeout,
            worker_nice=worker_nice, worker_threads=worker_threads, drain_on_checkpoint=drain_on_checkpoint,
            alarm_rules=alarm_rules, alarm_patience=alarm_patience, alarm_actions=alarm_actions,
            phase_transitions=phase_transitions, name=name, strict=strict, analyze_fn=analyze_fn,
        )
        # validate every argument now (a clear error at construction, not mid-training);
        # a Monitor without a model starts nothing
        Monitor(None, **self._monitor_kwargs)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.layers = layers
        self.exclude = exclude
        self.types = types
        self.name = name
        self.log_dir = log_dir
        self.sinks = list(sinks or [])
        self.logger_sinks = logger_sinks
        self.sink_options = dict(sink_options or {})
        self._check_sink_options()
        self.log_summary = log_summary
        self._monitor: Monitor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._disabled = False

    # ---------------------------------------------------------------- plumbing

    @property
    def monitor(self) -> Monitor | None:
        """The :class:`Monitor` of the current fit (None outside ``fit``)."""
        return self._monitor

    @property
    def state_key(self) -> str:
        return self._generate_state_key(  # type: ignore[attr-defined]
            every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs,
            layers=self.layers, exclude=self.exclude, types=self.types, name=self.name,
        )

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles callbacks: no threads, queues, files or buffers travel
        state = self.__dict__.copy()
        state["_monitor"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @staticmethod
    def _resolve_log_dir(trainer: Any) -> str:
        """First logger's ``log_dir`` or ``save_dir``, else ``default_root_dir`` (call on every rank)."""
        path = None
        loggers = list(getattr(trainer, "loggers", None) or [])
        if loggers:
            first = loggers[0]
            for attr in ("log_dir", "save_dir"):
                try:
                    path = getattr(first, attr, None)
                except Exception:  # a logger property that cannot be computed here
                    path = None
                if path:
                    break
        if not path:
            path = trainer.default_root_dir
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and getattr(trainer, "world_size", 1) > 1:
            path = strategy.broadcast(str(path))  # identical on every rank (a collective: all ranks call it)
        return str(path)

    def _check_sink_options(self) -> None:
        """Unknown sink options are an error here, on every rank (not later, on rank 0 only)."""
        if not self.sink_options:
            return
        try:
            known_by_kind = importlib.import_module("esdwatch.sinks.factory").sink_options()
        except (ImportError, AttributeError):
            return  # no logger sinks in this build: _logger_sinks warns
        known = set().union(*known_by_kind.values())
        unknown = sorted(set(self.sink_options) - known)
        if unknown:
            raise ValueError(f"unknown sink_options {unknown}; known: {sorted(known)}")

    def _logger_sinks(self, trainer: Any) -> list[Any]:
        try:
            sinks_mod = importlib.import_module("esdwatch.sinks")
        except ImportError:
            return []
        factory = getattr(sinks_mod, "sinks_for_loggers", None)
        if factory is None:
            if self.sink_options:
                log.warning("esdwatch: sink_options given but esdwatch.sinks.sinks_for_loggers is not available")
            return []
        # the monitor's name reaches the sinks, so two monitors on one logger write under
        # esdwatch/<name>/..., as their records (esdwatch/<name>/) and summaries do; an explicit
        # sink_options name or prefix wins
        options = dict(self.sink_options)
        if self.name and "name" not in options:
            options["name"] = self.name
        try:
            return list(factory(list(getattr(trainer, "loggers", None) or []), **options))
        except TypeError as exc:  # an unknown sink option: the user's configuration error
            if self.sink_options:
                raise ValueError(f"esdwatch: bad sink_options {self.sink_options}: {exc}") from exc
            raise
        except Exception as exc:
            log.warning("esdwatch: could not build sinks for the loggers (%s: %s); records still go to records.jsonl",
                        type(exc).__name__, exc)
            return []

    def _check_distinct(self, trainer: Any) -> None:
        """Refuse a second monitor that would write to this one's output directory.

        Two unnamed monitors with the same ``log_dir`` (Lightning accepts them when other
        arguments make their ``state_key`` differ) would share ``esdwatch/records.jsonl``:
        the second opens it as a fresh run segment, which supersedes every record of the
        first for every reader, and their logger tags would collide too. Raised on every
        rank, at ``setup``, before anything is written.
        """
        def where(cb: ESDMonitorBase) -> tuple[Optional[str], Optional[str]]:
            return (None if cb.log_dir is None else str(cb.log_dir).rstrip("/"), cb.name)

        mine = where(self)
        for cb in getattr(trainer, "callbacks", None) or []:
            if cb is not self and isinstance(cb, ESDMonitorBase) and where(cb) == mine:
                raise ValueError(
                    f"esdwatch: two ESDMonitor callbacks would write to the same output directory "
                    f"(log_dir={mine[0]!r}, name={mine[1]!r}) and to the same logger tags; give each a distinct "
                    f"name= (records go to <log_dir>/esdwatch/<name>/, tags to esdwatch/<name>/...)"
                )

    def _active(self, trainer: Any) -> bool:
        return self._monitor is not None and not self._disabled and not getattr(trainer, "sanity_checking", False)

    def _sync_stop(self, trainer: Any) -> None:
        if self._monitor is not None and self._monitor.sync_stop():
            trainer.should_stop = True

    def _log_summary(self, pl_module: Any, *, on_epoch: bool) -> None:
        if not self.log_summary or self._monitor is None:
            return
        mon = self._monitor
        summary = mon.latest_summary if on_epoch else mon.pop_summary()
        if not summary:
            return
        values = {f"{mon.summary_prefix}/{k}": float(v) for k, v in summary.items()
                  if v is not None and math.isfinite(float(v))}
        if not values:
            return
        try:
            with warnings.catch_warnings():
                # distributed runs: every rank logs the same values (each assembles the complete
                # snapshot at the same exchange), so Lightning's advice to sync_dist does not apply
                warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
                pl_module.log_dict(values, on_step=not on_epoch, on_epoch=on_epoch, logger=False,
                                   prog_bar=False, batch_size=1, sync_dist=False)
        except Exception as exc:  # logging is a convenience: never fail training for it
            log.debug("esdwatch: pl_module.log_dict failed: %s", exc)

    # ------------------------------------------------------------------- hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if str(stage) not in ("fit", "TrainerFn.FITTING"):
            return
        if self._monitor is not None:  # a previous fit that never tore down
            self._monitor.close(final=False)
            self._monitor = None
        self._check_distinct(trainer)
        self._disabled = bool(getattr(trainer, "fast_dev_run", False))
        if self._disabled:
            if getattr(trainer, "is_global_zero", True):
                log.info("esdwatch: fast_dev_run is set: ESDMonitor does nothing in this run")
            return
        log_dir = self.log_dir or self._resolve_log_dir(trainer)
        rank = int(getattr(trainer, "global_rank", 0))
        sinks = list(self.sinks)
        if self.logger_sinks and rank == 0:
            sinks += self._logger_sinks(trainer)
        strategy = trainer.strategy
        mon = Monitor(
            pl_module, **self._monitor_kwargs, log_dir=log_dir, sinks=sinks, rank=rank,
            world_size=int(getattr(trainer, "world_size", 1)), context=trainer,
            # the wrapped model (DDP / FSDP1 root), resolved at each snapshot: strategies wrap it after setup()
            root_module=lambda: getattr(strategy, "model", None),
        )
        mon.stop_reducer = lambda decision: strategy.reduce_boolean_decision(decision, all=False)
        if self._pending_state:
            mon.load_state_dict(self._pending_state)
            self._pending_state = None
        self._monitor = mon

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._active(trainer):
            return
        self._monitor.start(trainer.global_step, trainer.current_epoch)  # type: ignore[union-attr]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._active(trainer):
            return
        mon = self._monitor
        step = int(trainer.global_step)
        stop = mon.step(step, int(trainer.current_epoch))  # type: ignore[union-attr]
        if mon.distributed:  # type: ignore[union-attr]
            if stop:  # agreed by every rank at this step's exchange
                trainer.should_stop = True
        elif mon.stop_sync_due(step):  # type: ignore[union-attr]
            self._sync_stop(trainer)
        self._log_summary(pl_module, on_epoch=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active(trainer):
            return
        mon = self._monitor
        stop = mon.epoch_end(int(trainer.current_epoch), int(trainer.global_step))  # type: ignore[union-attr]
        if mon.distributed:  # type: ignore[union-attr]
            if stop:  # epoch_end is an exchange: the stop decision was reduced there, on every rank
                trainer.should_stop = True
        else:
            self._sync_stop(trainer)
        self._log_summary(pl_module, on_epoch=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active(trainer):
            return
        self._monitor.finish(int(trainer.global_step))  # type: ignore[union-attr]

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._monitor is not None:
            self._monitor.abort()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if str(stage) not in ("fit", "TrainerFn.FITTING") or self._monitor is None:
            return
        # keep the finished monitor's state for state_dict() after fit; its threads stop here
        self._pending_state = None
        self._monitor.close(final=False)

    def state_dict(self) -> dict[str, Any]:
        if self._monitor is not None:
            return self._monitor.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._monitor is not None:
            self._monitor.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)


def _build(name: str) -> type:
    package = _FRAMEWORKS[name]
    module = importlib.import_module(package)
    base = module.Callback
    cls = type(
        name,
        (ESDMonitorBase, base),
        {"__module__": __name__, "__qualname__": name, "__doc__": ESDMonitorBase.__doc__, "framework": package},
    )
    globals()[name] = cls
    return cls


def callback_class(framework: str | None = None) -> type:
    """The ESDMonitor class for ``"lightning"`` / ``"lightning.pytorch"``, ``"pytorch_lightning"``,
    or (None) the first installed of the two."""
    if framework in ("lightning", "lightning.pytorch"):
        return _get("LightningESDMonitor")
    if framework == "pytorch_lightning":
        return _get("PLESDMonitor")
    if framework is not None:
        raise ValueError(f"framework must be 'lightning', 'lightning.pytorch' or 'pytorch_lightning', got {framework!r}")
    errors = []
    for cls_name in ("LightningESDMonitor", "PLESDMonitor"):
        try:
            return _get(cls_name)
        except ImportError as exc:
            errors.append(str(exc))
    raise ImportError(
        "ESDMonitor needs Lightning: pip install 'esdwatch[lightning]' (or 'esdwatch[pytorch-lightning]'); "
        "for plain PyTorch loops use esdwatch.Monitor. (" + "; ".join(errors) + ")"
    )


def _get(name: str) -> type:
    cls = globals().get(name)
    return cls if isinstance(cls, type) else _build(name)


def __getattr__(name: str) -> Any:
    if name in _FRAMEWORKS:
        return _get(name)
    if name == "ESDMonitor":
        cls = callback_class(None)
        globals()["ESDMonitor"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
