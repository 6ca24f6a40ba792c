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

import dataclasses
import importlib
import logging
import math
import warnings
from pathlib import Path
from typing import Any

from esdwatch.monitor import Monitor
from esdwatch.monitor.options import FrameworkOptions, MonitorOptions, takes_monitor_options
from esdwatch.rundir import run_dir
from esdwatch.sinks.factory import check_sink_options, shell_sinks

log = logging.getLogger("esdwatch.integrations.lightning")

#: seconds a Ctrl-C waits for the analyses in flight (their records are kept if they finish)
INTERRUPT_WAIT_S = 5.0

__all__ = ["ESDMonitorBase", "ESDMonitor", "LightningESDMonitor", "PLESDMonitor", "callback_class"]

#: subclass name -> the package whose Callback it derives from
_FRAMEWORKS: dict[str, str] = {"LightningESDMonitor": "lightning.pytorch", "PLESDMonitor": "pytorch_lightning"}


class ESDMonitorBase:
    """Watch the weight spectra (heavy-tailed self-regularization) of the model while it trains.

    Snapshots copy the selected weights at the scheduled steps; a background worker
    computes every metric, phase and alarm; results are written in step order to
    ``<log_dir>/esdwatch/records.jsonl`` (and ``alarms.jsonl``) and to the sinks. Every
    option is documented (and checked) once, in :mod:`esdwatch.monitor.options`; the
    semantics are :class:`esdwatch.monitor.Monitor`'s.
    """

    @takes_monitor_options(
        FrameworkOptions,
        doc="""The Lightning callback of :class:`esdwatch.monitor.Monitor`.

    ``log_dir`` defaults to the first logger's ``log_dir`` (else its ``save_dir``, else the
    Trainer's ``default_root_dir``); two monitors with the same ``log_dir`` need distinct
    ``name``s (an error at setup otherwise).""",
    )
    def __init__(self, **options: Any):
        super().__init__()
        framework = {f.name for f in dataclasses.fields(FrameworkOptions)}
        self.framework = FrameworkOptions(**{k: options.pop(k) for k in list(options) if k in framework})
        #: the monitor's options, checked now (a clear error at construction, not mid-training)
        self.options = MonitorOptions.from_kwargs(**options)
        self._check_sink_options()
        self._monitor: Monitor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._disabled = False

    every_n_steps = property(lambda self: self.options.every_n_steps)
    every_n_epochs = property(lambda self: self.options.every_n_epochs)
    name = property(lambda self: self.options.name)
    log_dir = property(lambda self: self.options.log_dir)
    sinks = property(
        lambda self: list(self.options.sinks or []), doc="The user's sinks (the loggers' are added per fit)."
    )

    # ---------------------------------------------------------------- plumbing

    @property
    def monitor(self) -> Monitor | None:
        """The :class:`Monitor` of the current fit (None outside ``fit``)."""
        return self._monitor

    @property
    def state_key(self) -> str:
        o = self.options
        return self._generate_state_key(  # type: ignore[attr-defined]  # Lightning's Callback, a base added at runtime
            every_n_steps=o.every_n_steps,
            every_n_epochs=o.every_n_epochs,
            layers=o.layers,
            exclude=o.exclude,
            types=o.selection.types,
            name=o.name,
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
        """The run's own directory: the first logger's ``log_dir``, else its ``save_dir/<version>`` (W&B: the run
        id, so two runs never share a directory), else ``default_root_dir`` (call on every rank)."""
        path = None
        loggers = list(getattr(trainer, "loggers", None) or [])
        if loggers:
            path = _logger_dir(loggers[0])
        if not path:
            path = trainer.default_root_dir
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and getattr(trainer, "world_size", 1) > 1:
            path = strategy.broadcast(str(path))  # identical on every rank (a collective: all ranks call it)
        return str(path)

    def _check_sink_options(self) -> None:
        """Unknown sink options are an error here, on every rank (not later, on rank 0 only)."""
        check_sink_options(self.framework.sink_options)

    def _logger_sinks(self, trainer: Any) -> list[Any]:
        loggers = list(getattr(trainer, "loggers", None) or [])
        return shell_sinks(loggers, name=self.name, sink_options=self.framework.sink_options)

    def _check_distinct(self, trainer: Any, default_dir: str) -> None:
        """Refuse a second monitor that would write to this one's output directory.

        Two monitors whose directories resolve to the same path (the same ``log_dir``, or a
        relative and an absolute spelling of it, or a ``log_dir`` equal to the default)
        would share ``records.jsonl``: the second opens it as a fresh run segment, which
        supersedes every record of the first for every reader, and their logger tags would
        collide too. Raised on every rank, at ``setup``, before anything is written.
        """

        def where(cb: ESDMonitorBase) -> Path:
            return run_dir(Path(cb.log_dir or default_dir).resolve(), cb.name)

        mine = where(self)
        for cb in getattr(trainer, "callbacks", None) or []:
            if cb is not self and isinstance(cb, ESDMonitorBase) and where(cb) == mine:
                raise ValueError(
                    f"esdwatch: two ESDMonitor callbacks would write to the same output directory ({mine}) and to "
                    f"the same logger tags; give each a distinct name= (records go to <log_dir>/esdwatch/<name>/, "
                    f"tags to esdwatch/<name>/...)"
                )

    def _active(self, trainer: Any) -> bool:
        return self._monitor is not None and not self._disabled and not getattr(trainer, "sanity_checking", False)

    def _sync_stop(self, trainer: Any) -> None:
        if self._monitor is not None and self._monitor.sync_stop():
            trainer.should_stop = True

    def _log_summary(self, pl_module: Any, *, on_epoch: bool) -> None:
        if not self.framework.log_summary or self._monitor is None:
            return
        mon = self._monitor
        summary = mon.latest_summary if on_epoch else mon.pop_summary()
        if not summary:
            return
        values = {
            f"{mon.summary_prefix}/{k}": float(v)
            for k, v in summary.items()
            if v is not None and math.isfinite(float(v))
        }
        if not values:
            return
        try:
            with warnings.catch_warnings():
                # distributed runs: every rank logs the same values (each assembles the complete
                # snapshot at the same exchange), so Lightning's advice to sync_dist does not apply
                warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
                pl_module.log_dict(
                    values,
                    on_step=not on_epoch,
                    on_epoch=on_epoch,
                    logger=False,
                    prog_bar=False,
                    batch_size=1,
                    sync_dist=False,
                )
        except Exception as exc:  # logging is a convenience: never fail training for it
            log.debug("esdwatch: pl_module.log_dict failed: %s", exc)

    # ------------------------------------------------------------------- hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if str(stage) not in ("fit", "TrainerFn.FITTING"):
            return
        if self._monitor is not None:  # a previous fit that never tore down
            self._monitor.close(final=False)
            self._monitor = None
        self._disabled = bool(getattr(trainer, "fast_dev_run", False))
        if self._disabled:
            if getattr(trainer, "is_global_zero", True):
                log.info("esdwatch: fast_dev_run is set: ESDMonitor does nothing in this run")
            return
        default_dir = self._resolve_log_dir(trainer)  # a collective under DDP: every rank, every callback
        self._check_distinct(trainer, default_dir)
        log_dir = self.log_dir or default_dir
        rank = int(getattr(trainer, "global_rank", 0))
        sinks = list(self.options.sinks or [])
        if self.framework.logger_sinks and rank == 0:
            sinks += self._logger_sinks(trainer)
        strategy = trainer.strategy
        options = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(MonitorOptions)}
        mon = Monitor(
            pl_module,
            **{**options, "log_dir": log_dir, "sinks": sinks},
            rank=rank,
            world_size=int(getattr(trainer, "world_size", 1)),
            context=trainer,
            # the wrapped model (DDP / FSDP1 root), resolved at each snapshot: strategies wrap it after setup()
            root_module=lambda: getattr(strategy, "model", None),
        )
        mon.stop_reducer = lambda decision: strategy.reduce_boolean_decision(decision, all=False)
        if self._pending_state:
            mon.load_state_dict(self._pending_state)
            self._pending_state = None
        self._monitor = mon

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        mon = self._monitor
        if mon is None or not self._active(trainer):
            return
        mon.start(trainer.global_step, trainer.current_epoch)
        watchers = _summary_watchers(trainer, mon.summary_prefix)
        if trainer.global_step == 0 and not mon.latest_summary and watchers:
            self._baseline(mon, watchers)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # the latest averages, logged from the epoch's start: a checkpoint or early-stopping callback
        # monitoring esdwatch/summary/* finds them at the epoch's end whatever the callbacks' order
        if self._monitor is not None and self._active(trainer):
            self._log_summary(pl_module, on_epoch=True)

    def _baseline(self, mon: Monitor, watchers: list[str]) -> None:
        """A callback monitors a summary key: analyse the initial weights now, so the key exists from epoch 0."""
        log.info(
            "esdwatch: %s monitor %s: analysing the initial weights (step 0) before training, so the value "
            "exists from the first epoch",
            ", ".join(sorted(set(watchers))),
            mon.summary_prefix + "/...",
        )
        mon.snapshot(0, block=True)
        mon.drain()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        mon = self._monitor
        if mon is None or not self._active(trainer):
            return
        step = int(trainer.global_step)
        stop = mon.step(step, int(trainer.current_epoch))
        if mon.distributed:
            if stop:  # agreed by every rank at this step's exchange
                trainer.should_stop = True
        elif mon.stop_sync_due(step):
            self._sync_stop(trainer)
        self._log_summary(pl_module, on_epoch=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        mon = self._monitor
        if mon is None or not self._active(trainer):
            return
        stop = mon.epoch_end(int(trainer.current_epoch), int(trainer.global_step))
        if mon.distributed:
            if stop:  # epoch_end is an exchange: the stop decision was reduced there, on every rank
                trainer.should_stop = True
        else:
            self._sync_stop(trainer)
        self._log_summary(pl_module, on_epoch=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        mon = self._monitor
        if mon is None or not self._active(trainer):
            return
        mon.finish(int(trainer.global_step))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._monitor is not None:
            # Ctrl-C: the user wants out; keep what finishes within a few seconds, not drain_timeout
            interrupted = isinstance(exception, KeyboardInterrupt)
            wait = min(INTERRUPT_WAIT_S, self._monitor.drain_timeout or INTERRUPT_WAIT_S) if interrupted else None
            self._monitor.abort(timeout=wait)

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


def _logger_dir(logger: Any) -> str | None:
    """A logger's run directory: ``log_dir``, else ``save_dir/<version>`` (a W&B run's id), else ``save_dir``."""
    try:
        path = getattr(logger, "log_dir", None)
        if path:
            return str(path)
        save_dir = getattr(logger, "save_dir", None)
        version = getattr(logger, "version", None)
    except Exception:  # a logger property that cannot be computed here
        return None
    if save_dir and version not in (None, ""):
        return str(Path(save_dir) / (version if isinstance(version, str) else f"version_{version}"))
    return str(save_dir) if save_dir else None


def _summary_watchers(trainer: Any, prefix: str) -> list[str]:
    """The callbacks (by class name) whose ``monitor`` is one of this monitor's summary keys."""
    return [
        type(cb).__name__
        for cb in getattr(trainer, "callbacks", None) or []
        if isinstance(getattr(cb, "monitor", None), str) and cb.monitor.startswith(prefix + "/")
    ]


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
        raise ValueError(
            f"framework must be 'lightning', 'lightning.pytorch' or 'pytorch_lightning', got {framework!r}"
        )
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
