"""The 5+1 phases of training (Martin & Mahoney, JMLR 2021; docs/metrics.md section 5) of one ESD.

:func:`classify` turns the M meaningful eigenvalues lambda_i = nu_i^2 of W^T W
(unnormalized, W of shape N x M with N >= M) into a :class:`PhaseResult`: a
:class:`Phase`, a confidence in [0, 1] and the evidence it decided on.
:func:`classify_report` fills the phase fields of a
:class:`~esdwatch.schema.LayerReport`.

Evidence
--------
* MP fit of the bulk (:func:`esdwatch.engine.mp.fit_mp`): sigma^2, the edge
  ``lambda_plus = N sigma^2 (1 + 1/sqrt Q)^2``, the Tracy-Widom scale ``s`` of the
  largest eigenvalue (Johnstone 2001) and the KS distance of the bulk to the fitted law.
* Distances above the edge: ``t_i = (lambda_i - lambda_plus) / s`` in TW units (the
  scale of the noise's own edge fluctuations) and ``r_i = lambda_i / lambda_plus - 1``
  relative to the edge (N-independent; what "just above" and "well above" mean).
  An eigenvalue is *above the edge* when ``t_i > tw_margin``; of those it is *near* the
  edge when ``r_i < spike_rel`` and *well above* (a separated spike) otherwise.
* ``mass_above_edge``: the share of the eigenvalues above the edge (ESD mass), and
  ``energy_above_edge``, their share of the spectral energy sum_i lambda_i = ||W||_F^2:
  how much of W the MP bulk does *not* describe.
* ``near_zero_fraction``: the share below ``zero_tol * lambda_max``, and ``zero_gap``,
  the ratio between the smallest eigenvalue above that tolerance and the largest below
  it (infinite for exact zeros): a *spike* at zero is separated from the rest.
* Power-law tail fit (:func:`esdwatch.engine.powerlaw.fit_power_law`, Clauset-Shalizi-Newman):
  alpha, x_min, D; and ``tail_llr``, the normalized log-likelihood ratio (Vuong's test,
  as in Clauset et al. 2009 section 5) of that power law against an exponential fitted to
  the same tail: > 0 favours the power law (heavy tail), < 0 an exponentially bounded
  tail as MP's or a finite-rank spike set would give; ``tail_p`` its two-sided p-value.
  Its size is not used: on finite spectra it is positive for nearly every tail with more
  than a handful of points (Bulk-decay included), so it mostly tracks n_tail; the
  MP-versus-heavy-tail question is decided by the mass and energy above the fitted edge.
  Only its significant *negative* sign counts, as evidence against a heavy tail (rule 4).
* ``best_fit`` (with ``fit="TPL"``/``"E_TPL"``, :mod:`esdwatch.engine.tail_laws`): the
  tail law that describes the tail best; ``"exponential"`` is the same evidence as above.

Decision rules (applied in this order; every number is a :class:`PhaseThresholds` field)
------------------------------------------------------------------------------------
0. **Unknown** if any eigenvalue is NaN/inf or negative beyond rounding, or fewer than
   ``min_evals = 50`` eigenvalues (the size floor of docs/metrics.md section 1) are given, or the
   MP fit fails. (An all-zero spectrum is Rank-collapse, rule 1, at any size.)
1. **Rank-collapse** if ``near_zero_fraction >= collapse_fraction = 0.25`` with
   ``zero_tol = 1e-6`` (nu_i < 1e-3 nu_max, the tolerance of
   ``LayerReport.rank_collapse_fraction``) and ``zero_gap >= collapse_gap = 10``:
   a large-mass spike at lambda = 0, separated from the rest of the spectrum. The
   separation test keeps a very heavy-tailed ESD (Pareto mu ~ 1, whose continuous bulk
   can lie 6 decades below lambda_max) from counting as collapsed. Only the M
   eigenvalues of the small Gram matrix are ever passed, so the N - M structural zeros
   of a rectangular W never count.
2. **Random-like** if nothing is above the edge: ``t_max <= tw_margin = 4`` (TW1 has
   mean -1.21, sd 1.27, 99th percentile 2.02; the margin also absorbs the sigma^2 fit
   error). "lambda_max ~ lambda_plus, TW edge."
3. **Bleeding-out** if eigenvalues are above the edge but none is well above it: all
   have ``r < spike_rel = 0.5``. "Some eigenmass just above lambda_plus": outliers just
   past the BBP transition.
4. **Heavy-Tailed** if there is no good MP edge and the tail is a power law: all of
   ``mass_above_edge >= ht_mass = 0.05`` (an MP fit leaves >= 5% of the ESD outside
   its bulk: more than a few spikes), ``energy_above_edge >= ht_energy = 0.4`` (the
   eigenvalues outside the bulk carry >= 40% of ||W||_F^2: lambda_max >> lambda_plus
   and heavy mass above it, so MP no longer describes W) and ``alpha <= ht_alpha = 4``
   (the finite-size alpha of the heavy-tailed universality classes mu < 4, docs/metrics.md
   section 3; typical well-trained layers have 2 <= alpha <= 4; a layer with a heavy
   but steeper tail, alpha > 4, is weakly heavy-tailed, mu > 4: MP bulk plus a power-law
   tail, i.e. Bulk-decay). And the tail is not better described by an exponential: a
   tail where the exponential beats the power law significantly (``tail_llr < 0`` with
   ``tail_p < tail_p_max = 0.1``, CSN's level, or ``best_fit == "exponential"``) is
   exponentially bounded, not heavy.
5. **Bulk+Spikes** if the eigenvalues above the edge are separated spikes: fewer than
   ``decay_min_near = 2`` of them are near the edge (an MP bulk, a gap, then spikes).
6. **Bulk-decay** otherwise: spikes well above the edge *and* a continuum of eigenmass
   decaying through the edge (>= 2 eigenvalues just above it), i.e. the edge is smeared
   but the ESD is not heavy-tailed by rule 4.

Confidence
----------
Each comparison on the path to the decision gives a margin in [0, 1]: for a ratio
quantity x against threshold c, ``|ln(x / c)| / ln(conf_factor)`` (conf_factor = 2: a
factor two from the threshold is full confidence); for TW distances
``|t - tw_margin| / conf_tw`` (conf_tw = 4 TW units); counts are compared as
``(n + 0.5) / (c - 0.5)``. Rule 4's three conditions are alternatives when it fails
(the largest of their margins counts) and joint when it holds (the smallest counts).
The confidence is the smallest margin on the path, clipped to [0, 1]; 0 means "on a
threshold", 1 "every deciding quantity is far from its threshold".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from esdwatch.engine.mp import DEFAULT_TW_MARGIN, fit_mp
from esdwatch.engine.powerlaw import fit_power_law
from esdwatch.schema import RANK_COLLAPSE_FRACTION, Phase

__all__ = [
    "Phase",
    "PhaseThresholds",
    "PhaseResult",
    "DEFAULT_THRESHOLDS",
    "classify",
    "classify_report",
    "tail_comparison",
]

NAN = float("nan")


@dataclass(frozen=True)
class PhaseThresholds:
    """Every number the decision rules use (see the module docstring for the rules).

    Attributes
    ----------
    min_evals:
        Fewer eigenvalues than this and the phase is Unknown (docs/metrics.md size floor, 50).
    zero_tol:
        An eigenvalue is numerically zero below ``zero_tol * lambda_max`` (1e-6, i.e.
        nu < 1e-3 nu_max; the same tolerance as ``LayerReport.rank_collapse_fraction``).
    collapse_fraction:
        Rank-collapse needs at least this share of the eigenvalues numerically zero (0.25).
    collapse_gap:
        ... and the zero cluster separated from the rest by at least this factor (10).
    tw_margin:
        An eigenvalue is above the MP edge beyond ``lambda_plus + tw_margin * s_TW`` (4,
        the default spike margin of :func:`esdwatch.engine.mp.fit_mp`).
    spike_rel:
        Above-edge eigenvalues with ``lambda < (1 + spike_rel) lambda_plus`` are *near*
        the edge (bleeding out), the others *well above* it (spikes) (0.5).
    decay_min_near:
        Bulk-decay needs at least this many near-edge eigenvalues besides spikes (2).
    ht_mass:
        Heavy-Tailed needs at least this share of the ESD above the edge (0.05) ...
    ht_energy:
        ... carrying at least this share of ``sum lambda_i = ||W||_F^2`` (0.4) ...
    ht_alpha:
        ... and a power-law tail with ``alpha <= ht_alpha`` (4).
    tail_p_max:
        ... and no exponential fitting the tail better at p < ``tail_p_max`` (0.1).
    conf_factor, conf_tw:
        Scales of the confidence margins: a factor ``conf_factor`` (2) from a ratio
        threshold, or ``conf_tw`` (4) TW units from the edge margin, is full confidence.
    """

    min_evals: int = 50
    zero_tol: float = 1e-6
    collapse_fraction: float = RANK_COLLAPSE_FRACTION
    collapse_gap: float = 10.0
    tw_margin: float = DEFAULT_TW_MARGIN
    spike_rel: float = 0.5
    decay_min_near: int = 2
    ht_mass: float = 0.05
    ht_energy: float = 0.4
    ht_alpha: float = 4.0
    conf_factor: float = 2.0
    conf_tw: float = 4.0
    tail_p_max: float = 0.1


DEFAULT_THRESHOLDS = PhaseThresholds()


@dataclass(frozen=True)
class PhaseResult:
    """A phase and the evidence it was decided on (eigenvalues unnormalized, lambda = nu^2).

    Attributes
    ----------
    phase, confidence, reason:
        The decision, a margin in [0, 1] (module docstring) and a one-line explanation
        quoting the numbers that decided.
    num_evals, N, M:
        Eigenvalues classified and the matrix shape (N >= M).
    lambda_max:
        Largest eigenvalue.
    sigma2, lambda_plus, tw_scale, mp_ks:
        MP fit of the bulk: per-entry variance, edge ``N sigma2 (1 + 1/sqrt Q)^2``,
        Tracy-Widom scale of lambda_max, KS distance of the bulk to the fitted law.
    num_above_edge, mass_above_edge, energy_above_edge:
        Eigenvalues beyond ``lambda_plus + tw_margin * tw_scale``: count, share of the
        eigenvalues and share of their sum (of ||W||_F^2).
    num_near_edge, num_spikes:
        Of those, near the edge (``lambda < (1 + spike_rel) lambda_plus``) and well above.
    max_edge_distance:
        ``(lambda_max - lambda_plus) / tw_scale``: how far above the edge, in TW units.
    edge_ratio:
        ``lambda_max / lambda_plus`` (the inverse of mp_softrank).
    near_zero_fraction, zero_gap:
        Share of eigenvalues below ``zero_tol * lambda_max`` and the separation factor of
        that cluster from the rest (inf for exact zeros, nan if there is none).
    alpha, xmin, D, n_tail:
        Power-law tail fit.
    tail_llr, tail_p:
        Normalized log-likelihood ratio power law vs exponential on the tail
        (> 0 favours the power law) and its p-value (:func:`tail_comparison`).
    """

    phase: Phase
    confidence: float
    reason: str
    num_evals: int = 0
    N: int = 0
    M: int = 0
    lambda_max: float = NAN
    sigma2: float = NAN
    lambda_plus: float = NAN
    tw_scale: float = NAN
    mp_ks: float = NAN
    num_above_edge: int = -1
    mass_above_edge: float = NAN
    energy_above_edge: float = NAN
    num_near_edge: int = -1
    num_spikes: int = -1
    max_edge_distance: float = NAN
    edge_ratio: float = NAN
    near_zero_fraction: float = NAN
    zero_gap: float = NAN
    alpha: float = NAN
    xmin: float = NAN
    D: float = NAN
    n_tail: int = -1
    tail_llr: float = NAN
    tail_p: float = NAN

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["phase"] = self.phase.value
        return out


# ------------------------------------------------------------------------------ helpers


def tail_comparison(evals: np.ndarray, xmin: float, alpha: float) -> tuple[float, float]:
    """Power law vs exponential on the tail ``lambda >= xmin`` (Clauset et al. 2009, sec. 5).

    Both laws are fitted by maximum likelihood to the same n tail points: the power law
    ``p(x) = (alpha - 1)/xmin (x/xmin)^-alpha`` (alpha given, the CSN fit) and the shifted
    exponential ``p(x) = k exp(-k (x - xmin))`` with ``k = 1 / mean(x - xmin)``. Returns
    Vuong's statistic ``R / (sqrt(n) sd(l_pl - l_exp))``, R the log-likelihood ratio,
    and its two-sided p-value ``erfc(|stat| / sqrt 2)``. Positive: the power law fits
    better (a heavy tail); negative: an exponentially bounded tail. (nan, nan) when the
    tail has fewer than 3 points or no fit.
    """
    if not (math.isfinite(alpha) and math.isfinite(xmin) and xmin > 0 and alpha > 1):
        return NAN, NAN
    x = evals[evals >= xmin]
    n = x.size
    if n < 3:
        return NAN, NAN
    excess = x - xmin
    mean_excess = float(excess.mean())
    if not mean_excess > 0:
        return NAN, NAN
    k = 1.0 / mean_excess
    l_pl = math.log((alpha - 1.0) / xmin) - alpha * np.log(x / xmin)
    l_exp = math.log(k) - k * excess
    d = l_pl - l_exp
    sd = float(d.std())
    if not sd > 0:
        return NAN, NAN
    stat = float(d.sum()) / (math.sqrt(n) * sd)
    return stat, math.erfc(abs(stat) / math.sqrt(2.0))


def _tail_check(tail_llr: float, tail_p: float, best_fit: str, th: PhaseThresholds) -> tuple[bool, float]:
    """(is the tail not exponential, margin): rule 4's check that no exponential beats the power law.

    Fails when the exponential fits the tail significantly better (``tail_llr < 0`` with
    ``tail_p < tail_p_max``) or ``best_fit`` says exponential; the margin is the p-value's
    ratio margin to ``tail_p_max``, full when the power law is favoured (no evidence at all).
    """
    if best_fit == "exponential":
        return False, 1.0
    if not (math.isfinite(tail_llr) and math.isfinite(tail_p)) or tail_llr >= 0:
        return True, 1.0
    return tail_p >= th.tail_p_max, _ratio_margin(tail_p, th.tail_p_max, th.conf_factor)


def _ratio_margin(x: float, threshold: float, factor: float) -> float:
    """|ln(x / threshold)| / ln(factor), in [0, 1]; 1 for x = 0 or inf against a finite c."""
    if not (x > 0) or math.isinf(x):
        return 1.0
    return min(1.0, abs(math.log(x / threshold)) / math.log(factor))


def _count_margin(n: int, threshold: int, factor: float) -> float:
    # n against an integer threshold: n = c - 1 and n = c are the closest cases
    return _ratio_margin(n + 0.5, threshold - 0.5, factor)


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


# ------------------------------------------------------------------------------- classify


def classify(
    evals: Any,
    N: int,
    M: int,
    thresholds: PhaseThresholds | None = None,
    *,
    power_law: Mapping[str, Any] | None = None,
    mp: Any = None,
) -> PhaseResult:
    """The phase of training of one ESD (decision rules in the module docstring).

    Parameters
    ----------
    evals:
        The eigenvalues lambda_i = nu_i^2 of W^T W (unnormalized, any order; numpy,
        torch or a sequence): the M = min(N, M) meaningful ones, never the structural
        zeros of a rectangular W. A pooled set of S same-shape slices (S * M values) is
        accepted; the MP law is then that of one N x M slice.
    N, M:
        Shape of W (swapped if N < M).
    thresholds:
        A :class:`PhaseThresholds`; default :data:`DEFAULT_THRESHOLDS`.
    power_law:
        An already computed power-law fit (keys ``alpha``, ``xmin``, ``D``, optional
        ``n_tail`` and ``best_fit``) to reuse instead of fitting again, e.g. a LayerReport's.
    mp:
        An already computed :func:`~esdwatch.engine.mp.fit_mp` of these eigenvalues with this
        (N, M) and ``thresholds.tw_margin``, to reuse instead of fitting again.

    Returns
    -------
    PhaseResult. Never raises on data: bad input gives ``Phase.UNKNOWN`` with the reason.
    """
    th = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    if hasattr(evals, "detach"):
        evals = evals.detach().cpu().double().numpy()
    ev = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    N, M = int(N), int(M)
    if N < M:
        N, M = M, N
    n = int(ev.size)
    base: dict[str, Any] = dict(num_evals=n, N=N, M=M)

    def unknown(reason: str, **extra: Any) -> PhaseResult:
        return PhaseResult(Phase.UNKNOWN, 0.0, reason, **base, **extra)

    if M < 1 or n == 0:
        return unknown("no eigenvalues")
    if not np.isfinite(ev).all():
        bad = int((~np.isfinite(ev)).sum())
        return unknown(f"{bad} non-finite eigenvalue(s)")
    lam_max = float(ev[-1])
    base["lambda_max"] = lam_max
    # eigvalsh of a PSD Gram matrix may return -eps * lambda_max; more than that is not a
    # spectrum of W^T W
    if ev[0] < -1e-8 * max(abs(lam_max), abs(float(ev[0]))):
        return unknown(f"negative eigenvalue {ev[0]:.3g}: not the spectrum of W^T W")
    ev = np.clip(ev, 0.0, None)

    # -- rule 1: rank collapse (checked first, at any size) ---------------------------
    if not lam_max > 0:
        return PhaseResult(
            Phase.RANK_COLLAPSE,
            1.0,
            "all-zero matrix: every eigenvalue is 0",
            **base,
            near_zero_fraction=1.0,
            zero_gap=math.inf,
        )
    tol = th.zero_tol * lam_max
    n_zero = int(np.searchsorted(ev, tol, side="left"))  # count of lambda < tol
    near_zero_fraction = n_zero / n
    if n_zero == 0:
        zero_gap = NAN
    else:
        below = float(ev[n_zero - 1])
        zero_gap = math.inf if below <= 0 else float(ev[n_zero]) / below
    base.update(near_zero_fraction=near_zero_fraction, zero_gap=zero_gap)
    if n < th.min_evals:
        return unknown(f"only {n} eigenvalues (< min_evals = {th.min_evals}): too few for an ESD")

    m_zero = _ratio_margin(near_zero_fraction, th.collapse_fraction, th.conf_factor) if n_zero else 1.0
    if near_zero_fraction >= th.collapse_fraction and zero_gap >= th.collapse_gap:
        conf = min(m_zero, _ratio_margin(zero_gap, th.collapse_gap, th.conf_factor))
        return PhaseResult(
            Phase.RANK_COLLAPSE,
            conf,
            f"{near_zero_fraction:.0%} of the eigenvalues are numerically zero (< {th.zero_tol:g} lambda_max), "
            f"separated by a factor {_fmt(zero_gap)} from the rest "
            f"(>= {th.collapse_fraction:g} and {th.collapse_gap:g})",
            **base,
        )
    # not collapsed: either too few zeros (margin of the fraction) or zeros that are not
    # separated from the rest (margin of the gap)
    if near_zero_fraction >= th.collapse_fraction:
        path_margins = [_ratio_margin(zero_gap, th.collapse_gap, th.conf_factor)]
    else:
        path_margins = [m_zero]

    # -- MP fit of the bulk -------------------------------------------------------------
    if mp is None:
        mp = fit_mp(ev, N, M, tw_margin=th.tw_margin)
    lam_plus, s = float(mp.lambda_plus), float(mp.tw_scale)
    if not (math.isfinite(lam_plus) and lam_plus > 0 and math.isfinite(s) and s > 0):
        return unknown(f"MP fit failed ({getattr(mp, 'status', 'nan fit')})")
    t = (ev - lam_plus) / s
    above = t > th.tw_margin
    n_above = int(above.sum())
    near = above & (ev < (1.0 + th.spike_rel) * lam_plus)
    n_near = int(near.sum())
    n_far = n_above - n_near
    t_max = float(t[-1])
    ratio = lam_max / lam_plus
    mass_above = n_above / n
    total = float(ev.sum())
    energy_above = float(ev[above].sum()) / total if total > 0 else NAN

    # -- power law of the tail ----------------------------------------------------------
    if power_law is not None and math.isfinite(float(power_law.get("alpha", NAN))):
        alpha = float(power_law["alpha"])
        xmin = float(power_law.get("xmin", NAN))
        D = float(power_law.get("D", NAN))
        n_tail = int(power_law.get("n_tail", -1))
        if n_tail < 0 and math.isfinite(xmin):
            n_tail = int((ev >= xmin).sum())
    else:
        pl = fit_power_law(ev)
        alpha, xmin, D, n_tail = float(pl.alpha), float(pl.xmin), float(pl.D), int(pl.n_tail)
    tail_llr, tail_p = tail_comparison(ev, xmin, alpha)
    best_fit = str(power_law.get("best_fit", "")) if power_law is not None else ""

    evidence: dict[str, Any] = dict(
        base,
        sigma2=float(mp.sigma2),
        lambda_plus=lam_plus,
        tw_scale=s,
        mp_ks=float(mp.ks),
        num_above_edge=n_above,
        mass_above_edge=mass_above,
        energy_above_edge=energy_above,
        num_near_edge=n_near,
        num_spikes=n_far,
        max_edge_distance=t_max,
        edge_ratio=ratio,
        alpha=alpha,
        xmin=xmin,
        D=D,
        n_tail=n_tail,
        tail_llr=tail_llr,
        tail_p=tail_p,
    )

    def result(phase: Phase, margins: list[float], reason: str) -> PhaseResult:
        conf = float(np.clip(min(margins), 0.0, 1.0)) if margins else 1.0
        return PhaseResult(phase, conf, reason, **evidence)

    # -- rule 2: random-like ------------------------------------------------------------
    m_edge = min(1.0, abs(t_max - th.tw_margin) / th.conf_tw)
    path_margins.append(m_edge)
    if n_above == 0:
        return result(
            Phase.RANDOM_LIKE,
            path_margins,
            f"MP bulk with a TW edge: lambda_max is {t_max:.2g} TW scales from lambda_plus (<= {th.tw_margin:g})",
        )

    # -- rule 3: bleeding-out -----------------------------------------------------------
    rel_max = ratio - 1.0
    m_spike = _ratio_margin(rel_max, th.spike_rel, th.conf_factor)
    path_margins.append(m_spike)
    if n_far == 0:
        return result(
            Phase.BLEEDING_OUT,
            path_margins,
            f"{n_above} eigenvalue(s) just above the MP edge: lambda_max = {ratio:.3g} lambda_plus "
            f"({t_max:.3g} TW scales), none beyond {1 + th.spike_rel:g} lambda_plus",
        )

    # -- rule 4: heavy-tailed -----------------------------------------------------------
    ht_checks = {
        "mass": (mass_above >= th.ht_mass, _ratio_margin(mass_above, th.ht_mass, th.conf_factor)),
        "energy": (energy_above >= th.ht_energy, _ratio_margin(energy_above, th.ht_energy, th.conf_factor)),
        "alpha": (
            math.isfinite(alpha) and alpha <= th.ht_alpha,
            _ratio_margin(alpha, th.ht_alpha, th.conf_factor) if math.isfinite(alpha) else 1.0,
        ),
        "tail": _tail_check(tail_llr, tail_p, best_fit, th),
    }
    if all(ok for ok, _ in ht_checks.values()):
        return result(
            Phase.HEAVY_TAILED,
            path_margins + [min(m for _, m in ht_checks.values())],
            f"no good MP edge: {mass_above:.1%} of the eigenvalues (>= {th.ht_mass:g}) and {energy_above:.0%} "
            f"of ||W||_F^2 (>= {th.ht_energy:g}) above it, lambda_max = {ratio:.3g} lambda_plus; "
            f"power-law tail alpha = {alpha:.3g} (<= {th.ht_alpha:g}), not exponential",
        )
    # not heavy-tailed: the failing condition furthest from its threshold is the margin
    path_margins.append(max(m for ok, m in ht_checks.values() if not ok))
    failed = ", ".join(k for k, (ok, _) in ht_checks.items() if not ok)

    # -- rules 5 and 6: spikes or decay -------------------------------------------------
    m_near = _count_margin(n_near, th.decay_min_near, th.conf_factor)
    path_margins.append(m_near)
    if n_near < th.decay_min_near:
        return result(
            Phase.BULK_PLUS_SPIKES,
            path_margins,
            f"MP bulk plus {n_far} separated spike(s) up to {ratio:.3g} lambda_plus "
            f"({t_max:.3g} TW scales); {n_near} eigenvalue(s) near the edge (< {th.decay_min_near})",
        )
    return result(
        Phase.BULK_DECAY,
        path_margins,
        f"{n_above} eigenvalues ({mass_above:.1%}) above the MP edge: {n_near} near it and {n_far} spike(s) "
        f"up to {ratio:.3g} lambda_plus; not heavy-tailed ({failed} below threshold; alpha = {_fmt(alpha)})",
    )


# ------------------------------------------------------------------------ LayerReport glue


def classify_report(report: Any, evals: Any, thresholds: PhaseThresholds | None = None, *, mp: Any = None) -> Any:
    """``report`` with its phase fields filled from ``evals`` (ascending, unnormalized).

    Reuses the report's power-law fit (alpha, xmin, D, n_tail) when it has one. Sets
    ``phase`` (the Phase value string), ``phase_confidence``, ``phase_reason`` and the
    evidence fields LayerReport has (``mass_above_edge``, ``energy_above_edge``, ``num_near_edge``,
    ``max_edge_distance``, ``edge_ratio``, ``zero_gap``, ``tail_llr``) when present.
    """
    power_law = None
    alpha = getattr(report, "alpha", NAN)
    if alpha is not None and math.isfinite(float(alpha)):
        power_law = {
            "alpha": float(alpha),
            "xmin": float(getattr(report, "xmin", NAN)),
            "D": float(getattr(report, "D", NAN)),
            "n_tail": int(getattr(report, "n_tail", -1)),
            "best_fit": str(getattr(report, "best_fit", "") or ""),
        }
    res = classify(evals, report.N, report.M, thresholds, power_law=power_law, mp=mp)
    changes: dict[str, Any] = {
        "phase": res.phase.value,
        "phase_confidence": res.confidence,
        "phase_reason": res.reason,
    }
    have = {f.name for f in dataclasses.fields(report)}
    optional = {
        "mass_above_edge": res.mass_above_edge,
        "energy_above_edge": res.energy_above_edge,
        "num_near_edge": res.num_near_edge,
        "max_edge_distance": res.max_edge_distance,
        "edge_ratio": res.edge_ratio,
        "zero_gap": res.zero_gap,
        "tail_llr": res.tail_llr,
    }
    changes.update({k: v for k, v in optional.items() if k in have})
    return dataclasses.replace(report, **changes)
