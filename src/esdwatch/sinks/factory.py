"""Sinks for a Trainer's loggers, chosen by what each logger can do, not by its class.

For each logger, in order:

1. ``logger.experiment`` has ``add_histogram_raw`` and ``add_scalar`` (a TensorBoard
   SummaryWriter: Lightning's TensorBoardLogger, tensorboardX) ->
   :class:`~esdwatch.sinks.tensorboard.TensorBoardSink`;
2. ``logger.experiment`` has ``log`` and ``define_metric`` (a W&B run: WandbLogger) ->
   :class:`~esdwatch.sinks.wandb.WandbSink`;
3. the logger has ``log_metrics`` (CSVLogger, MLFlowLogger, CometLogger, ...) ->
   :class:`~esdwatch.sinks.metrics_logger.MetricsLoggerSink`;
4. otherwise nothing (debug log).

A logger whose experiment cannot be created because a package is missing is skipped
with one warning naming the extra to install; no sink failure here stops training.

``name`` is the monitor's name (``ESDMonitor(name=...)`` passes its own): every sink
then writes under ``esdwatch/<name>/...``, the prefix of that monitor's records
directory and summary keys, so two monitors sharing one logger (one TensorBoard
writer, one W&B run) never write the same tag.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

log = logging.getLogger("esdwatch.sinks")

__all__ = ["check_sink_options", "shell_sinks", "sinks_for_loggers", "sink_for_logger", "sink_options"]

_HINTS = {
    "tensorboard": "pip install 'esdwatch[tensorboard]'",
    "wandb": "pip install 'esdwatch[wandb]'",
    "mlflow": "pip install mlflow",
    "comet": "pip install comet-ml",
    "neptune": "pip install neptune",
}


def _classes() -> dict[str, type]:
    from esdwatch.sinks.metrics_logger import MetricsLoggerSink
    from esdwatch.sinks.tensorboard import TensorBoardSink
    from esdwatch.sinks.wandb import WandbSink

    return {"tensorboard": TensorBoardSink, "wandb": WandbSink, "metrics": MetricsLoggerSink}


def _keywords(cls: type[Any]) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def sink_options() -> dict[str, set[str]]:
    """The keyword options each sink kind accepts (``sinks_for_loggers(**options)``)."""
    return {kind: _keywords(cls) for kind, cls in _classes().items()}


def _is_tensorboard(exp: Any) -> bool:
    return (
        exp is not None
        and callable(getattr(exp, "add_histogram_raw", None))
        and callable(getattr(exp, "add_scalar", None))
    )


def _is_wandb(exp: Any) -> bool:
    return exp is not None and callable(getattr(exp, "log", None)) and callable(getattr(exp, "define_metric", None))


def _hint(logger: Any, exc: BaseException) -> str:
    text = f"{type(logger).__name__} {exc}".lower()
    for key, hint in _HINTS.items():
        if key in text:
            return hint
    return "install the package it names"


def sink_for_logger(logger: Any, *, name: str | None = None, **options: Any) -> Any | None:
    """The sink for one logger (None when esdwatch cannot write to it); ``name``: the monitor's."""
    if name is not None:
        options["name"] = name
    kinds = _classes()
    accepted = sink_options()
    try:
        exp = getattr(logger, "experiment", None)
    except ImportError as exc:
        log.warning(
            "esdwatch: %s is unusable (%s): %s; esdwatch writes nothing to it",
            type(logger).__name__,
            exc,
            _hint(logger, exc),
        )
        return None
    except Exception as exc:  # an experiment that cannot start: not esdwatch's to fix
        log.warning(
            "esdwatch: %s.experiment failed (%s: %s); esdwatch writes only log_metrics to it",
            type(logger).__name__,
            type(exc).__name__,
            exc,
        )
        exp = None
    if _is_tensorboard(exp):
        kind, target = "tensorboard", exp
    elif _is_wandb(exp):
        kind, target = "wandb", exp
    elif callable(getattr(logger, "log_metrics", None)):
        kind, target = "metrics", logger
    else:
        log.debug("esdwatch: no sink for logger %s", type(logger).__name__)
        return None
    opts = {k: v for k, v in options.items() if k in accepted[kind]}
    try:
        return kinds[kind](target, **opts)
    except ImportError as exc:
        log.warning("esdwatch: no %s sink for %s: %s", kind, type(logger).__name__, exc)
        return None


def sinks_for_loggers(loggers: Any, *, name: str | None = None, **options: Any) -> list[Any]:
    """One sink per logger that esdwatch can write to (see the module docstring).

    ``loggers``: a Trainer's ``trainer.loggers`` (a list), one logger, or None.
    ``name``: the monitor's name; tags go under ``esdwatch/<name>/`` (None: ``esdwatch/``;
    an explicit ``prefix`` option wins). ``options`` are keyword options of the sink
    classes (``figure_every``, ``prefix``, ``histograms``, ``hist_bins``, ``summary``,
    ``alerts`` ...); each sink takes those it knows. An option no sink knows is a TypeError.
    """
    if name is not None:
        options["name"] = name
    unknown, known = _unknown(options)
    if unknown:
        raise TypeError(f"unknown sink option(s) {unknown}; known: {known}")
    if loggers is None:
        return []
    if not isinstance(loggers, (list, tuple)):
        loggers = [loggers]
    sinks = []
    for logger in loggers:
        sink = sink_for_logger(logger, **options)
        if sink is not None:
            sinks.append(sink)
    return sinks


def _unknown(options: Any) -> tuple[list[str], list[str]]:
    known = set().union(*sink_options().values())
    return sorted(set(options) - known), sorted(known)


def check_sink_options(options: Any) -> None:
    """A framework shell's ``sink_options``: an option no sink knows is a ValueError (at construction)."""
    unknown, known = _unknown(options or {})
    if unknown:
        raise ValueError(f"unknown sink_options {unknown}; known: {known}")


def shell_sinks(loggers: Any, *, name: str | None, sink_options: Any) -> list[Any]:
    """The sinks a framework shell adds for its loggers (rank 0, at setup).

    The monitor's ``name`` reaches the sinks, so two monitors on one logger write under
    ``esdwatch/<name>/...``, as their records and summaries do (an explicit ``name`` or
    ``prefix`` in ``sink_options`` wins). A logger esdwatch cannot write to costs a warning,
    never the training: records still go to ``records.jsonl``.
    """
    options = dict(sink_options or {})
    if name and "name" not in options:
        options["name"] = name
    try:
        return sinks_for_loggers(loggers, **options)
    except TypeError as exc:  # an unknown sink option: the user's configuration error
        if sink_options:
            raise ValueError(f"esdwatch: bad sink_options {sink_options}: {exc}") from exc
        raise
    except Exception as exc:
        log.warning(
            "esdwatch: could not build sinks for the loggers (%s: %s); records still go to records.jsonl",
            type(exc).__name__,
            exc,
        )
        return []
