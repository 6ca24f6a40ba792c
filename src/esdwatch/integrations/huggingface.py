"""ESDCallback: the ``transformers.Trainer`` callback, a thin shell over :class:`~esdwatch.monitor.Monitor`.

``Trainer(..., callbacks=[ESDCallback(every_n_steps=200)])``. The class (a ``TrainerCallback``
and ``ExportableState``) is created on first access: importing this module imports no
transformers. Hooks: ``on_train_begin`` builds the monitor and starts it at
``state.global_step``; ``on_step_end`` (optimizer steps only: accumulated micro-batches end
in ``on_substep_end``) calls ``step``; ``on_epoch_end`` calls ``epoch_end``; ``on_train_end``
takes the ``at_end`` snapshot and closes. A ``"stop"`` alarm sets
``control.should_training_stop``. There is no exception hook: after a crash the monitor is
closed by the next ``train()`` or at interpreter exit.

Records go to ``<run dir>/esdwatch/``, the run dir being the Trainer's TensorBoard run
directory (``<output_dir>/runs/<date>_<host>``, named so also without TensorBoard). On rank
0 esdwatch writes into that directory with a SummaryWriter of its own (``report_to``
TensorBoard) and into the active W&B run on ``train/global_step`` (``report_to`` W&B); the
averages ``esdwatch/summary/<metric>`` also go into ``state.log_history``. Hooks get no
handle on the other callbacks: the TensorBoard one is found in the calling ``CallbackHandler``.

The monitor's state is saved in each checkpoint's ``trainer_state.json`` (stateful
callbacks) and read back by ``on_train_begin`` of a resumed run, with or without
``restore_callback_states_from_checkpoint``. Under DDP the ranks share the layers and agree
on a stop at the monitor's exchanges; the Trainer asks rank 0 alone for a checkpoint's
state, so every rank drains and exchanges at the end of a step whose ``control.should_save``
is set. FSDP and DeepSpeed are untested.

PEFT: by default the adapters only (kind ``"lora"``: each s * B @ A, r non-zero eigenvalues;
``min_evals=1`` so any r is analysed): the frozen base weights never change, so analysing them
at every snapshot would cost the most and show nothing new. ``peft_base_at_start=True``
analyses them once, at the start of a fresh run, under ``esdwatch/base/``. Giving
``layers``, ``types``, ``min_evals`` or ``selection`` keeps the user's choice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import sys
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from esdwatch.engine.layers import KINDS
from esdwatch.monitor import Monitor
from esdwatch.monitor.options import FrameworkOptions, MonitorOptions, takes_monitor_options
from esdwatch.sinks.factory import check_sink_options, shell_sinks

log = logging.getLogger("esdwatch.integrations.huggingface")

__all__ = ["ESDCallbackBase", "ESDCallback", "HuggingFaceOptions"]

#: where the monitor's state sits in the callback's entry of ``trainer_state.json``
STATE_KEY = "esdwatch_state"
_SELECTION = {"layers", "types", "min_evals", "selection"}


@dataclasses.dataclass(frozen=True)
class HuggingFaceOptions:
    """Options of the Hugging Face shell.

    Args:
        peft_base_at_start: on a peft model, also analyse the frozen base layers once, at the
            start of a fresh run (records and tags under esdwatch/base/).
    """

    peft_base_at_start: bool = False


class ESDCallbackBase:
    """Watch the weight spectra of the model while a ``transformers.Trainer`` trains it (see the module docstring)."""

    @takes_monitor_options(
        FrameworkOptions,
        HuggingFaceOptions,
        doc="""The Hugging Face Trainer callback of :class:`esdwatch.monitor.Monitor`.

    ``log_dir`` defaults to the Trainer's TensorBoard run directory, else
    ``<output_dir>/runs/<date>_<host>``; two callbacks on one Trainer need distinct ``name``s.""",
    )
    def __init__(self, **options: Any):
        super().__init__()
        self._given = dict(options)
        self.framework = FrameworkOptions(**_pop(options, FrameworkOptions))
        self.hf = HuggingFaceOptions(**_pop(options, HuggingFaceOptions))
        self.options = MonitorOptions.from_kwargs(**options)  # a bad option fails here, not mid-training
        check_sink_options(self.framework.sink_options)
        self._monitor: Monitor | None = None
        self._writer: Any = None  # the SummaryWriter esdwatch opened in the Trainer's TensorBoard run directory
        self._prepared: dict[str, Any] | None = None  # the state every rank agreed on for this step's checkpoint
        self._unrestorable: list[str] = []

    name = property(lambda self: self.options.name)
    log_dir = property(lambda self: self.options.log_dir)
    monitor = property(lambda self: self._monitor, doc="The Monitor of the current (or last) train() call.")

    # ------------------------------------------------------------------- hooks

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._close()
        callbacks = _trainer_callbacks(self)
        self._check_distinct(callbacks)
        self._monitor = mon = self._new_monitor(args, state, model, callbacks)
        self._restore(mon, args, state)
        mon.start(int(state.global_step), _epoch(state))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._monitor is not None:
            self._after(self._monitor.step(int(state.global_step), _epoch(state)), state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._monitor is not None:
            self._after(self._monitor.epoch_end(_epoch(state), int(state.global_step)), state, control)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._monitor is not None and getattr(args.save_strategy, "value", args.save_strategy) == "best":
            self._prepare_checkpoint()  # "best": whether to save is decided after this hook, on every rank

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._monitor is not None:
            self._monitor.finish(int(state.global_step))
            self._log_summary(state)
            self._close()

    def state(self) -> dict[str, Any]:
        """This callback's entry in ``trainer_state.json``: its JSON options and the monitor's state."""
        args = {k: _jsonable(v) for k, v in self._given.items()}
        self._unrestorable = sorted(k for k, v in args.items() if v is _NOT_JSON)
        return {
            "args": {k: v for k, v in args.items() if v is not _NOT_JSON},
            "attributes": {STATE_KEY: self._monitor_state(), "_unrestorable": self._unrestorable},
        }

    # ------------------------------------------------------------- decisions

    def _after(self, stop: bool, state: Any, control: Any) -> None:
        """After a step or epoch end: the agreed stop, the summary, and the state of a checkpoint coming now."""
        if stop:
            control.should_training_stop = True
        self._log_summary(state)
        self._prepared = None
        if control.should_save:
            self._prepare_checkpoint()

    def _prepare_checkpoint(self) -> None:
        # the Trainer asks rank 0 alone for state(); a drain is collective, so every rank does it here
        if self._monitor is not None and self._monitor.distributed:
            self._prepared = self._monitor.state_dict()

    def _monitor_state(self) -> dict[str, Any]:
        mon = self._monitor
        if self._prepared is not None or mon is None:
            return dict(self._prepared or {})
        return mon.state_dict(drain=not mon.distributed)  # a checkpoint nobody announced: no collective

    def _log_summary(self, state: Any) -> None:
        """The latest snapshot's model averages into the Trainer's log history, at the snapshot's step."""
        mon = self._monitor
        if mon is None or not self.framework.log_summary:
            return
        values = {f"{mon.summary_prefix}/{k}": float(v) for k, v in (mon.pop_summary() or {}).items() if _finite(v)}
        if values:
            state.log_history.append({**values, "step": int(mon.latest_step or 0)})

    def _options_for(self, model: Any) -> MonitorOptions:
        """PEFT: the adapters only (kind "lora", any rank), unless the user chose what to watch."""
        o = self.options
        if not _is_peft(model) or _SELECTION & set(self._given):
            return o
        return dataclasses.replace(o, selection=dataclasses.replace(o.selection, types=["lora"], min_evals=1))

    def _new_monitor(self, args: Any, state: Any, model: Any, callbacks: list[Any]) -> Monitor:
        rank, world = _rank(args), int(getattr(args, "world_size", 1))
        log_dir = str(self.log_dir or _tensorboard_dir(args, callbacks) or _default_run_dir(args))
        loggers = self._loggers(args, callbacks, log_dir) if self.framework.logger_sinks and rank == 0 else []
        opts = self._options_for(model)
        if self.hf.peft_base_at_start and _is_peft(model) and state.global_step == 0 and rank == 0:
            self._analyse_base_once(model, opts, log_dir, loggers)
        sinks = list(opts.sinks or []) + shell_sinks(loggers, name=self.name, sink_options=self._sink_options())
        fields = {f.name: getattr(opts, f.name) for f in dataclasses.fields(MonitorOptions)}
        return Monitor(
            model, **{**fields, "log_dir": log_dir, "sinks": sinks}, rank=rank, world_size=world, context=self
        )

    def _restore(self, mon: Monitor, args: Any, state: Any) -> None:
        """A resumed run: the monitor's state from the checkpoint's ``trainer_state.json``."""
        if state.global_step == 0:
            return
        if self._unrestorable and getattr(args, "restore_callback_states_from_checkpoint", False):
            log.warning("esdwatch: the Trainer rebuilt ESDCallback without %s (not JSON)", self._unrestorable)
        try:
            mon.load_state_dict(_saved_state(state, type(self).__name__, self.name) or {})
        except Exception as exc:  # a damaged entry: go on as a run continued without a state, never crash
            log.warning("esdwatch: could not restore the monitor's state (%s: %s)", type(exc).__name__, exc)

    def _analyse_base_once(self, model: Any, opts: MonitorOptions, log_dir: str, loggers: list[Any]) -> None:
        """The frozen base layers of a peft model, once (step 0, this process only), under ``esdwatch/base/``."""
        name = f"{self.name}/base" if self.name else "base"
        sel = dataclasses.replace(self.options.selection, types=sorted(KINDS - {"lora"}))
        # the main monitor's custom-scalars layout comes later (a writer takes one); the user's sinks stay open
        sinks = shell_sinks(loggers, name=name, sink_options={**self._sink_options(), "custom_scalars": False})
        fields = {f.name: getattr(opts, f.name) for f in dataclasses.fields(MonitorOptions)}
        fields.update(name=name, selection=sel, sinks=sinks, log_dir=log_dir, at_start=True, at_end=False)
        base = Monitor(model, **{**fields, "every_n_steps": None, "every_n_epochs": 2**31})  # never due after 0
        base.start(0)
        base.close(final=False)

    def _sink_options(self) -> dict[str, Any]:
        return {"step_metric": "train/global_step", **(self.framework.sink_options or {})}

    def _loggers(self, args: Any, callbacks: list[Any], log_dir: str) -> list[Any]:
        """Logger-like objects (``.experiment``) for the Trainer's TensorBoard run directory and W&B run."""
        out = []
        if _reports(args, "tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=_tensorboard_dir(args, callbacks) or log_dir)
            except Exception as exc:  # a dashboard is a convenience: records still go to records.jsonl
                log.warning("esdwatch: no TensorBoard writer (%s: %s)", type(exc).__name__, exc)
        if self._writer is not None:
            out.append(SimpleNamespace(experiment=self._writer))
        run = getattr(sys.modules.get("wandb"), "run", None)
        if _reports(args, "wandb") and run is not None:
            out.append(SimpleNamespace(experiment=run))
        return out

    def _check_distinct(self, callbacks: list[Any]) -> None:
        where = (self.log_dir, self.name)
        others = [(cb.log_dir, cb.name) for cb in callbacks if cb is not self and isinstance(cb, ESDCallbackBase)]
        if where in others:
            raise ValueError(f"esdwatch: two ESDCallbacks write to log_dir={where[0]!r}, name={where[1]!r}: name them")

    def _close(self) -> None:
        if self._monitor is not None:
            self._monitor.close(final=False)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ------------------------------------------------------------------ helpers

_NOT_JSON = object()


def _pop(options: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: options.pop(k) for k in list(options) if k in names}


def _jsonable(value: Any) -> Any:
    """The value as trainer_state.json can hold it (option groups as dicts), else ``_NOT_JSON``."""
    value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return _NOT_JSON


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))


def _rank(args: Any) -> int:
    return int(getattr(args, "process_index", 0))


def _epoch(state: Any) -> int:
    """The 0-based epoch index (``state.epoch`` is epochs done, fractional: 1.0 at the end of the first)."""
    return max(0, math.ceil(float(state.epoch or 0)) - 1)


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _reports(args: Any, integration: str) -> bool:
    report_to = getattr(args, "report_to", None) or []
    return integration in ([report_to] if isinstance(report_to, str) else report_to)


def _trainer_callbacks(me: Any) -> list[Any]:
    """The Trainer's callbacks: a hook gets no handle on them, so read the calling ``CallbackHandler``'s."""
    frame: Any = sys._getframe(1)
    for _ in range(4):
        if frame is None:
            break
        found = getattr(frame.f_locals.get("self"), "callbacks", None)
        if isinstance(found, list) and any(cb is me for cb in found):
            return list(found)
        frame = frame.f_back
    return []


def _tensorboard_dir(args: Any, callbacks: list[Any]) -> str | None:
    """The run directory of the Trainer's TensorBoardCallback (set by its ``on_train_begin``, on rank 0)."""
    if not _reports(args, "tensorboard"):
        return None
    for cb in callbacks:
        if hasattr(cb, "tb_writer"):
            found = getattr(cb, "logging_dir", None) or getattr(cb.tb_writer, "log_dir", None)
            if found:
                return str(found)
    return os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)


def _default_run_dir(args: Any) -> str:
    return os.path.join(args.output_dir, "runs", f"{datetime.now():%b%d_%H-%M-%S}_{socket.gethostname()}")


def _saved_state(state: Any, class_name: str, name: str | None) -> dict[str, Any] | None:
    """This callback's monitor state in a resumed ``TrainerState`` (the last entry with its name)."""
    entries = (getattr(state, "stateful_callbacks", None) or {}).get(class_name) or []
    entries = entries if isinstance(entries, list) else [entries]
    mine = [e for e in entries if isinstance(e, dict) and (e.get("args") or {}).get("name") == name]
    return (mine[-1].get("attributes") or {}).get(STATE_KEY) if mine else None


def _build() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError("ESDCallback needs transformers: pip install 'esdwatch[huggingface]'") from exc
    try:
        from transformers.trainer_callback import ExportableState

        bases: tuple[type, ...] = (ESDCallbackBase, TrainerCallback, ExportableState)
    except ImportError:  # transformers < 4.41: no stateful callbacks (a resume starts a new monitor)
        bases = (ESDCallbackBase, TrainerCallback)
    cls = type("ESDCallback", bases, {"__module__": __name__, "__doc__": ESDCallbackBase.__doc__})
    globals()["ESDCallback"] = cls
    return cls


def __getattr__(name: str) -> Any:
    if name == "ESDCallback":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
