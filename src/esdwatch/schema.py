"""The typed records every part of esdwatch shares, and their vocabulary.

One schema flows from the engine through the monitor's worker to every sink:

* :class:`LayerReport`: the spectral metrics of one weight matrix (the engine's output);
* :class:`LayerRecord`: one LayerReport at one training step (a line of ``records.jsonl``);
* :class:`Alarm`: one layer crossing one threshold (a line of ``alarms.jsonl``);
* :class:`SkippedLayer`: a matrix that was found but not analysed, and why;
* :class:`Log10Histogram`: one layer's ESD as a histogram of log10 eigenvalues (the
  rest of a line of ``spectra.jsonl``), made by :func:`log10_histogram`.

and the one vocabulary of each concept: layer statuses (``STATUS_*``), the 5+1 phases
of training (:class:`Phase`, :data:`PHASES`, :func:`phase_name`, :func:`phase_ordinal`), the alarm kinds
(:data:`ALARM_KINDS`) and the model-level summary metrics (:data:`SUMMARY_METRICS`,
:func:`summarize`).

Eigenvalue-valued fields (``lambda_max``, ``xmin``, ``lambda_plus`` ...) are in the
*unnormalized* units lambda_i = nu_i^2 of W^T W, the convention of the published tables
and of weightwatcher; ``mp_sigma2`` is the fitted per-entry variance sigma^2 of the
random bulk (so lambda_plus = N sigma^2 (1 + 1/sqrt(Q))^2). Definitions: ``docs/metrics.md``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NAN = float("nan")

#: Layer statuses. Only ``ok`` layers carry metrics; the others say why not.
STATUS_OK = "ok"
STATUS_NON_FINITE = "non_finite"  # NaN/Inf entries: nothing is computed, the count is kept
STATUS_DEGENERATE = "degenerate"  # e.g. all-zero matrix: spectrum exists, fits do not
STATUS_FAILED = "failed"  # an unexpected error while analysing this layer (message kept)

#: Metrics averaged by :meth:`ModelReport.summary` (the model-level quality metrics of
#: Martin & Mahoney, Nature Communications 2021, plus stable rank and entropy).
SUMMARY_METRICS: tuple[str, ...] = (
    "alpha",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "log_alpha_norm",
    "stable_rank",
    "entropy",
)


# ---------------------------------------------------------------- the 5+1 phases


class Phase(str, enum.Enum):
    """The 5+1 phases of training, ordered by increasing implicit self-regularization.

    Values are the paper's names (stored as ``LayerReport.phase``). ``Phase.order`` is
    0 (Random-like) ... 5 (Rank-collapse), -1 for ``UNKNOWN``; ``<``/``>`` compare by it.
    """

    RANDOM_LIKE = "Random-like"
    BLEEDING_OUT = "Bleeding-out"
    BULK_PLUS_SPIKES = "Bulk+Spikes"
    BULK_DECAY = "Bulk-decay"
    HEAVY_TAILED = "Heavy-Tailed"
    RANK_COLLAPSE = "Rank-collapse"
    UNKNOWN = "Unknown"

    @property
    def order(self) -> int:
        return _ORDER[self]

    ordinal = order

    def __str__(self) -> str:
        return self.value

    def _cmp(self, other: Any) -> int:
        if not isinstance(other, Phase):
            return NotImplemented
        return self.order - other.order

    def __lt__(self, other: Any) -> bool:
        c = self._cmp(other)
        return c if c is NotImplemented else c < 0

    def __le__(self, other: Any) -> bool:
        c = self._cmp(other)
        return c if c is NotImplemented else c <= 0

    def __gt__(self, other: Any) -> bool:
        c = self._cmp(other)
        return c if c is NotImplemented else c > 0

    def __ge__(self, other: Any) -> bool:
        c = self._cmp(other)
        return c if c is NotImplemented else c >= 0

    __hash__ = enum.Enum.__hash__

    @classmethod
    def parse(cls, value: Any) -> Phase:
        """A Phase from a Phase, its value ("Bulk+Spikes"), its name or any case thereof."""
        if isinstance(value, Phase):
            return value
        text = str(value).strip()
        for p in cls:
            if text.lower() in (p.value.lower(), p.name.lower()):
                return p
        raise ValueError(f"not a phase: {value!r}")


_ORDER = {
    Phase.RANDOM_LIKE: 0,
    Phase.BLEEDING_OUT: 1,
    Phase.BULK_PLUS_SPIKES: 2,
    Phase.BULK_DECAY: 3,
    Phase.HEAVY_TAILED: 4,
    Phase.RANK_COLLAPSE: 5,
    Phase.UNKNOWN: -1,
}

#: The 5+1 phases in order of increasing implicit self-regularization (HT-SR); a phase's
#: ordinal (:attr:`Phase.order`) is its index here.
PHASES: tuple[str, ...] = tuple(
    p.value for p in sorted((p for p in Phase if p is not Phase.UNKNOWN), key=lambda p: p.order)
)
#: The phase of a layer that could not be classified (not one of the 5+1).
UNKNOWN_PHASE: str = Phase.UNKNOWN.value
#: The fraction of numerically zero eigenvalues from which a layer is rank-collapsed: the
#: phase classifier's Rank-collapse rule and the ``rank_collapse`` alarm share it.
RANK_COLLAPSE_FRACTION = 0.25


def phase_or_none(phase: Any) -> Phase | None:
    """The :class:`Phase` of a value (member, value, name, any case), None when it is not one of the 5+1.

    ``None``, ``""``, ``"unknown"``/``"Unknown"`` and any unrecognised text all mean "no phase".
    """
    if phase is None or phase == "":
        return None
    try:
        p = Phase.parse(phase)
    except ValueError:
        return None
    return None if p is Phase.UNKNOWN else p


def phase_name(phase: Any) -> str:
    """The canonical display name of a phase (:data:`UNKNOWN_PHASE` when it is not one of the 5+1)."""
    p = phase_or_none(phase)
    return UNKNOWN_PHASE if p is None else p.value


def phase_ordinal(phase: Any) -> int | None:
    """:attr:`Phase.order` of a value (0 Random-like ... 5 Rank-collapse), None when it is not one of the 5+1.

    How dashboards plot a phase as a number and the phase map colours its cells.
    """
    p = phase_or_none(phase)
    return None if p is None else p.order


@dataclass(frozen=True)
class SkippedLayer:
    """A matrix that was found but not analysed, and why (never silently dropped)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "reason": self.reason}


@dataclass(frozen=True)
class LayerReport:
    """Spectral metrics of one layer weight matrix W (N x M, oriented so N >= M).

    See ``docs/metrics.md`` section 4 for every definition. Fields that could not be
    computed are NaN (floats) or -1 (counts); ``status`` says why.
    """

    name: str
    kind: str
    N: int
    M: int
    Q: float
    num_evals: int = 0
    num_slices: int = 1
    status: str = STATUS_OK
    status_detail: str = ""
    num_non_finite: int = 0
    # how the eigenvalues were obtained: "exact" (every eigenvalue) or "tail" (certified top
    # plus a quadrature bulk, esdwatch.engine.tail); ``estimated``: comma-separated names of
    # the metrics of this record that are estimates, not exact ("" when none)
    spectrum: str = "exact"
    estimated: str = ""

    # spectrum
    lambda_max: float = NAN
    lambda_min: float = NAN

    # power-law tail fit (Clauset-Shalizi-Newman)
    alpha: float = NAN
    alpha_sigma: float = NAN  # standard error (alpha - 1) / sqrt(n_tail)
    xmin: float = NAN
    xmax: float = NAN
    D: float = NAN
    n_tail: int = -1

    # tail laws (esdwatch.engine.tail_laws; computed with fit="TPL" / "E_TPL", else nan / ""):
    # the truncated power law ~ x^-tpl_alpha exp(-tpl_lambda x) on the same tail, the best
    # law ("PL", "TPL", "lognormal", "exponential"), and per alternative the normalized
    # log-likelihood ratio PL vs it (> 0 favours PL) with its p-value
    tpl_alpha: float = NAN
    tpl_lambda: float = NAN
    best_fit: str = ""
    fit_R_tpl: float = NAN
    fit_p_tpl: float = NAN
    fit_R_lognormal: float = NAN
    fit_p_lognormal: float = NAN
    fit_R_exponential: float = NAN
    fit_p_exponential: float = NAN
    # bootstrap 95% interval of alpha, x_min re-scanned per resample (alpha_ci=True)
    alpha_ci_low: float = NAN
    alpha_ci_high: float = NAN

    # norm and shape metrics
    alpha_weighted: float = NAN
    log_norm: float = NAN
    log_spectral_norm: float = NAN
    log_alpha_norm: float = NAN
    stable_rank: float = NAN
    entropy: float = NAN
    numerical_rank: int = -1
    rank_collapse_fraction: float = NAN
    dead_units: int = -1

    # Marchenko-Pastur fit of the bulk
    mp_sigma2: float = NAN
    lambda_plus: float = NAN
    lambda_minus: float = NAN
    bulk_max: float = NAN
    tw_scale: float = NAN
    mp_ks: float = NAN
    mp_softrank: float = NAN
    num_spikes: int = -1

    # phase of training (filled by esdwatch.engine.phases when available)
    phase: str = UNKNOWN_PHASE  # a Phase value; UNKNOWN_PHASE when not classified
    phase_confidence: float = NAN
    phase_reason: str = ""
    # phase evidence (esdwatch.engine.phases.PhaseResult): share of the ESD above the MP edge
    # (beyond lambda_plus + 4 TW scales) and of ||W||_F^2 it carries, how many of those
    # eigenvalues lie near the edge (< 1.5 lambda_plus),
    # lambda_max's distance above lambda_plus in TW scales and as a ratio, separation
    # factor of the near-zero cluster, power law vs exponential tail statistic (> 0: PL)
    mass_above_edge: float = NAN
    energy_above_edge: float = NAN
    num_near_edge: int = -1
    max_edge_distance: float = NAN
    edge_ratio: float = NAN
    zero_gap: float = NAN
    tail_llr: float = NAN

    # correlation traps (filled by esdwatch.engine.traps when enabled)
    num_traps: int = -1
    rand_distance: float = NAN
    rand_lambda_max: float = NAN
    rand_lambda_plus: float = NAN
    # the largest entries of W when there are traps, "(row,col)=value; ..." (see traps.py)
    trap_entries: str = ""

    # the eigenvalues themselves (ascending, unnormalized); kept in memory for sinks
    # that draw spectra, never written by to_dict().
    evals: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def estimated_fields(self) -> frozenset[str]:
        """The names in ``estimated``: the fields of this record that are estimates."""
        return frozenset(name for name in self.estimated.split(",") if name)

    def replace(self, **changes: Any) -> LayerReport:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable dict of every scalar field (NaN becomes None)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "evals":
                continue
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerReport:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones default."""
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "evals"}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            f = known.get(key)
            if f is None:
                continue
            if value is None and f.type in ("float",):
                value = NAN
            kwargs[key] = value
        return cls(**kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if not math.isfinite(v) else v
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def summarize(layers: Iterable[LayerReport], metrics: Sequence[str] = SUMMARY_METRICS) -> dict[str, float]:
    """Average each metric over the layers where it is finite (the model-level <metric>)."""
    layers = list(layers)
    out: dict[str, float] = {}
    for metric in metrics:
        values = [getattr(layer, metric) for layer in layers if layer.ok]
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        out[metric] = float(np.mean(finite)) if finite else NAN
    return out


# ---------------------------------------------------------------- records

#: Keys that identify a record in time, in front of the LayerReport fields.
RECORD_KEYS: tuple[str, ...] = ("global_step", "epoch", "wall_time", "segment")


@dataclass(frozen=True)
class LayerRecord:
    """``report`` of one layer as of the snapshot taken at ``global_step``."""

    global_step: int
    epoch: int
    wall_time: float
    report: LayerReport
    segment: int = 0

    @property
    def name(self) -> str:
        return self.report.name

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "global_step": int(self.global_step),
            "epoch": int(self.epoch),
            "wall_time": float(self.wall_time),
            "segment": int(self.segment),
        }
        out.update(self.report.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerRecord:
        return cls(
            global_step=int(data["global_step"]),
            epoch=int(data.get("epoch", 0)),
            wall_time=float(data.get("wall_time", 0.0)),
            segment=int(data.get("segment", 0)),
            report=LayerReport.from_dict(data),
        )


class LatestRecords:
    """Each layer's latest record over a run's snapshots, in order (for summaries under rotation).

    With ``layers_per_snapshot`` a snapshot holds a rotating subset of the layers, so the
    model-level summary of one snapshot would jump with the subset; summaries are computed
    over each layer's latest record instead (:meth:`update` returns them). A layer missing
    from a snapshot is kept while the snapshots look like a rotation and dropped (it left
    the model) once it has been missing for more than twice the longest gap any layer
    showed before coming back; with every layer in every snapshot (no rotation) a missing
    layer is dropped at once, so the summary is the snapshot's, as without this class.
    """

    def __init__(self) -> None:
        self.records: dict[str, LayerRecord] = {}
        self._missed: dict[str, int] = {}
        self._max_gap = 0
        self._rotating = False
        self._updates = 0

    def update(self, records: Iterable[LayerRecord]) -> list[LayerRecord]:
        """Add one snapshot's records; the current layers' latest records."""
        records = list(records)
        present = {r.name for r in records}
        for name in present & set(self.records):
            self._max_gap = max(self._max_gap, self._missed.get(name, 0))
        new = present - set(self.records)
        if new and self._updates and len(present) < len(set(self.records) | present):
            self._rotating = True  # layers never seen arrive while known ones are missing: a rotation
        self._rotating = self._rotating or self._max_gap > 0
        for name in [n for n in self.records if n not in present]:
            self._missed[name] = self._missed.get(name, 0) + 1
            limit = 2 * self._max_gap if self._max_gap else (None if self._rotating else 0)
            if limit is not None and self._missed[name] > limit:
                del self.records[name]
                del self._missed[name]
        for rec in records:
            self.records[rec.name] = rec
            self._missed[rec.name] = 0
        self._updates += 1
        return list(self.records.values())


# ---------------------------------------------------------------- spectra


@dataclass(frozen=True)
class Log10Histogram:
    """A layer's ESD as esdwatch stores and draws it: a histogram of log10 eigenvalues.

    It lives in the schema because every layer above shares it: the TensorBoard and W&B
    sinks log it, :mod:`esdwatch.rundir` reads it back from ``spectra.jsonl`` (a line is
    ``global_step``, ``name``, ``segment`` and :meth:`to_dict`), and the figures draw it,
    from live eigenvalues or from that file alike. It needs numpy only.

    ``bins`` equal-width bins over [lo, hi]; ``counts`` sums to ``num`` (every
    eigenvalue); eigenvalues at or below ``floor = lambda_max * floor_rel`` (zeros,
    round-off negatives) are counted in the first bin at log10(floor), so a rank
    collapse shows as a spike on the left. ``sum`` and ``sum_squares`` are of the log10
    values (TensorBoard's proto wants them).
    """

    lo: float
    hi: float
    counts: np.ndarray
    num: int
    num_floor: int
    sum: float
    sum_squares: float
    vmin: float
    vmax: float

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.counts.size + 1)

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lo": float(self.lo),
            "hi": float(self.hi),
            "counts": [int(c) for c in self.counts],
            "num": int(self.num),
            "num_floor": int(self.num_floor),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Log10Histogram:
        counts = np.asarray(data["counts"], dtype=np.int64)
        lo, hi = float(data["lo"]), float(data["hi"])
        centers = np.linspace(lo, hi, counts.size + 1)
        centers = 0.5 * (centers[:-1] + centers[1:])
        return cls(
            lo=lo,
            hi=hi,
            counts=counts,
            num=int(data.get("num", counts.sum())),
            num_floor=int(data.get("num_floor", 0)),
            sum=float((counts * centers).sum()),
            sum_squares=float((counts * centers**2).sum()),
            vmin=lo,
            vmax=hi,
        )


def log10_histogram(evals: Any, bins: int = 64, floor_rel: float = 1e-12) -> Log10Histogram | None:
    """Histogram of log10 of the eigenvalues ``evals`` (None if there is nothing to draw)."""
    ev = np.asarray(evals, dtype=np.float64).ravel()
    ev = ev[np.isfinite(ev)]
    if ev.size == 0:
        return None
    lam_max = float(ev.max())
    if not lam_max > 0.0:
        return None
    bins = max(1, int(bins))
    floor = lam_max * float(floor_rel)
    num_floor = int(np.count_nonzero(ev <= floor))
    x = np.log10(np.maximum(ev, floor))
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-9:  # all equal: a narrow bin around the value
        lo, hi = lo - 0.05, hi + 0.05
    counts, _ = np.histogram(x, bins=bins, range=(lo, hi))
    return Log10Histogram(
        lo=lo,
        hi=hi,
        counts=counts.astype(np.int64),
        num=int(ev.size),
        num_floor=num_floor,
        sum=float(x.sum()),
        sum_squares=float(np.dot(x, x)),
        vmin=float(x.min()),
        vmax=float(x.max()),
    )


# ---------------------------------------------------------------- alarms

RANK_COLLAPSE = "rank_collapse"
CORRELATION_TRAP = "correlation_trap"
ALPHA_LOW = "alpha_low"
ALPHA_HIGH = "alpha_high"
NON_FINITE = "non_finite"
PHASE_TRANSITION = "phase_transition"  # emitted by the monitor, which sees history
# the history rules (esdwatch.alarms.history): changes between snapshots
SCALE_COLLAPSE = "scale_collapse"
ALPHA_CROSSING = "alpha_crossing"
NEW_TRAPS = "new_traps"
CORRELATION_FLOW = "correlation_flow"

ALARM_KINDS: tuple[str, ...] = (
    RANK_COLLAPSE,
    CORRELATION_TRAP,
    ALPHA_LOW,
    ALPHA_HIGH,
    NON_FINITE,
    PHASE_TRANSITION,
    SCALE_COLLAPSE,
    ALPHA_CROSSING,
    NEW_TRAPS,
    CORRELATION_FLOW,
)


@dataclass(frozen=True)
class Alarm:
    """One layer crossing one threshold.

    ``value`` is the observed metric, ``threshold`` the limit it crossed; ``step`` is
    the training step of the snapshot (None for offline analysis). ``extra`` says why
    (for a history rule: ``from``/``to`` values and the steps compared); ``advice`` is
    one line on what a user could do about it.
    """

    kind: str
    layer: str
    value: float
    threshold: float
    message: str
    severity: str = "warning"  # "info" | "warning" | "error"
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    advice: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("value", "threshold"):
            v = out[key]
            out[key] = None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alarm:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("value", "threshold"):
            if kwargs.get(key) is None:
                kwargs[key] = float("nan")
        return cls(**kwargs)
