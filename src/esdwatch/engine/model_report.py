"""The analysis of a whole model, as :func:`esdwatch.analyze` returns it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esdwatch.alarms.rules import evaluate_alarms
from esdwatch.schema import NAN, SUMMARY_METRICS, LayerReport, SkippedLayer, summarize

__all__ = ["ModelReport"]


@dataclass(frozen=True)
class ModelReport:
    """The analysis of a whole model: analysed layers (in model order) and skipped ones."""

    layers: tuple[LayerReport, ...]
    skipped: tuple[SkippedLayer, ...] = ()
    elapsed_s: float = NAN

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, name_or_index: str | int) -> LayerReport:
        if isinstance(name_or_index, int):
            return self.layers[name_or_index]
        for layer in self.layers:
            if layer.name == name_or_index:
                return layer
        raise KeyError(name_or_index)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def summary(self, metrics: Sequence[str] = SUMMARY_METRICS) -> dict[str, float]:
        """Layer averages <metric> over layers with a finite value (NaN if none)."""
        return summarize(self.layers, metrics)

    def to_records(self) -> list[dict[str, Any]]:
        """One plain JSON-serializable dict per analysed layer, in model order."""
        return [layer.to_dict() for layer in self.layers]

    def to_pandas(self):
        """A pandas DataFrame with one row per analysed layer (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on environment
            raise ImportError("ModelReport.to_pandas() needs pandas: pip install 'esdwatch[all]'") from exc
        return pd.DataFrame.from_records(self.to_records())

    def alarms(self, rules=None) -> list:
        """Typed alarm records for this report (see :mod:`esdwatch.alarms.rules`)."""
        return evaluate_alarms(self.layers, rules=rules)
