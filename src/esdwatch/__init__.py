"""esdwatch: live heavy-tailed self-regularization monitoring of weight spectra.

The engine (:func:`analyze`, :func:`fit_power_law`, :func:`classify` ...) imports only
torch, numpy and scipy. The monitor, its Lightning callback and its Hugging Face Trainer
callback are loaded on first use, so ``import esdwatch`` never imports Lightning,
transformers, TensorBoard or W&B.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily on first attribute access)
_EXPORTS: dict[str, str] = {
    "analyze": "esdwatch.engine.analyzer",
    "analyze_matrix": "esdwatch.engine.analyzer",
    "analyze_layers": "esdwatch.engine.analyzer",
    "AnalysisConfig": "esdwatch.engine.analyzer",
    "LayerReport": "esdwatch.schema",
    "ModelReport": "esdwatch.engine.model_report",
    "SkippedLayer": "esdwatch.schema",
    "LayerRecord": "esdwatch.schema",
    "fit_power_law": "esdwatch.engine.powerlaw",
    "PowerLawFit": "esdwatch.engine.powerlaw",
    "fit_mp": "esdwatch.engine.mp",
    "MPFit": "esdwatch.engine.mp",
    "eigenvalues": "esdwatch.engine.spectrum",
    "find_layers": "esdwatch.engine.layers",
    "LayerMatrix": "esdwatch.engine.layers",
    "Alarm": "esdwatch.schema",
    "AlarmRule": "esdwatch.alarms.rules",
    "Phase": "esdwatch.schema",
    "PhaseThresholds": "esdwatch.engine.phases",
    "PhaseResult": "esdwatch.engine.phases",
    "classify": "esdwatch.engine.phases",
    "correlation_traps": "esdwatch.engine.traps",
    "TrapResult": "esdwatch.engine.traps",
    "Monitor": "esdwatch.monitor.monitor",
    "EsdwatchError": "esdwatch.errors",
    "EsdwatchWarning": "esdwatch.errors",
    "AlarmPolicy": "esdwatch.alarms.policy",
    "evaluate_alarms": "esdwatch.alarms.rules",
    "ESDMonitor": "esdwatch.lightning",
    "ESDCallback": "esdwatch.integrations.huggingface",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'esdwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
