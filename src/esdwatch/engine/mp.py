"""Marchenko-Pastur law, robust MP fit of an ESD bulk, Tracy-Widom edge and spikes.

Pure numpy/scipy. Conventions (project-wide, see ``docs/metrics.md`` sections 1-2):

* W is N x M with N >= M, Q = N / M >= 1. The inputs of :func:`fit_mp` are the M
  eigenvalues lambda_i = nu_i^2 of W^T W in *unnormalized* units (not divided by N).
* For W_ij i.i.d. with mean 0 and variance sigma^2 the *normalized* eigenvalues
  x_i = lambda_i / N follow, as N, M -> oo with N/M -> Q, the Marchenko-Pastur law
  (Marchenko & Pastur 1967)::

      rho(x) = Q / (2 pi sigma^2) * sqrt((x_+ - x)(x - x_-)) / x,   x_- <= x <= x_+,
      x_+- = sigma^2 (1 +- 1/sqrt(Q))^2.

  For Q >= 1 there is no atom at zero; the mean of the law is sigma^2.
* :func:`mp_edges`, :func:`mp_pdf`, :func:`mp_cdf` and :func:`mp_quantile` work in these
  normalized units. Every eigenvalue-valued field of :class:`MPFit` is in unnormalized
  units (lambda = N x), e.g. ``lambda_plus = N sigma^2 (1 + 1/sqrt(Q))^2``; ``sigma2`` is
  the per-entry variance sigma^2.

References
----------
V. A. Marchenko, L. A. Pastur, "Distribution of eigenvalues for some sets of random
matrices", Math. USSR-Sbornik 1 (1967) 457-483.
I. M. Johnstone, "On the distribution of the largest eigenvalue in principal components
analysis", Ann. Statist. 29 (2001) 295-327.
J. Baik, G. Ben Arous, S. Peche, "Phase transition of the largest eigenvalue for nonnull
complex sample covariance matrices", Ann. Probab. 33 (2005) 1643-1697.
C. H. Martin, M. W. Mahoney, "Implicit Self-Regularization in Deep Neural Networks:
Evidence from Random Matrix Theory and Implications for Learning", JMLR 22 (2021) 1-73.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import minimize_scalar

__all__ = [
    "MPFit",
    "DEFAULT_TW_MARGIN",
    "MIN_EVALS",
    "fit_mp",
    "mp_cdf",
    "mp_edges",
    "mp_pdf",
    "mp_quantile",
    "tracy_widom_scale",
]

NAN = float("nan")

#: Fewer positive eigenvalues than this and :func:`fit_mp` returns an all-NaN fit.
MIN_EVALS = 4

#: Default spike margin, in Tracy-Widom scales s above the fitted lambda_plus.
#:
#: For pure noise z = (lambda_max - lambda_plus) / s is TW1-distributed (mean -1.21,
#: sd 1.27, 99th percentile 2.02) *if sigma^2 is known*. With the fitted sigma^2 its
#: spread widens at small M (sigma^2 error d shifts z by ~ d * lambda_plus / s, and
#: lambda_plus / s grows like M^(2/3)). On pure Gaussian matrices a margin of 4 keeps
#: false spikes at or below 0.2 % for M >= 50, where 3 reaches about 1 % for the smallest
#: layers (the calibration table, by margin, M and Q, is in
#: ``experiments/results/engine_design_notes.md``); a real spike only needs to clear
#: lambda_plus by one more s, far less than the separation of a signal above the BBP
#: threshold. Pooled conv slices take the maximum of several TW draws and are a little
#: more exposed.
DEFAULT_TW_MARGIN = 4.0


# --------------------------------------------------------------------------------------
# The Marchenko-Pastur law (normalized units x = lambda / N)
# --------------------------------------------------------------------------------------


def _check_q(Q: float) -> float:
    Q = float(Q)
    if not (Q >= 1.0) or not math.isfinite(Q):
        raise ValueError(f"Q = N/M must be a finite number >= 1 (orient W so that N >= M); got {Q}")
    return Q


def _check_sigma2(sigma2: float) -> float:
    sigma2 = float(sigma2)
    if not (sigma2 > 0.0) or not math.isfinite(sigma2):
        raise ValueError(f"sigma2 must be a finite positive number; got {sigma2}")
    return sigma2


def mp_edges(sigma2: float, Q: float) -> tuple[float, float]:
    """Normalized MP edges ``(x_-, x_+) = sigma^2 (1 -+ 1/sqrt(Q))^2`` (Q >= 1).

    Multiply by N for the edges of the unnormalized eigenvalues of W^T W.
    """
    sigma2 = _check_sigma2(sigma2)
    Q = _check_q(Q)
    r = 1.0 / math.sqrt(Q)
    return sigma2 * (1.0 - r) ** 2, sigma2 * (1.0 + r) ** 2


def mp_pdf(x, sigma2: float, Q: float) -> np.ndarray:
    """MP density ``Q / (2 pi sigma^2) sqrt((x_+ - x)(x - x_-)) / x`` on [x_-, x_+].

    Normalized units, Q >= 1 (no atom at 0: the density integrates to 1). Zero outside
    the support; at Q = 1 the density diverges like x^(-1/2) at x = 0 (``inf`` there).
    """
    sigma2 = _check_sigma2(sigma2)
    Q = _check_q(Q)
    a, b = mp_edges(sigma2, Q)
    x = np.asarray(x, dtype=float)
    inside = (x >= a) & (x <= b)
    xs = np.where(inside, x, 0.5 * (a + b))  # safe dummy outside the support
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = Q / (2.0 * math.pi * sigma2) * np.sqrt(np.maximum((b - xs) * (xs - a), 0.0)) / xs
    dens = np.where(inside, dens, 0.0)
    if a == 0.0:
        dens = np.where(x == 0.0, np.inf, dens)
    return np.where(np.isnan(x), np.nan, dens)


def _mp_cdf_unit(x: np.ndarray, a: float, b: float, Q: float, sigma2: float) -> np.ndarray:
    """Closed-form MP CDF; ``x`` must already be clipped to [a, b].

    With the antiderivative (valid on [a, b], 0 <= a < b)::

        G(x) = sqrt((b-x)(x-a)) + (a+b)/2 * asin((2x-a-b)/(b-a))
               - sqrt(ab) * asin(((a+b)x - 2ab) / (x (b-a)))

    of sqrt((b-x)(x-a))/x, G(a) = -pi sigma^2/Q and G(b) = +pi sigma^2/Q (because
    (sqrt(b)-sqrt(a))^2 = 4 sigma^2/Q), so F(x) = 1/2 + Q G(x) / (2 pi sigma^2).
    Both arcsines are evaluated as atan2(u, sqrt(1 - u^2)) with 1 - u^2 written as an exact
    product (1 - w^2 = 4(x-a)(b-x)/(b-a)^2, 1 - u^2 = 4ab(x-a)(b-x)/(x(b-a))^2), which keeps
    full precision next to the edges where asin(+-1 -+ eps) is ill-conditioned.
    """
    ba = b - a
    root = np.sqrt(np.maximum((b - x) * (x - a), 0.0))
    t1 = 0.5 * (a + b) * np.arctan2((2.0 * x - a - b) / ba, 2.0 * root / ba)
    sab = math.sqrt(a * b)
    t2: np.ndarray | float
    if sab > 0.0:
        t2 = sab * np.arctan2((a + b) * x - 2.0 * a * b, 2.0 * sab * root)
    else:  # Q = 1: lower edge 0, the second term vanishes identically
        t2 = 0.0
    F = 0.5 + Q * (root + t1 - t2) / (2.0 * math.pi * sigma2)
    return np.clip(F, 0.0, 1.0)


def mp_cdf(x, sigma2: float, Q: float) -> np.ndarray:
    """MP cumulative distribution function, closed form (normalized units, Q >= 1).

    ``F(x) = 1/2 + Q/(2 pi sigma^2) * G(x)`` on [x_-, x_+] with G given in
    :func:`_mp_cdf_unit`; 0 below x_-, 1 above x_+, NaN for NaN. Vectorized; absolute
    error ~1e-16 * max(1, Q) (checked against quadrature of :func:`mp_pdf`), also next
    to the edges.
    """
    sigma2 = _check_sigma2(sigma2)
    Q = _check_q(Q)
    x = np.asarray(x, dtype=float)
    return np.where(np.isnan(x), np.nan, _mp_cdf_values(x, sigma2, Q))


def _mp_cdf_values(x: np.ndarray, sigma2: float, Q: float) -> np.ndarray:
    """MP CDF at ``x``: :func:`_mp_cdf_unit` inside [x_-, x_+], 0 below, 1 above."""
    a, b = mp_edges(sigma2, Q)
    with np.errstate(divide="ignore", invalid="ignore"):
        F = _mp_cdf_unit(np.clip(x, a, b), a, b, Q, sigma2)
    return np.where(x <= a, 0.0, np.where(x >= b, 1.0, F))


@lru_cache(maxsize=256)
def _unit_quantile_table(Q: float) -> tuple[np.ndarray, np.ndarray]:
    """(theta grid, CDF on it) for the sigma = 1 law, x(theta) = a + (b-a)(1-cos theta)/2.

    The cosine map puts grid points densely at both edges, where the CDF is flat
    (F ~ (x - a)^(3/2)) or, at Q = 1, steep (F ~ x^(1/2)); in theta the CDF is smooth
    (~theta^3, or ~theta at Q = 1), so interpolation plus Newton polishing is accurate.
    """
    a, b = mp_edges(1.0, Q)
    theta = np.linspace(0.0, math.pi, 2049)
    x = a + (b - a) * np.sin(0.5 * theta) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        F = _mp_cdf_unit(x, a, b, Q, 1.0)
    F[0], F[-1] = 0.0, 1.0
    F = np.maximum.accumulate(F)
    return theta, F


def _unit_quantile(p: np.ndarray, Q: float) -> np.ndarray:
    a, b = mp_edges(1.0, Q)
    theta_g, F_g = _unit_quantile_table(Q)
    pc = np.clip(p, 0.0, 1.0)
    theta = np.interp(pc, F_g, theta_g)
    half = 0.5 * (b - a)
    # Newton polishing in theta: dF/dtheta = rho(x(theta)) * dx/dtheta, with
    # rho(x) = Q sqrt((b-x)(x-a)) / (2 pi x) and (b-x)(x-a) = half^2 sin^2(theta).
    # Hence dF/dtheta = Q half^2 sin^2(theta) / (2 pi x): finite everywhere (also at Q=1).
    lo = np.zeros_like(theta)
    hi = np.full_like(theta, math.pi)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(60):
            x = a + 2.0 * half * np.sin(0.5 * theta) ** 2
            F = _mp_cdf_unit(x, a, b, Q, 1.0)
            hi = np.where(F > pc, np.minimum(hi, theta), hi)
            lo = np.where(F <= pc, np.maximum(lo, theta), lo)
            dF = Q * half * half * np.sin(theta) ** 2 / (2.0 * math.pi * x)
            if a == 0.0:  # x ~ half theta^2 / 2 and sin^2 ~ theta^2 as theta -> 0
                dF = np.where(x > 0.0, dF, Q * half / math.pi)
            new = theta - (F - pc) / dF
            bad = ~((new >= lo) & (new <= hi))  # also catches NaN: fall back to bisection
            new = np.where(bad, 0.5 * (lo + hi), new)
            done = np.abs(new - theta) <= 1e-13
            theta = new
            if done.all():
                break
    x = a + 2.0 * half * np.sin(0.5 * theta) ** 2
    x = np.where(pc <= 0.0, a, np.where(pc >= 1.0, b, x))
    return np.where((p >= 0.0) & (p <= 1.0), x, np.nan)


def mp_quantile(p, Q: float):
    """Quantile function of the sigma = 1 MP law at aspect ratio Q >= 1.

    Scales linearly: the quantile for variance sigma^2 is ``sigma^2 * mp_quantile(p, Q)``.
    Inverts the closed-form :func:`mp_cdf` by interpolation on a cached per-Q table
    (cosine grid in theta, x = x_- + (x_+ - x_-)(1 - cos theta)/2) followed by safeguarded
    Newton steps: |F(q) - p| <= 1e-12. q(0) = x_-, q(1) = x_+, NaN for p outside [0, 1].
    Returns a float for scalar ``p``, else an array of p's shape.
    """
    Q = _check_q(Q)
    parr = np.asarray(p, dtype=float)
    out = _unit_quantile(np.atleast_1d(parr), Q)
    if parr.ndim == 0:
        return float(out[0])
    return out.reshape(parr.shape)


# --------------------------------------------------------------------------------------
# Tracy-Widom edge
# --------------------------------------------------------------------------------------


def tracy_widom_scale(N: float, M: float, sigma2: float = 1.0) -> tuple[float, float]:
    """Johnstone's (2001) centring and scaling of lambda_max of *unnormalized* W^T W.

    For W (N x M) with i.i.d. N(0, sigma^2) entries::

        mu = sigma^2 (sqrt(N - 1/2) + sqrt(M - 1/2))^2
        s  = sigma^2 (sqrt(N - 1/2) + sqrt(M - 1/2)) (1/sqrt(N - 1/2) + 1/sqrt(M - 1/2))^(1/3)

    and (lambda_max - mu) / s -> TW1 (mean -1.21, sd 1.27, 99th percentile 2.02).
    Symmetric in N and M. Divide by N for normalized units.
    """
    n, m = float(N) - 0.5, float(M) - 0.5
    if not (n > 0.0 and m > 0.0):
        return NAN, NAN
    sn, sm = math.sqrt(n), math.sqrt(m)
    mu = sigma2 * (sn + sm) ** 2
    s = sigma2 * (sn + sm) * (1.0 / sn + 1.0 / sm) ** (1.0 / 3.0)
    return float(mu), float(s)


# --------------------------------------------------------------------------------------
# Robust MP fit of the bulk, spikes
# --------------------------------------------------------------------------------------

#: Probability levels at which empirical and MP quantiles are matched (least squares).
#: Low/mid levels only: the top 40 % of the spectrum, where spikes, bleeding-out mass and
#: heavy tails live, is never used, and the bottom 5 % (the soft lower edge) is skipped.
#: A wider range trades robustness (bias from undetected signal directions) for variance
#: (measurements by top level: ``experiments/results/engine_design_notes.md``).
FIT_LEVELS = np.linspace(0.05, 0.60, 56)
FIT_LEVELS.setflags(write=False)

#: At most this fraction of the positive eigenvalues is deflated as spikes while fitting.
MAX_DEFLATE_FRACTION = 0.25

#: Maximum number of fit / count-spikes / deflate rounds.
MAX_ITER = 12


@lru_cache(maxsize=4096)
def _fit_level_quantiles(Q: float) -> np.ndarray:
    q = _unit_quantile(FIT_LEVELS, Q)
    q.setflags(write=False)
    return q


@lru_cache(maxsize=4096)
def _unit_median(Q: float) -> float:
    return float(_unit_quantile(np.array([0.5]), Q)[0])


@dataclass(frozen=True)
class MPFit:
    """Result of :func:`fit_mp`. Eigenvalue-valued fields are unnormalized (lambda = nu^2).

    Core fields (NaN, and ``num_spikes == -1``, when no fit was possible: see ``status``):

    * ``sigma2``: fitted per-entry variance sigma^2 of the random bulk.
    * ``lambda_plus`` / ``lambda_minus``: edges of the fitted bulk,
      ``sigma^2 (sqrt(N_b) +- sqrt(M_b))^2 = N_b sigma^2 (1 +- 1/sqrt(Q_b))^2`` with
      ``N_b = N - k``, ``M_b = m_eff - k``, k = ``num_deflated`` (per matrix, if slices
      are pooled) (see :func:`fit_mp`); with no deflated spike and no zero eigenvalue
      this is exactly ``N sigma^2 (1 +- 1/sqrt(Q))^2``.
    * ``tw_scale``: Johnstone's scale s of :func:`tracy_widom_scale` for (N_b, M_b, sigma2).
    * ``spike_threshold = lambda_plus + tw_margin * tw_scale``.
    * ``num_spikes``: positive eigenvalues > spike_threshold.
    * ``bulk_max``: largest eigenvalue <= spike_threshold.
    * ``ks``: Kolmogorov-Smirnov distance between the bulk (the positive eigenvalues
      <= spike_threshold, with their own empirical CDF) and the fitted MP CDF; small for
      Random-like and Bulk+Spikes ESDs, large when the bulk itself is not MP.
    * ``softrank = lambda_plus / lambda_max`` (MP soft rank, Martin & Mahoney 2021).
    * ``N, M, Q``: the shape used (N >= M, Q = N / M), as given (swapped if N < M).

    Extra fields:

    * ``lambda_max``: largest eigenvalue (also set for degenerate inputs when finite).
    * ``ks_all``: KS distance of *all* positive eigenvalues to the undeflated MP law
      MP(sigma2, q_eff); includes spikes and tails (their mass raises it).
    * ``mass_above_edge``: fraction of positive eigenvalues > lambda_plus.
    * ``mass_just_above``: fraction in (lambda_plus, spike_threshold] ("bleeding out").
    * ``num_zero``: eigenvalues <= the zero tolerance, excluded from the fit.
    * ``num_deflated``: spikes removed from sample and model in the final fit round.
    * ``m_eff, q_eff``: M and Q after removing the zero eigenvalues
      (``m_eff = M * n_positive / n``, ``q_eff = N / m_eff``).
    * ``iterations``: fit rounds used; ``method``: the estimator;
      ``status``: "ok", "non_finite", "all_zero", "too_few" or "degenerate".
    """

    sigma2: float
    lambda_plus: float
    lambda_minus: float
    bulk_max: float
    tw_scale: float
    spike_threshold: float
    num_spikes: int
    ks: float
    softrank: float
    N: int
    M: int
    Q: float
    lambda_max: float = NAN
    ks_all: float = NAN
    mass_above_edge: float = NAN
    mass_just_above: float = NAN
    num_zero: int = -1
    num_deflated: int = -1
    m_eff: float = NAN
    q_eff: float = NAN
    iterations: int = 0
    method: str = ""
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _nan_fit(N, M, Q, method, status, lambda_max=NAN, num_zero=-1) -> MPFit:
    return MPFit(
        sigma2=NAN,
        lambda_plus=NAN,
        lambda_minus=NAN,
        bulk_max=NAN,
        tw_scale=NAN,
        spike_threshold=NAN,
        num_spikes=-1,
        ks=NAN,
        softrank=NAN,
        N=N,
        M=M,
        Q=Q,
        lambda_max=lambda_max,
        num_zero=num_zero,
        method=method,
        status=status,
    )


def _ks(x_sorted: np.ndarray, sigma2: float, Q: float) -> float:
    """Two-sided KS distance sup |F_n - F_MP| of an ascending sample (normalized units)."""
    n = x_sorted.size
    if n == 0:
        return NAN
    F = _mp_cdf_values(x_sorted, sigma2, Q)
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - F), np.max(F - (i - 1) / n)))


def _sigma2_quantile(x_bulk: np.ndarray, Qb: float) -> float:
    """Least-squares quantile match: sigma^2 = sum_j xhat_j q_j / sum_j q_j^2."""
    n = x_bulk.size
    levels = (np.arange(n) + 0.5) / n
    xe = np.interp(FIT_LEVELS, levels, x_bulk)
    q = _fit_level_quantiles(Qb)
    return float(np.dot(xe, q) / np.dot(q, q))


def _sigma2_median(x_bulk: np.ndarray, Qb: float) -> float:
    return float(np.median(x_bulk) / _unit_median(Qb))


def fit_mp(
    evals,
    N: int,
    M: int,
    *,
    tw_margin: float = DEFAULT_TW_MARGIN,
    method: str = "quantile",
    zero_tol: float | None = None,
) -> MPFit:
    """Robust Marchenko-Pastur fit of the bulk of an ESD, with Tracy-Widom spike count.

    Parameters
    ----------
    evals : array_like
        Eigenvalues lambda_i = nu_i^2 of W^T W, unnormalized, any order; normally the
        M = min(N, M) of them (never the structural zeros of a rectangular W). A pooled
        sample of several same-shape matrices (conv kernel slices) is accepted too: the
        law is that of one N x M matrix (the spike threshold is then per slice).
    N, M : int
        Shape of W. Swapped if N < M, so that Q = N / M >= 1.
    tw_margin : float
        Spike threshold in Tracy-Widom scales above lambda_plus (default 4, see below).
    method : {"quantile", "median", "ks"}
        sigma^2 estimator (below). "quantile" is the default and the fastest accurate one.
    zero_tol : float, optional
        Eigenvalues <= zero_tol count as zero. Default ``sqrt(n) * eps * lambda_max``
        with eps that of the input dtype: the exact zeros of a rank-deficient W come out
        of a Gram ``eigvalsh`` as +-O(eps lambda_max), while genuine MP eigenvalues at
        Q = 1 reach down to about lambda_max / (16 M^2) and must not be cut
        (measurements: ``experiments/results/engine_design_notes.md``).

    Estimator
    ---------
    Work in normalized units x = lambda / N. The MP law scales with sigma^2: its
    quantiles are ``sigma^2 q_p(Q)`` with q_p the sigma = 1 quantiles (:func:`mp_quantile`).

    1. *Quantile matching* ("quantile"): at the 56 levels p_j in [0.05, 0.60]
       (:data:`FIT_LEVELS`) take the empirical quantiles xhat_j of the bulk sample
       (linear interpolation at plotting positions (i - 1/2)/n) and solve the least
       squares problem min_s sum_j (xhat_j - s q_j)^2, i.e.
       ``sigma^2 = sum_j xhat_j q_{p_j}(Q) / sum_j q_{p_j}(Q)^2``.
       "median" uses the single level 1/2: sigma^2 = median(x) / q_{1/2}(Q).
    2. *Spike deflation*: count the eigenvalues above the threshold (below); if k of
       them, drop them and refit the remaining M - k eigenvalues as MP(N - k, M - k)
       (i.e. sigma^2 from x = lambda / (N - k) at Q_b = (N - k) / (M - k)):
       a rank-k signal well above the BBP threshold takes k directions on both sides,
       and the remaining bulk is (to first order) the spectrum of the compression of the
       noise to the orthogonal complements, an (N - k) x (M - k) noise matrix. Repeat
       until k is stable (at most :data:`MAX_ITER` rounds, k capped at
       :data:`MAX_DEFLATE_FRACTION` of the eigenvalues so that a heavy-tailed ESD cannot
       deflate itself away).
    3. "ks" then minimizes the KS distance between the deflated bulk and MP(sigma^2, Q_b)
       over log sigma^2 (scipy ``minimize_scalar``, bounded, +-0.7 around step 2's value);
       much slower, and only slightly less noisy on Gaussian data.

    Why it is robust: the naive estimate (mean eigenvalue = trace / (N M) = sigma^2) sees
    every spike and every heavy-tail eigenvalue with its full weight. Quantiles at levels
    <= 0.6 do not depend on the values of the top 40 % at all; k spikes among M
    eigenvalues only move the levels by O(k / M) (e.g. the median by k/(2M)), which
    step 2 removes. For pure Gaussian W the estimate is essentially unbiased, with a
    spread close to the efficiency of the trace (sd sqrt(2 / (N M))): the eigenvalues
    are rigid, so a smooth average of many order statistics is a linear spectral
    statistic with O(1/M) fluctuations. (Measured bias and spread:
    ``experiments/results/engine_design_notes.md``.)

    Zeros and degenerate inputs
    ---------------------------
    * Eigenvalues <= zero_tol (exact zeros of a rank-deficient W, negative rounding
      noise) are excluded and reported in ``num_zero``. They are modelled as dead
      columns: the positive ones are fitted as MP of an N x m_eff matrix,
      ``m_eff = M * n_positive / n``, ``q_eff = N / m_eff``.
    * NaN or inf anywhere: ``status="non_finite"``, NaN fields, ``num_spikes = -1``.
    * All eigenvalues zero: ``status="all_zero"``; fewer than :data:`MIN_EVALS` positive
      eigenvalues (e.g. rank one): ``status="too_few"``; both with NaN fields and
      ``num_spikes = -1`` (``lambda_max`` and ``num_zero`` are still reported).
    * A constant spectrum (orthogonal W) is fitted like any other; its large ``ks``
      says that it is not MP. Q = 1 (lower edge 0, divergent density) is supported.
      Never raises on data; raises ValueError only for a bad ``method``,
      ``tw_margin`` or shape.

    Spikes and the default margin
    -----------------------------
    A spike is an eigenvalue above ``lambda_plus + tw_margin * s``, s the Tracy-Widom
    scale of Johnstone (2001) at the fitted sigma^2. For pure noise
    (lambda_max - mu)/s ~ TW1 (mean -1.21, sd 1.27, 99th percentile 2.02), and
    lambda_plus >= mu. The fitted sigma^2 adds noise: a relative error d moves
    lambda_plus by d * lambda_plus / s ~ d * M^(2/3) TW units, which widens the spread of
    z = (lambda_max - lambda_plus_fit) / s_fit at small M. See :data:`DEFAULT_TW_MARGIN`
    for why the default is 4. Above the BBP threshold
    (Baik, Ben Arous & Peche 2005; normalized signal strength > sigma Q^(-1/4)) a rank-k
    signal pulls k eigenvalues out of the bulk; below it the signal is invisible.

    Returns
    -------
    MPFit
    """
    if method not in ("quantile", "median", "ks"):
        raise ValueError(f"method must be 'quantile', 'median' or 'ks'; got {method!r}")
    N, M = int(N), int(M)
    if N < M:
        N, M = M, N
    if M < 1:
        raise ValueError(f"N and M must be positive; got {N}, {M}")
    Q = N / M
    tw_margin = float(tw_margin)
    if not (math.isfinite(tw_margin) and tw_margin >= 0.0):
        raise ValueError(f"tw_margin must be finite and >= 0; got {tw_margin}")
    ev = np.asarray(evals)
    dtype = ev.dtype if np.issubdtype(ev.dtype, np.floating) else np.dtype(np.float64)
    ev = ev.astype(np.float64, copy=False).ravel()
    n = ev.size
    if n == 0:
        return _nan_fit(N, M, Q, method, "too_few", num_zero=0)
    if not np.isfinite(ev).all():
        return _nan_fit(N, M, Q, method, "non_finite")
    ev = np.sort(ev)
    lam_max = float(ev[-1])
    if not lam_max > 0.0:
        return _nan_fit(N, M, Q, method, "all_zero", lambda_max=lam_max, num_zero=n)
    if zero_tol is None:
        tol = math.sqrt(n) * float(np.finfo(dtype).eps) * lam_max
    else:
        tol = float(zero_tol)
    num_zero = int(np.searchsorted(ev, tol, side="right"))
    pos = ev[num_zero:]
    npos = pos.size
    if npos < MIN_EVALS:
        return _nan_fit(N, M, Q, method, "too_few", lambda_max=lam_max, num_zero=num_zero)

    m_eff = M * npos / n
    if m_eff < 1.0:  # only for a pooled sample of mostly-zero slices
        return _nan_fit(N, M, Q, method, "too_few", lambda_max=lam_max, num_zero=num_zero)
    q_eff = N / m_eff
    k_cap = max(0, min(int(MAX_DEFLATE_FRACTION * npos), npos - MIN_EVALS))
    estimate = _sigma2_median if method == "median" else _sigma2_quantile

    def model(k: int) -> tuple[float, float, float]:
        """(N_b, M_b, Q_b) of the bulk left by k deflated spikes: MP(N - k', m_eff - k')
        with k' = k m_eff / npos the spikes per matrix (k' = k unless slices are pooled)."""
        kk = k * m_eff / npos
        nb, mb = N - kk, m_eff - kk
        return nb, mb, nb / mb

    def fit_round(k: int) -> tuple[float, float, float, int]:
        nb, mb, qb = model(k)
        s2 = estimate(pos[: npos - k] / nb, qb)
        lp = s2 * (math.sqrt(nb) + math.sqrt(mb)) ** 2
        tw = tracy_widom_scale(nb, mb, s2)[1]
        thr = lp + tw_margin * tw
        return s2, lp, thr, npos - int(np.searchsorted(pos, thr, side="right"))

    k_d = 0
    iterations = 0
    seen = set()
    while True:
        iterations += 1
        sigma2, lam_plus, thr, k = fit_round(k_d)
        if not (sigma2 > 0.0 and math.isfinite(sigma2)):
            return _nan_fit(N, M, Q, method, "degenerate", lambda_max=lam_max, num_zero=num_zero)
        seen.add(k_d)
        k_next = min(k, k_cap)
        if k_next == k_d or k_next in seen or iterations >= MAX_ITER:
            break
        k_d = k_next

    nb, mb, qb = model(k_d)
    if method == "ks":
        xb = pos[: npos - k_d] / nb

        def objective(t: float) -> float:
            return _ks(xb, math.exp(t), qb)

        t0 = math.log(sigma2)
        res = minimize_scalar(objective, bounds=(t0 - 0.7, t0 + 0.7), method="bounded", options={"xatol": 1e-5})
        if res.success and res.fun <= objective(t0):
            sigma2 = float(math.exp(res.x))

    lam_plus = sigma2 * (math.sqrt(nb) + math.sqrt(mb)) ** 2
    lam_minus = sigma2 * (math.sqrt(nb) - math.sqrt(mb)) ** 2
    tw = tracy_widom_scale(nb, mb, sigma2)[1]
    thr = lam_plus + tw_margin * tw
    n_bulk = int(np.searchsorted(pos, thr, side="right"))
    n_edge = int(np.searchsorted(pos, lam_plus, side="right"))
    ks = _ks(pos[:n_bulk] / nb, sigma2, qb)
    ks_all = ks if (k_d == 0 and n_bulk == npos) else _ks(pos / N, sigma2, q_eff)
    return MPFit(
        sigma2=sigma2,
        lambda_plus=lam_plus,
        lambda_minus=lam_minus,
        bulk_max=float(pos[n_bulk - 1]) if n_bulk > 0 else NAN,
        tw_scale=tw,
        spike_threshold=thr,
        num_spikes=npos - n_bulk,
        ks=ks,
        softrank=lam_plus / lam_max,
        N=N,
        M=M,
        Q=Q,
        lambda_max=lam_max,
        ks_all=ks_all,
        mass_above_edge=(npos - n_edge) / npos,
        mass_just_above=max(n_bulk - n_edge, 0) / npos,
        num_zero=num_zero,
        num_deflated=k_d,
        m_eff=m_eff,
        q_eff=q_eff,
        iterations=iterations,
        method=method,
        status="ok",
    )
