"""Pathologies that need a layer's history: rules on the last few snapshots, as data.

:mod:`esdwatch.alarms.rules` judges one snapshot. The HT-SR pathologies below are
*changes*, so each rule here compares the current snapshot with a reference snapshot
``window`` snapshots back (the oldest one kept when fewer are known; nothing before two
snapshots). A condition therefore stays true for up to ``window`` snapshots after a
lasting change, which is what lets the policy's patience (consecutive snapshots) confirm
it, while a one-snapshot blip does not fire.

The history is compact and typed: a :class:`Snapshot` keeps, per layer, only the numbers
these rules read (:data:`HISTORY_METRICS`), so the rules are testable on synthetic
histories without a model or a Trainer, and the policy's checkpoint stays small.

In a run, the policy keeps each layer's own last analyses (:class:`LayerHistory`) and hands
each rule a two-snapshot history (:meth:`LayerHistory.view`): every layer's latest analysis,
and its analysis ``window`` analyses of that layer back. Without a layer rotation that is
exactly "the snapshot ``window`` back". With one (``layers_per_snapshot``, each layer
analysed every few snapshots) a snapshot ``window`` back holds other layers, so the rules
would compare nothing; the per-layer view compares each layer with its own analysis
``window`` analyses back, and the other layers' changes (the median of
:class:`ScaleJumpRule`, the neighbours of :class:`CorrelationFlowRule`) are their latest
ones. Every layer's change spans the same number of its analyses (``window``, fewer while
some layer has fewer behind it), so a steady growth does not look like a jump of the layer
analysed most often, and nothing is judged until every layer has been analysed twice (the
first round of a rotation); the policy keeps the alarms of the layers analysed in the
current snapshot. Counting in analyses keeps the patience working (a lasting change stays
raised for ``window`` analyses of the layer) and makes each layer of a rotation behave as
under a sparser schedule: a comparison spans more steps, so it sees larger changes
(measured in ``experiments/results/alarm_lead_time.md``).

Default history rules (:data:`DEFAULT_HISTORY_RULES`), measured in
``experiments/results/alarm_lead_time.md``
===================  ===========================================================  ========
kind                 fires when (current snapshot vs the one ``window`` back)     severity
===================  ===========================================================  ========
scale_collapse       the layer's change of log10 lambda_max differs from the      warning
                     median change of the other layers by >= 0.5 (a factor 3.2
                     in lambda_max, 1.8 in the spectral norm), and the layer moved
                     most among them
alpha_crossing       alpha was >= 2 and is now < 2, having dropped by >= 0.15     warning
                     (the README demo's first layer drifts across 2 by 0.10 in
                     3 snapshots, a healthy run; a learning-rate ramp: 0.17)
new_traps            >= 2 correlation traps now, none at the reference            warning
correlation_flow     the layer's alpha change differs from its neighbours' mean   warning
                     change by >= 1.0 and is the largest among them; alphas
                     above 6 (random-like, loose fits) are left out; needs
                     >= 3 such layers
===================  ===========================================================  ========

``scale_collapse`` fires at once (patience 1, :data:`esdwatch.alarms.policy.DEFAULT_PATIENCE_BY_KIND`):
its condition is already a 3.2-fold move against the other layers, and waiting a snapshot cost
half the lead time in the scale experiment without removing a false alarm (there was none);
the other kinds keep patience 2 (with 1, ``correlation_flow`` fired on a healthy twin at step 125).

Scale collapse, correlation flow and the traps are pathologies of Martin & Mahoney's HT-SR
list (weightwatcher's documentation, "Scale collapse", "Correlation flow", "Correlation
traps"); alpha < 2 is the very-heavy-tailed (over-fit) regime of Martin & Mahoney, JMLR
2021, and the layer signal of anti-grokking (Prakash & Martin, arXiv 2506.04434).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from esdwatch.schema import (
    ALPHA_CROSSING,
    CORRELATION_FLOW,
    NEW_TRAPS,
    SCALE_COLLAPSE,
    STATUS_OK,
    Alarm,
    LayerReport,
)

__all__ = [
    "DEFAULT_HISTORY_RULES",
    "HISTORY_METRICS",
    "AlphaCrossingRule",
    "CorrelationFlowRule",
    "HistoryRule",
    "LayerHistory",
    "NewTrapsRule",
    "ScaleJumpRule",
    "Snapshot",
    "evaluate_history",
]

#: the LayerReport fields a :class:`Snapshot` keeps per layer
HISTORY_METRICS: tuple[str, ...] = ("alpha", "log_spectral_norm", "num_traps")


def _num(v: Any) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


@dataclass(frozen=True)
class Snapshot:
    """The numbers of one snapshot the history rules read: layer -> metric -> value (NaN: unknown).

    Layers keep the snapshot's order (the model's order), which defines neighbours.
    ``steps``: the step of each layer's values where they differ from ``step`` (a view of
    :class:`LayerHistory`, whose layers were analysed at different steps).
    """

    step: int | None
    layers: Mapping[str, Mapping[str, float]]
    steps: Mapping[str, int | None] = field(default_factory=dict)

    def step_of(self, layer: str) -> int | None:
        """The step ``layer``'s values come from."""
        return self.steps.get(layer, self.step)

    @classmethod
    def from_reports(cls, reports: Iterable[LayerReport], step: int | None) -> Snapshot:
        """The ``ok`` layers of one analysis (a failed or degenerate layer is unknown here)."""
        return cls(step, {r.name: _metrics(r) for r in reports if r.status == STATUS_OK})

    def get(self, layer: str, metric: str) -> float:
        return _num(self.layers.get(layer, {}).get(metric, math.nan))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step,
            "layers": {n: {m: (v if math.isfinite(v) else None) for m, v in d.items()} for n, d in self.layers.items()},
        }
        if self.steps:
            out["steps"] = dict(self.steps)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        layers = {n: {m: _num(math.nan if v is None else v) for m, v in d.items()} for n, d in data["layers"].items()}
        return cls(data.get("step"), layers, dict(data.get("steps") or {}))


@runtime_checkable
class HistoryRule(Protocol):
    """A rule on the recent snapshots (oldest first); ``window`` is how far back it looks."""

    @property
    def kind(self) -> str: ...

    @property
    def severity(self) -> str: ...

    @property
    def window(self) -> int: ...

    def check_history(self, history: Sequence[Snapshot]) -> list[Alarm]: ...


def _metrics(report: LayerReport) -> dict[str, float]:
    """The numbers a history keeps of one analysis: NaN for a failed or degenerate one (unknown)."""
    ok = report.status == STATUS_OK
    return {m: _num(getattr(report, m, math.nan)) if ok else math.nan for m in HISTORY_METRICS}


@dataclass
class _Analysis:
    """One analysis of a layer: its step, the number of the snapshot it was in, its numbers."""

    step: int | None
    snapshot: int
    values: dict[str, float]


class LayerHistory:
    """Each layer's last ``depth`` analyses (step, snapshot number, :data:`HISTORY_METRICS`), in the model's order.

    :meth:`view` is what a history rule judges (module docstring). A failed or degenerate
    analysis counts as an analysis with unknown values, so "``window`` analyses back" is
    "``window`` snapshots back" when every snapshot analyses every layer.
    """

    def __init__(self, depth: int):
        self.depth = max(2, int(depth))
        self.snapshots = 0  # snapshots added so far
        self.entries: dict[str, list[_Analysis]] = {}

    def add(self, reports: Iterable[LayerReport], step: int | None) -> None:
        """The analyses of one snapshot (a subset of the layers under a rotation)."""
        for r in reports:
            kept = self.entries.setdefault(r.name, [])
            kept.append(_Analysis(step, self.snapshots, _metrics(r)))
            del kept[: -self.depth]
        self.snapshots += 1

    def keep_only(self, layers: Iterable[str]) -> None:
        """Forget the layers not in ``layers`` (removed from the model)."""
        present = set(layers)
        for name in [n for n in self.entries if n not in present]:
            del self.entries[name]

    def view(self, window: int, step: int | None) -> list[Snapshot]:
        """``[reference, current]`` for a rule looking ``window`` analyses back (``[]``: nothing to compare).

        Every layer is compared over the same number of its own analyses, the span:
        ``window``, or fewer while some layer has fewer analyses behind it; nothing before
        every layer has two (the first round of a rotation). A layer analysed for the first
        time in the current snapshot is left out (it has no change yet). Current = each
        layer's latest analysis, reference = the one ``span`` analyses before it. ``step``:
        the current snapshot's step.
        """
        judged = {n: e for n, e in self.entries.items() if not (len(e) == 1 and e[0].snapshot == self.snapshots - 1)}
        span = min([int(window), *(len(e) - 1 for e in judged.values())])
        if span < 1:
            return []
        ref = {n: e[-1 - span] for n, e in judged.items()}
        now = {n: e[-1] for n, e in judged.items()}
        known = [a.step for a in ref.values() if a.step is not None]
        return [
            Snapshot(min(known) if known else None, _values(ref), {n: a.step for n, a in ref.items()}),
            Snapshot(step, _values(now), {n: a.step for n, a in now.items()}),
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshots": self.snapshots,
            "layers": {
                n: [
                    [a.step, a.snapshot, {m: (v if math.isfinite(v) else None) for m, v in a.values.items()}] for a in e
                ]
                for n, e in self.entries.items()
            },
        }

    def load(self, data: Mapping[str, Any]) -> None:
        self.snapshots = int(data.get("snapshots", 0))
        self.entries = {
            n: [_Analysis(s, int(k), {m: _num(math.nan if v is None else v) for m, v in d.items()}) for s, k, d in e][
                -self.depth :
            ]
            for n, e in data.get("layers", {}).items()
        }

    def load_snapshots(self, snapshots: Iterable[Snapshot]) -> None:
        """Rebuild from the snapshots a checkpoint kept before the history was per layer."""
        self.entries, self.snapshots = {}, 0
        for snap in snapshots:
            for name, values in snap.layers.items():
                kept = self.entries.setdefault(name, [])
                kept.append(_Analysis(snap.step, self.snapshots, dict(values)))
                del kept[: -self.depth]
            self.snapshots += 1


def _values(analyses: Mapping[str, _Analysis]) -> dict[str, Mapping[str, float]]:
    return {n: a.values for n, a in analyses.items()}


def _pair(history: Sequence[Snapshot], window: int) -> tuple[Snapshot, Snapshot] | None:
    """(reference, current): the snapshot ``window`` back (or the oldest kept), and the last one."""
    if len(history) < 2:
        return None
    return history[max(0, len(history) - 1 - window)], history[-1]


def _change(ref: Snapshot, now: Snapshot, layer: str, metric: str) -> float:
    return now.get(layer, metric) - ref.get(layer, metric)


def _why(ref: Snapshot, now: Snapshot, layer: str) -> dict[str, Any]:
    return {"reference_step": ref.step_of(layer), "compared": [ref.step_of(layer), now.step_of(layer)]}


def _alarm(
    rule: HistoryRule,
    layer: str,
    value: float,
    threshold: float,
    message: str,
    ref: Snapshot,
    now: Snapshot,
    **extra: Any,
) -> Alarm:
    """``rule``'s alarm on ``layer`` at ``now``, saying which snapshots it compared (``extra``: the values)."""
    return Alarm(
        kind=rule.kind,
        layer=layer,
        value=value,
        threshold=threshold,
        severity=rule.severity,
        message=message,
        step=now.step,
        extra={**_why(ref, now, layer), **extra},
    )


@dataclass(frozen=True)
class ScaleJumpRule:
    """Scale collapse: a layer's log10 lambda_max moves against the other layers'.

    change_L = log_spectral_norm_L(now) - log_spectral_norm_L(reference); the rule fires on L
    when |change_L - median(change_others)| >= ``threshold`` and |change_L| is the largest
    of all layers' (with two layers, the one that moved). With one layer: |change_L| alone.
    """

    kind: str = SCALE_COLLAPSE
    threshold: float = 0.5
    window: int = 3
    severity: str = "warning"
    metric: str = "log_spectral_norm"

    def check_history(self, history: Sequence[Snapshot]) -> list[Alarm]:
        pair = _pair(history, self.window)
        if pair is None:
            return []
        ref, now = pair
        changes = {n: _change(ref, now, n, self.metric) for n in now.layers}
        changes = {n: c for n, c in changes.items() if math.isfinite(c)}
        biggest = max((abs(c) for c in changes.values()), default=0.0)
        out = []
        for name, c in changes.items():
            others = [v for n, v in changes.items() if n != name]
            rel = c - (statistics.median(others) if others else 0.0)
            if abs(rel) < self.threshold or abs(c) < biggest:
                continue
            direction = "up" if c > 0 else "down"
            message = (
                f"{name}: log10 lambda_max moved {direction} by {c:+.2f} since step {ref.step_of(name)} "
                f"({rel:+.2f} against the other layers' median, |.| >= {self.threshold:g})"
            )
            extra = {"from": ref.get(name, self.metric), "to": now.get(name, self.metric), "change": c}
            extra["others_median_change"] = statistics.median(others) if others else 0.0
            out.append(_alarm(self, name, rel, self.threshold, message, ref, now, **extra))
        return out


@dataclass(frozen=True)
class AlphaCrossingRule:
    """A layer's alpha crossing ``threshold`` (2) from above, by a drop of at least ``min_drop``."""

    kind: str = ALPHA_CROSSING
    threshold: float = 2.0
    min_drop: float = 0.15
    window: int = 3
    severity: str = "warning"

    def check_history(self, history: Sequence[Snapshot]) -> list[Alarm]:
        pair = _pair(history, self.window)
        if pair is None:
            return []
        ref, now = pair
        out = []
        for name in now.layers:
            a0, a1 = ref.get(name, "alpha"), now.get(name, "alpha")
            if not (math.isfinite(a0) and math.isfinite(a1)):
                continue
            if a0 >= self.threshold > a1 and a0 - a1 >= self.min_drop:
                message = (
                    f"{name}: alpha fell from {a0:.3g} (step {ref.step_of(name)}) to {a1:.3g}, "
                    f"below {self.threshold:g} (drop {a0 - a1:.2f} >= {self.min_drop:g})"
                )
                out.append(_alarm(self, name, a1, self.threshold, message, ref, now, **{"from": a0, "to": a1}))
        return out


@dataclass(frozen=True)
class NewTrapsRule:
    """Correlation traps appearing where there were none: >= ``min_traps`` now, 0 at the reference."""

    kind: str = NEW_TRAPS
    min_traps: int = 2
    window: int = 3
    severity: str = "warning"

    def check_history(self, history: Sequence[Snapshot]) -> list[Alarm]:
        pair = _pair(history, self.window)
        if pair is None:
            return []
        ref, now = pair
        out = []
        for name in now.layers:
            t0, t1 = ref.get(name, "num_traps"), now.get(name, "num_traps")
            if t0 != 0 or not (t1 >= self.min_traps):  # -1 (test off) and NaN never fire
                continue
            message = f"{name}: {t1:.0f} correlation traps, none at step {ref.step_of(name)} (>= {self.min_traps})"
            out.append(_alarm(self, name, t1, float(self.min_traps), message, ref, now, **{"from": t0, "to": t1}))
        return out


@dataclass(frozen=True)
class CorrelationFlowRule:
    """Correlation flow broken: a layer's alpha moves away from its neighbours' (the adjacent analysed layers).

    change_L = alpha_L(now) - alpha_L(reference); fires on L when
    |change_L - mean(change of its neighbours)| >= ``threshold`` and |change_L| >= every
    neighbour's |change|. Layers with alpha above ``max_alpha`` at either end are left out
    (random-like layers, whose fits move a lot early in training), and fewer than
    ``min_layers`` layers left judge nothing: with two, "breaking from the neighbours" cannot
    say which layer broke (the anti-grokking MLP, two analysed layers with noisy 64- and
    200-eigenvalue fits, raised it during healthy grokking).
    """

    kind: str = CORRELATION_FLOW
    threshold: float = 1.0
    window: int = 3
    max_alpha: float = 6.0
    min_layers: int = 3
    severity: str = "warning"

    def check_history(self, history: Sequence[Snapshot]) -> list[Alarm]:
        pair = _pair(history, self.window)
        if pair is None:
            return []
        ref, now = pair
        names, changes = [], []
        for name in now.layers:
            a0, a1 = ref.get(name, "alpha"), now.get(name, "alpha")
            if math.isfinite(a0) and math.isfinite(a1) and max(a0, a1) <= self.max_alpha:
                names.append(name)
                changes.append(a1 - a0)
        out: list[Alarm] = []
        if len(names) < self.min_layers:
            return out
        for i, name in enumerate(names):
            nbrs = [changes[j] for j in (i - 1, i + 1) if 0 <= j < len(names)]
            if not nbrs:
                continue
            rel = changes[i] - sum(nbrs) / len(nbrs)
            if abs(rel) < self.threshold or abs(changes[i]) < max(abs(c) for c in nbrs):
                continue
            message = (
                f"{name}: alpha changed by {changes[i]:+.2f} since step {ref.step_of(name)}, its neighbours by "
                f"{sum(nbrs) / len(nbrs):+.2f} on average (break {rel:+.2f}, |.| >= {self.threshold:g})"
            )
            extra: dict[str, Any] = {"from": ref.get(name, "alpha"), "to": now.get(name, "alpha")}
            extra["neighbours"] = [names[j] for j in (i - 1, i + 1) if 0 <= j < len(names)]
            out.append(_alarm(self, name, rel, self.threshold, message, ref, now, **extra))
        return out


#: The default history rules (table in the module docstring).
DEFAULT_HISTORY_RULES: tuple[HistoryRule, ...] = (
    ScaleJumpRule(),
    AlphaCrossingRule(),
    NewTrapsRule(),
    CorrelationFlowRule(),
)


def evaluate_history(history: Sequence[Snapshot], rules: Sequence[HistoryRule] | None = None) -> list[Alarm]:
    """Alarms raised on the last snapshot of ``history`` (oldest first) by ``rules`` (default: the defaults)."""
    rules = DEFAULT_HISTORY_RULES if rules is None else tuple(rules)
    out: list[Alarm] = []
    for rule in rules:
        out.extend(rule.check_history(history))
    return out
