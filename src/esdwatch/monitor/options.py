"""Every option of the monitor, documented and checked in one place.

:class:`MonitorOptions` is the monitor's whole configuration: the common options flat
(``every_n_steps=200``, ``layers=``, ``log_dir=`` ...) and the advanced ones in three
typed groups, :class:`LayerSelection`, :class:`AnalysisOptions` and
:class:`ExecutionOptions`. It is checked once, when it is built; :class:`~esdwatch.monitor.Monitor`
and every framework shell take the same keywords (their signature is stamped from this
module by :func:`takes_monitor_options`), so the signature and its documentation exist
once. A group's field may also be given flat (``Monitor(model, traps=False, max_pending=4)``
means ``analysis=AnalysisOptions(traps=False), execution=ExecutionOptions(max_pending=4)``);
:meth:`MonitorOptions.from_kwargs` folds such keywords into their group.

LightningCLI (``configs/esdwatch.yaml``) reads the groups as nested mappings::

    init_args:
      every_n_steps: 200
      analysis: {traps: false}
      execution: {max_pending: 2}
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from esdwatch.alarms.policy import Action, AlarmPolicy, AnyRule
from esdwatch.engine.analyzer import AnalysisConfig
from esdwatch.engine.spectrum import Method
from esdwatch.engine.tail_laws import check_fit

__all__ = [
    "AnalysisOptions",
    "ExecutionOptions",
    "FrameworkOptions",
    "LayerSelection",
    "MonitorOptions",
    "takes_monitor_options",
]

WORKER_KINDS: tuple[str, ...] = ("thread", "process")
BACKPRESSURE: tuple[str, ...] = ("skip", "block")
_DTYPES = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32}


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    key = str(value).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be 'float64' or 'float32', got {value!r}")
    return _DTYPES[key]


@dataclass(frozen=True)
class LayerSelection:
    """Which weight matrices are watched, beyond ``layers``/``exclude`` (as :func:`esdwatch.analyze`).

    Args:
        types: layer kinds to watch ("linear", "conv2d", "embedding", "attention", ...); None: all.
        min_evals: skip matrices whose ESD has fewer eigenvalues (min(N, M)).
        max_evals: skip matrices whose ESD has more eigenvalues (None: no limit).
        conv_mode: "pooled" (one ESD per conv layer) or "slices" (one per kernel position).
        conv2d_norm: weightwatcher's Conv2d normalization.
    """

    types: list[str] | None = None
    min_evals: int = 50
    max_evals: int | None = 15000
    conv_mode: Literal["pooled", "slices"] = "pooled"
    conv2d_norm: bool = True

    def __post_init__(self) -> None:
        _positive_int("min_evals", self.min_evals)
        _positive_int("max_evals", self.max_evals, allow_none=True)
        _choice("conv_mode", self.conv_mode, ("pooled", "slices"))

    def find_layers_kwargs(self, layers: Any, exclude: Any) -> dict[str, Any]:
        """Keyword arguments of :func:`esdwatch.engine.layers.find_layers`."""
        return dict(
            include=layers,
            exclude=exclude,
            types=self.types,
            min_evals=self.min_evals,
            max_evals=self.max_evals,
            conv_mode=self.conv_mode,
            conv2d_norm=self.conv2d_norm,
        )


@dataclass(frozen=True)
class AnalysisOptions:
    """What is computed for each matrix (:class:`esdwatch.engine.analyzer.AnalysisConfig`).

    Args:
        dtype: eigenvalue precision, "float64" or "float32".
        device: where the analysis runs (None: on CPU copies; "cuda": on the GPU, on a side
            stream, thread worker only).
        method: eigenvalue route, "auto", "gram", "svd" or "mixed" (float32 Gram product,
            float64 eigenvalues: esdwatch.engine.spectrum).
        spectrum: "exact" (every eigenvalue), "tail" (certified top eigenvalues, estimated
            bulk: esdwatch.engine.tail) or "auto" (tail for large matrices, M >= 2048 on
            a CPU, 8192 on a GPU; records say which metrics are estimated).
        mp_fit: fit the Marchenko-Pastur bulk (lambda_plus, soft rank, spikes).
        phases: classify each layer's phase of training (the 5+1 phases).
        traps: run the correlation-trap test (one more eigendecomposition per layer).
        xmin: fix the power-law x_min instead of scanning it.
        xmax: fix the power-law x_max.
        fix_fingers: put x_min at the peak of the log-ESD (weightwatcher's xmin_peak).
        fit: "PL" (default, the power law only), "TPL" (also the truncated power law and the
            best tail law: PL, TPL, lognormal or exponential) or "E_TPL" (the same above the
            ESD-peak x_min); TPL/E_TPL need powerlaw (the fits extra) and cost 0.1-0.3 s per
            layer on the worker (esdwatch.engine.tail_laws).
        seed: seed of the trap test's randomization.
        analyze_fn: replaces esdwatch.engine.analyzer.analyze_layers (picklable for
            worker="process").
    """

    dtype: Literal["float64", "float32"] = "float64"
    device: str | None = None
    method: Method = "auto"
    spectrum: Literal["exact", "tail", "auto"] = "exact"
    mp_fit: bool = True
    phases: bool = True
    traps: bool = True
    xmin: float | None = None
    xmax: float | None = None
    fix_fingers: bool = False
    fit: Literal["PL", "TPL", "E_TPL"] = "PL"
    seed: int = 0
    analyze_fn: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        _dtype(self.dtype)
        _choice("method", self.method, get_args(Method))
        check_fit(self.fit)
        _choice("spectrum", self.spectrum, ("exact", "tail", "auto"))
        if self.analyze_fn is not None and not callable(self.analyze_fn):
            raise TypeError(f"analyze_fn must be callable, got {type(self.analyze_fn).__name__}")

    def config(self, keep_evals: bool) -> AnalysisConfig:
        """The engine's configuration for these options."""
        return AnalysisConfig(
            dtype=_dtype(self.dtype),
            device=None if self.device is None else str(self.device),
            method=self.method,
            spectrum=self.spectrum,
            xmin=self.xmin,
            xmax=self.xmax,
            fix_fingers=self.fix_fingers,
            fit=self.fit,
            mp_fit=self.mp_fit,
            phases=self.phases,
            traps=self.traps,
            keep_evals=keep_evals,
            seed=self.seed,
        )

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and str(self.device).startswith("cuda")


@dataclass(frozen=True)
class ExecutionOptions:
    """How the background analysis runs (:mod:`esdwatch.monitor.worker`).

    Args:
        worker: "thread" (default: no start-up cost, no copy; the analysis kernels release
            the GIL) or "process" (for Python-heavy analyze_fn). Why the defaults:
            experiments/results/worker_defaults.md.
        max_pending: snapshots in flight (copied, not yet handed back) at most; None (default):
            as many as max_pending_bytes holds.
        max_pending_bytes: bytes of copied weights in flight at most; None (default): a quarter of
            the memory available when training starts (host memory, or the GPU's with
            device="cuda"), at most 4 GiB. One snapshot is always allowed, whatever its size.
        on_backpressure: when a scheduled snapshot does not fit (the worker is behind by more
            than the budget): "skip" (skip it, count it in stats["skipped"] and note it with its
            reason in skipped_snapshots.jsonl) or "block" (wait for room, at most drain_timeout).
        drain_timeout: seconds to wait for pending analyses at the end, at a checkpoint and
            after an exception (None: no limit).
        worker_nice: niceness added to the worker (0: share the cores fairly; a niced worker
            is starved on a saturated CPU).
        worker_threads: intra-op threads of the worker (None: leave torch's count).
        drain_on_checkpoint: finish the snapshots in flight before a checkpoint is saved, so
            a checkpoint never refers to records that are not on disk.
    """

    worker: Literal["thread", "process"] = "thread"
    max_pending: int | None = None
    max_pending_bytes: int | None = None
    on_backpressure: Literal["skip", "block"] = "skip"
    drain_timeout: float | None = 120.0
    worker_nice: int = 0
    worker_threads: int | None = 1
    drain_on_checkpoint: bool = True

    def __post_init__(self) -> None:
        _choice("worker", self.worker, WORKER_KINDS)
        for name in ("max_pending", "max_pending_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        _choice("on_backpressure", self.on_backpressure, BACKPRESSURE)
        if self.drain_timeout is not None and not (float(self.drain_timeout) >= 0):
            raise ValueError(f"drain_timeout must be >= 0 seconds or None, got {self.drain_timeout!r}")
        _positive_int("worker_threads", self.worker_threads, allow_none=True)


_GROUPS: dict[str, type] = {"selection": LayerSelection, "analysis": AnalysisOptions, "execution": ExecutionOptions}


@dataclass(frozen=True)
class MonitorOptions:
    """The monitor's options (checked when built; a bad value is a ValueError/TypeError now, not mid-run).

    Args:
        every_n_steps: snapshot every n optimizer steps, or "auto" to space snapshots so the
            analysis costs at most max_overhead of the training time. Exactly one of
            every_n_steps / every_n_epochs ("auto" if neither).
        every_n_epochs: snapshot at the end of every n-th training epoch.
        at_start: also snapshot the initial weights (global step 0, fresh runs only).
        at_end: also snapshot the final weights after the last step.
        max_overhead: the training-time fraction the analysis may cost under "auto".
        layers_per_snapshot: None (default): every snapshot analyses every watched layer. An int
            n: each snapshot takes the n layers analysed longest ago (round-robin; a model of L
            layers is covered every ceil(L / n) snapshots). "auto": as many of those as fit in
            max_overhead of the training time the snapshot is paid from (the steps since the
            previous snapshot; under every_n_steps="auto", all steps so far), from each layer's
            measured analysis time, at least one layer, and at most half of max_pending_bytes.
            Each record's global_step is the step its layer was copied; summaries use each
            layer's latest values (esdwatch.monitor.rotation).
        layers: name patterns of the matrices to watch (globs, or "re:" regexes).
        exclude: name patterns to leave out.
        keep_evals: hand each layer's eigenvalues to the sinks, so the dashboards show the
            spectra (log10-eigenvalue histograms, the measured ESD in the figures), and write
            their 64-bin log10 histograms to spectra.jsonl next to records.jsonl (default
            True; per layer and snapshot, whatever the layer's size, about 0.3 kB in
            spectra.jsonl and 1.1 kB in a TensorBoard event file; no raw eigenvalues are
            written). False: scalars only.
        alarm_rules: threshold rules (AlarmRule) and history rules (HistoryRule); default
            esdwatch.alarms.DEFAULT_RULES + DEFAULT_HISTORY_RULES.
        alarm_patience: consecutive snapshots before an alarm fires (an int, or per alarm kind).
        alarm_actions: per alarm kind: "log", "warn", "stop" or a callable (context, alarm) -> None
            (context: the Trainer under Lightning, the ESDCallback under Hugging Face, the Monitor
            in a plain loop).
        phase_transitions: emit informational phase_transition alarms.
        log_dir: records go to <log_dir>/esdwatch/ (a framework shell defaults it to its
            logger's directory); None in a plain loop: no files.
        name: distinguishes two monitors on one model or logger (output sub-directory
            esdwatch/<name>/, summary keys and logger tags esdwatch/<name>/...).
        sinks: extra sinks (objects with write(records, step), alarm(alarm), close()).
        strict: re-raise analysis, sink and alarm-action failures in the training loop.
        verbose: print a summary when training ends (the last snapshot's layers with phase,
            alpha and alarms; the alarms by kind; what was skipped; where the records are).
        selection: which matrices are watched (LayerSelection).
        analysis: what is computed for each matrix (AnalysisOptions).
        execution: how the background analysis runs (ExecutionOptions).
    """

    every_n_steps: int | Literal["auto"] | None = None
    every_n_epochs: int | None = None
    at_start: bool = False
    at_end: bool = True
    max_overhead: float = 0.05
    layers_per_snapshot: int | Literal["auto"] | None = None
    layers: str | list[str] | None = None
    exclude: str | list[str] | None = None
    keep_evals: bool = True
    alarm_rules: list[AnyRule] | None = None
    alarm_patience: int | dict[str, int] | None = None
    alarm_actions: dict[str, str | Callable[[Any, Any], None]] | None = None
    phase_transitions: bool = True
    log_dir: str | None = None  # or any os.PathLike
    name: str | None = None
    sinks: list[Any] | None = None
    strict: bool = False
    verbose: bool = True
    selection: LayerSelection = field(default_factory=LayerSelection)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and self.every_n_epochs is not None:
            raise ValueError("give exactly one of every_n_steps and every_n_epochs, not both")
        if self.every_n_steps is None and self.every_n_epochs is None:
            object.__setattr__(self, "every_n_steps", "auto")
        if self.every_n_steps not in (None, "auto"):
            if (
                isinstance(self.every_n_steps, bool)
                or not isinstance(self.every_n_steps, int)
                or self.every_n_steps < 1
            ):
                raise ValueError(f"every_n_steps must be a positive int or 'auto', got {self.every_n_steps!r}")
        if self.every_n_epochs is not None:
            _positive_int("every_n_epochs", self.every_n_epochs)
        if self.layers_per_snapshot != "auto":
            _positive_int("layers_per_snapshot", self.layers_per_snapshot, allow_none=True)
        if not (0 < float(self.max_overhead) < 1):
            raise ValueError(f"max_overhead must be a fraction in (0, 1), got {self.max_overhead!r}")
        for name, group in _GROUPS.items():
            value = getattr(self, name)
            if value is None:  # the signature's default: the group's defaults
                object.__setattr__(self, name, group())
            elif isinstance(value, dict):  # a mapping from YAML or a user: the group's own checks run
                object.__setattr__(self, name, group(**value))
            elif not isinstance(value, group):
                raise TypeError(f"{name} must be a {group.__name__} (or a dict of its fields), got {value!r}")
        if self.analysis.on_gpu and self.execution.worker == "process":
            raise ValueError("device='cuda' analyses on the GPU from the training process: use worker='thread'")
        self.alarm_policy()  # the alarm kinds, actions and patience are checked by the policy itself

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> MonitorOptions:
        """Build from keywords, a group's fields also accepted flat (``traps=False``).

        A keyword that is neither an option nor a field of a group is a TypeError, as for
        any Python function; a field given both flat and in its group is a ValueError.
        """
        own = {f.name for f in dataclasses.fields(cls)}
        grouped: dict[str, dict[str, Any]] = {}
        for key in [k for k in kwargs if k not in own]:
            group = next((g for g, c in _GROUPS.items() if key in {f.name for f in dataclasses.fields(c)}), None)
            if group is None:
                raise TypeError(f"unexpected keyword argument {key!r} (options: {sorted(own | _FLAT_FIELDS)})")
            grouped.setdefault(group, {})[key] = kwargs.pop(key)
        for group, values in grouped.items():
            given = kwargs.get(group)
            if given is None:
                kwargs[group] = _GROUPS[group](**values)
            else:
                base = dataclasses.asdict(given) if not isinstance(given, dict) else dict(given)
                both = sorted(set(base) & set(values)) if isinstance(given, dict) else []
                if both:
                    raise ValueError(f"{both} given both flat and in {group}=")
                kwargs[group] = _GROUPS[group](**{**base, **values})
        return cls(**kwargs)

    def alarm_policy(self) -> AlarmPolicy:
        """A fresh :class:`~esdwatch.alarms.AlarmPolicy` for these options."""
        actions: dict[str, Action] | None = None if self.alarm_actions is None else dict(self.alarm_actions)
        return AlarmPolicy(self.alarm_rules, self.alarm_patience, actions, self.phase_transitions)

    @property
    def find_layers_kwargs(self) -> dict[str, Any]:
        return self.selection.find_layers_kwargs(self.layers, self.exclude)

    @property
    def analysis_config(self) -> AnalysisConfig:
        return self.analysis.config(self.keep_evals)


_FLAT_FIELDS: set[str] = {f.name for c in _GROUPS.values() for f in dataclasses.fields(c)}


@dataclass(frozen=True)
class FrameworkOptions:
    """Options of a framework shell (Lightning, Hugging Face), on top of :class:`MonitorOptions`.

    Args:
        logger_sinks: also write to the framework's loggers (TensorBoard, W&B, CSV, MLflow ...),
            through esdwatch.sinks.sinks_for_loggers.
        sink_options: keyword options for those sinks (figure_every, hist_bins, ...); an option
            no sink knows is an error at setup.
        log_summary: log the model-level averages as esdwatch/summary/<metric> through the
            framework (Lightning: pl_module.log, so checkpoint and early-stopping callbacks
            can monitor them; Hugging Face: the Trainer's log history).
    """

    logger_sinks: bool = True
    sink_options: dict[str, Any] | None = None
    log_summary: bool = True


def _parameters(cls: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None  # groups: None means defaults
        annotation = hints[f.name]
        if f.name in _GROUPS:
            annotation = annotation | None
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return out


def takes_monitor_options(*extra: type, doc: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give an ``__init__(self, [positional ...,] **options)`` the signature and docs of the options.

    The signature is the function's own positional parameters, every field of
    :class:`MonitorOptions` and of each class in ``extra`` (e.g. :class:`FrameworkOptions`),
    keyword-only, then the function's own keyword-only parameters; ``help()``, IDEs that use
    ``inspect.signature`` and LightningCLI (jsonargparse) read it. ``doc`` is put in front of
    the options' ``Args`` section.
    """

    def stamp(init: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(init).parameters.values())
        positional = [p for p in own if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        keyword = [p for p in own if p.kind is p.KEYWORD_ONLY]
        params = positional + [p for cls in (MonitorOptions, *extra) for p in _parameters(cls)] + keyword
        init.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # read by inspect.signature
        args = []  # one Args section: every option, in signature order
        for cls in (MonitorOptions, *extra):
            text = inspect.cleandoc(cls.__doc__ or "")
            args.append(text.split("Args:", 1)[1].strip("\n") if "Args:" in text else "")
        init.__doc__ = (inspect.cleandoc(doc) + "\n\n" if doc else "") + "Args:\n" + "\n".join(a for a in args if a)
        return init

    return stamp
