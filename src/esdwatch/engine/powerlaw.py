"""Continuous power-law tail fit of an eigenvalue spectrum (Clauset-Shalizi-Newman).

This is the alpha of heavy-tailed self-regularization (HTSR): the exponent of a power law
``rho(lambda) ~ lambda^(-alpha)`` fitted to the tail ``lambda >= x_min`` of a layer's
empirical spectral density, with ``x_min`` chosen by minimizing the Kolmogorov-Smirnov
distance between the empirical and the fitted tail CDFs, as in

    A. Clauset, C. R. Shalizi and M. E. J. Newman (2009),
    "Power-law distributions in empirical data", SIAM Review 51(4), 661-703.

The result reproduces ``powerlaw.Fit(evals, parameter_ranges={'alpha': [1, 100]})``
(powerlaw 2.0.0; the range matters: that version's default alpha range [0, 3] rejects
every candidate with alpha > 3) and weightwatcher 0.7.7's default ``analyze()`` fit,
while scanning every candidate at once with numpy instead of one scipy fit per candidate.

Conventions (those of the reference; the data are the sorted values x_1 <= ... <= x_N
that remain after cleaning, u_0 < u_1 < ... < u_{K-1} their distinct values):

* Cleaning: non-finite and non-positive values are dropped (an eigenvalue at 0 cannot lie
  in a power-law tail, and log(0) is undefined); with ``xmax`` given, values above
  ``xmax`` are dropped as well.
* Candidates: x_min ranges over u_0 .. u_{K-3}, i.e. every distinct value except the two
  largest (``powerlaw`` keeps values strictly below the maximum, then drops the largest
  of those). Fewer than 2 candidates (fewer than 4 distinct values) is no fit.
* alpha: the continuous maximum-likelihood estimate (CSN eq. 3.1) on the n tail points
  x_i >= x_min,  ``alpha = 1 + n / sum_i ln(x_i / x_min)``, with standard error
  ``sigma = (alpha - 1) / sqrt(n)``.
* D: the fitted CDF ``F(u) = 1 - (u / x_min)^(1 - alpha)`` is compared with the
  left-continuous empirical tail CDF ``E(u) = #{tail x_i < u} / n`` at each distinct
  tail value u (x_min included, where both are 0):  ``D = max_u |F(u) - E(u)|``.
  (This is ``powerlaw``'s definition; the textbook KS statistic would also use the right
  limits ``#{x_i <= u} / n``.)
* Discarded candidates: ``powerlaw`` flags a fit whose alpha is outside the open range
  (1, 100) or within 0.01 of either end, so a candidate counts only if
  ``1.01 <= alpha <= 99.99``. If none counts, this function returns no fit (alpha = nan);
  ``powerlaw`` instead warns and returns the argmin over the flagged candidates, whose
  D it computes against a placeholder CDF.
* Selection: the first (smallest) x_min attaining the minimal D among counted candidates.

weightwatcher 0.7.7 (CPU, defaults) runs the same scan on the eigenvalues
lambda_i = nu_i^2 > 1e-5 of each layer, with four differences that do not matter for
continuous eigenvalues of a layer with at least 20 of them: it also tries the
second-largest value as x_min (its 2-point tail always has D = 1 - e^-2 - 1/2 = 0.365),
keeps alphas above 100, treats tied values as separate points, and switches to a
bias-corrected small-sample fit below 20 eigenvalues.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["ALPHA_RANGE", "PowerLawFit", "fit_power_law"]

#: Admissible range of alpha for a candidate x_min (the range ``powerlaw`` is given).
ALPHA_RANGE: tuple[float, float] = (1.0, 100.0)

# powerlaw flags a fit whose parameter lies within this distance of its range's ends.
_RANGE_MARGIN = 0.01

# Internal tile size (elements) of the broadcast KS computation. The caller's
# max_chunk_elements is a hard upper bound; tiles larger than this stop fitting in cache
# and only cost memory, so they are not used even when allowed.
_TILE_ELEMENTS = 1 << 16

# Below this many (candidate, point) pairs the exact KS scan is cheap enough that the
# bound-and-prune passes would cost more than they save.
_EXACT_SCAN_PAIRS = 1 << 16

# Strides of the pruning passes: each pass evaluates every stride-th distinct value only,
# which gives a lower and an upper bound on each candidate's D (see _ks_bounds).
_PRUNE_STRIDES: tuple[int, ...] = (256, 64, 16, 4)
_PRUNE_MIN_SAMPLES = 16
_PRUNE_SLACK = 1e-12
_PRUNE_PROBES = 4

# x_min window around the ESD peak used by fix_fingers (the range weightwatcher's
# 'xmin_peak' intends: it scans x_min in [0.95 peak, 1.5 peak)).
_PEAK_WINDOW: tuple[float, float] = (0.95, 1.5)
_PEAK_BINS = 100

METHOD_KS = "ks"
METHOD_FIX_FINGERS = "fix_fingers"
METHOD_FIXED_XMIN = "fixed_xmin"

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`fit_power_law`.

    Attributes:
        alpha: power-law exponent, ``1 + n_tail / sum ln(x_i / xmin)``; nan if no fit.
        xmin: lower end of the fitted tail (a data value unless given); nan if the
            scan chose none.
        xmax: largest value in the fitted data (so <= the ``xmax`` argument); nan if none.
        D: Kolmogorov-Smirnov distance of the fit (see the module docstring); nan if no
            fit or fewer than 2 tail points.
        n_tail: number of data points in [xmin, xmax] used for alpha; 0 if no fit.
        sigma: standard error of alpha, ``(alpha - 1) / sqrt(n_tail)``.
        num_candidates: number of x_min values scanned (0 for a fixed x_min).
        method: ``"ks"`` (KS scan over all candidates), ``"fix_fingers"`` (scan restricted
            to the ESD peak) or ``"fixed_xmin"``.
        reason: empty for a fit, otherwise why alpha is nan (or, for fix_fingers, why
            x_min was fixed at the peak instead of scanned).
    """

    alpha: float
    xmin: float
    xmax: float
    D: float
    n_tail: int
    sigma: float
    num_candidates: int = 0
    method: str = METHOD_KS
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True when alpha is a finite number."""
        return math.isfinite(self.alpha)


def fit_power_law(
    evals: Any,
    xmin: float | None = None,
    xmax: float | None = None,
    *,
    fix_fingers: bool = False,
    max_chunk_elements: int = 2**24,
) -> PowerLawFit:
    """Fit a continuous power law to the tail of ``evals`` (Clauset, Shalizi & Newman 2009).

    For every candidate x_min (all distinct values but the two largest) the MLE
    ``alpha = 1 + n / sum_{x_i >= x_min} ln(x_i / x_min)`` and the KS distance
    ``D = max_u |1 - (u / x_min)^(1 - alpha) - #{x_i in [x_min, u)} / n|`` over the
    distinct tail values u are computed; the smallest x_min with minimal D among the
    candidates with ``1.01 <= alpha <= 99.99`` wins. This reproduces
    ``powerlaw.Fit(evals, parameter_ranges={'alpha': [1, 100]})`` (see the module
    docstring for the exact conventions).

    The scan is vectorized: alphas of all candidates come from one cumulative sum, and
    the KS distances are computed by broadcasting candidates against data points in
    tiles of at most ``max_chunk_elements`` elements. For large spectra the scan first
    bounds every candidate's D from below and above using every s-th point only
    (s = 256, 64, 16, 4) and drops candidates whose lower bound exceeds the best upper
    bound or a probed exact D; only the survivors get an exact D. Dropped candidates
    provably lose, so the answer (ties included) is that of the exhaustive scan.
    Memory is O(n + max_chunk_elements) (timings: experiments/results/engine_design_notes.md).

    Args:
        evals: 1-D eigenvalues (numpy array, torch tensor of any float dtype, or sequence),
            in any order. Non-finite and non-positive values are dropped before fitting.
        xmin: if given, fit alpha with this fixed x_min (no scan, no range check on
            alpha); D is still computed.
        xmax: if given, values above ``xmax`` are dropped before anything else, so the
            result equals ``fit_power_law(evals[evals <= xmax])`` and
            ``powerlaw.Fit(evals[evals <= xmax], ...)``. The fitted model stays the
            untruncated power law (as in weightwatcher); ``powerlaw.Fit(evals, xmax=...)``
            differs in that it renormalizes the fitted CDF to [x_min, xmax] for D and,
            for alpha outside (1.5, 3], fits the truncated likelihood numerically.
        fix_fingers: scan x_min only within [0.95 p, 1.5 p), p the peak of the log-ESD
            (left edge of the fullest of 100 histogram bins of log10(evals)), as
            weightwatcher's ``fix_fingers='xmin_peak'`` intends; this keeps spurious
            "fingers" at the top of the spectrum from capturing x_min. If no candidate
            in the window has an admissible alpha, x_min is fixed at the first value
            >= 0.95 p. Not meant to match any reference exactly.
        max_chunk_elements: upper bound on the number of elements of any temporary
            array of the KS computation (memory stays O(n + max_chunk_elements)).

    Returns:
        A :class:`PowerLawFit`. Degenerate inputs (empty, a single value, fewer than 4
        distinct positive values, or no admissible candidate) give alpha = D = nan,
        n_tail = 0 and a non-empty ``reason``; they never raise.

    Raises:
        ValueError: for invalid arguments (``evals`` with more than one dimension,
            non-positive or non-finite ``xmin``, NaN ``xmax``, ``max_chunk_elements < 1``,
            or both ``xmin`` and ``fix_fingers``).
    """
    if max_chunk_elements < 1:
        raise ValueError(f"max_chunk_elements must be >= 1, got {max_chunk_elements}")
    if xmin is not None and fix_fingers:
        raise ValueError("pass either xmin or fix_fingers=True, not both")
    if xmin is not None and not (math.isfinite(float(xmin)) and float(xmin) > 0.0):
        raise ValueError(f"xmin must be a positive finite number, got {xmin!r}")
    if xmax is not None and math.isnan(float(xmax)):
        raise ValueError("xmax must be a number, got nan")

    x = _clean(evals, xmax)
    if xmin is not None:
        method = METHOD_FIXED_XMIN
    else:
        method = METHOD_FIX_FINGERS if fix_fingers else METHOD_KS
    if x.size == 0:
        return _no_fit(method, "no positive finite values", xmax_value=math.nan)
    xmax_value = float(x[-1])

    if xmin is not None:
        return _fit_fixed_xmin(x, float(xmin), method=METHOD_FIXED_XMIN)

    values, counts = np.unique(x, return_counts=True)
    num_distinct = values.size
    num_candidates = num_distinct - 2
    if num_candidates < 2:
        return _no_fit(
            method,
            f"{num_distinct} distinct positive value(s); a KS scan needs at least 4",
            xmax_value=xmax_value,
            num_candidates=max(num_candidates, 0),
        )

    # less[j] = #{x_i < u_j}: the left-continuous empirical CDF (times N) at every u_j.
    less = np.zeros(num_distinct, dtype=np.int64)
    np.cumsum(counts[:-1], out=less[1:])
    n_tail = x.size - less  # tail size for x_min = u_j
    alphas = _candidate_alphas(values, n_tail)[:num_candidates]
    lo, hi = ALPHA_RANGE
    admissible = (alphas - _RANGE_MARGIN >= lo) & (alphas + _RANGE_MARGIN <= hi)

    if fix_fingers:
        peak = _log_esd_peak(x)
        in_window = (values[:num_candidates] >= _PEAK_WINDOW[0] * peak) & (
            values[:num_candidates] < _PEAK_WINDOW[1] * peak
        )
        active = np.flatnonzero(admissible & in_window)
        if active.size == 0:
            start = int(np.searchsorted(values, _PEAK_WINDOW[0] * peak, side="left"))
            at_peak = float(values[min(start, num_distinct - 1)])
            fit = _fit_fixed_xmin(x, at_peak, method=METHOD_FIX_FINGERS)
            return _replace(
                fit,
                num_candidates=num_candidates,
                reason=fit.reason or "no admissible candidate in the peak window; xmin fixed at the peak",
            )
    else:
        active = np.flatnonzero(admissible)
        if active.size == 0:
            return _no_fit(
                method,
                f"no candidate xmin gives alpha in [{lo + _RANGE_MARGIN:g}, {hi - _RANGE_MARGIN:g}]",
                xmax_value=xmax_value,
                num_candidates=num_candidates,
            )

    best = _argmin_ks(np.log(values), less, active, alphas[active], n_tail[active], max_chunk_elements)
    fit = _fit_fixed_xmin(x, float(values[best]), method=method)
    return _replace(fit, num_candidates=num_candidates)


# --------------------------------------------------------------------------- helpers


def _clean(evals: Any, xmax: float | None) -> FloatArray:
    """Sorted float64 copy of the finite, positive values (<= xmax if given)."""
    if hasattr(evals, "detach") and hasattr(evals, "cpu"):
        # A torch tensor: convert inside torch so bfloat16/float16 and CUDA tensors work,
        # without making torch an import-time dependency of this module.
        evals = evals.detach().cpu().double().numpy()
    arr = np.asarray(evals, dtype=np.float64)
    if arr.ndim > 1:
        raise ValueError(f"evals must be one-dimensional, got shape {arr.shape}")
    arr = arr.reshape(-1)
    keep = np.isfinite(arr) & (arr > 0.0)
    if xmax is not None:
        keep &= arr <= float(xmax)
    return np.sort(arr[keep])


def _candidate_alphas(values: FloatArray, n_tail: IntArray) -> FloatArray:
    """MLE alpha for x_min = each distinct value, from one cumulative sum.

    With S_j = sum_{x_i >= u_j} ln(x_i / u_j), peeling u_j off the tail gives
    S_j = S_{j+1} + n_{j+1} ln(u_{j+1} / u_j): a sum of non-negative terms, so unlike
    ``suffix_sum(ln x) - n ln u`` it cannot lose digits to cancellation. The running sum
    is kept in extended precision where the platform has it.
    """
    steps = np.empty(values.size, dtype=np.longdouble)
    steps[-1] = 0.0
    steps[:-1] = n_tail[1:] * np.log(values[1:] / values[:-1])
    sums = np.cumsum(steps[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        # The largest value has S = 0 (alpha = inf); it is never a candidate.
        return (1.0 + n_tail / sums).astype(np.float64)


def _argmin_ks(
    log_values: FloatArray,
    less: IntArray,
    active: IntArray,
    alphas: FloatArray,
    n_tail: IntArray,
    max_chunk_elements: int,
) -> int:
    """Index (into the distinct values) of the first candidate with minimal KS distance.

    Large scans are pruned first: a pass over every stride-th point bounds each
    candidate's D from both sides (see _ks_bounds). The minimal D is at most the smallest
    upper bound and at most the exact D of any candidate (a few promising ones are
    probed), so a candidate whose lower bound exceeds either cannot be the argmin and is
    dropped; successively finer strides repeat this on the survivors before the exact
    pass. Only candidates that provably lose are removed, so ties still go to the
    smallest x_min and the result is that of the exhaustive scan.
    """
    num_points = log_values.size
    slopes = 1.0 - alphas  # F(u) = 1 - exp(slope * ln(u / x_min))
    inv_n = 1.0 / n_tail.astype(np.float64)
    less_f = less.astype(np.float64)  # exact: counts are far below 2^53
    keep = np.arange(active.size)

    def exact(subset: IntArray) -> FloatArray:
        dist, _ = _ks_bounds(
            log_values,
            less_f,
            active[subset],
            slopes[subset],
            inv_n[subset],
            np.arange(num_points),
            False,
            max_chunk_elements,
        )
        return dist

    for stride in _PRUNE_STRIDES:
        pairs = int(np.sum(num_points - active[keep]))
        if pairs <= _EXACT_SCAN_PAIRS:
            break
        if stride * _PRUNE_MIN_SAMPLES > num_points:
            continue  # too few samples for useful bounds
        cols = np.arange(stride - 1, num_points, stride)
        if cols[-1] != num_points - 1:
            cols = np.append(cols, num_points - 1)
        lower, upper = _ks_bounds(
            log_values,
            less_f,
            active[keep],
            slopes[keep],
            inv_n[keep],
            cols,
            True,
            max_chunk_elements,
        )
        assert upper is not None  # with_upper=True
        # The exact D of a few promising candidates is a much tighter threshold than the
        # smallest upper bound, for the price of a few O(n) rows.
        probes = np.unique(np.concatenate([np.argsort(lower)[:_PRUNE_PROBES], np.argsort(upper)[:_PRUNE_PROBES]]))
        threshold = min(float(upper.min()), float(exact(keep[probes]).min()))
        # The slack only keeps more candidates: it guards the proof against a last-bit
        # rounding difference between a bound and the exact value it bounds.
        keep = keep[lower <= threshold + _PRUNE_SLACK]
    dist = exact(keep)
    return int(active[keep[int(np.argmin(dist))]])


def _ks_bounds(
    log_values: FloatArray,
    less: FloatArray,
    rows: IntArray,
    slopes: FloatArray,
    inv_n: FloatArray,
    cols: IntArray,
    with_upper: bool,
    max_chunk_elements: int,
) -> tuple[FloatArray, FloatArray | None]:
    """Bounds on the KS distance of each candidate ``rows[r]`` from the points ``cols``.

    For candidate k and point j > k, ``F = 1 - exp(slope * (ln u_j - ln u_k))`` (equal
    to the reference's ``1 - (u_j / u_k)^slope`` up to rounding; ``-expm1`` would be
    more accurate next to u_k, but D is an absolute difference and expm1 is slower) and
    ``E = (less_j - less_k) / n``; points j <= k are clamped to F = E = 0, which is the
    value at j = k itself, so every candidate can share one set of columns.

    lower = max over the columns of |F - E|: exact D when ``cols`` holds every point.
    upper: F and E are both non-decreasing in j, so between consecutive evaluated points
    p < q every skipped point j has |F_j - E_j| <= max(F_q - E_p, E_q - F_p).

    Candidates are processed in tiles of at most ``max_chunk_elements`` (and at most
    _TILE_ELEMENTS) elements; a row whose points do not fit in one tile is split along
    the points, carrying the last column's F and E to the next tile so that the result
    does not depend on the tiling.
    """
    num_rows = rows.size
    lower = np.zeros(num_rows)
    upper = np.zeros(num_rows) if with_upper else None
    tile = min(max_chunk_elements, _TILE_ELEMENTS)
    r0 = 0
    while r0 < num_rows:
        # Columns at or below the block's smallest candidate are zero for all its rows.
        c_first = int(np.searchsorted(cols, rows[r0], side="right"))
        width = cols.size - c_first
        if width == 0:
            # Cannot happen for real candidates (the two largest values are not
            # candidates), but an empty block must not stall the loop.
            r0 += 1
            continue
        r1 = min(num_rows, r0 + max(1, tile // width))
        k = rows[r0:r1]
        slope = slopes[r0:r1, None]
        scale = inv_n[r0:r1, None]
        step = max(1, tile // (r1 - r0))
        prev_f = np.zeros(r1 - r0)
        prev_e = np.zeros(r1 - r0)
        for c0 in range(c_first, cols.size, step):
            j = cols[c0 : c0 + step]
            f = np.subtract.outer(log_values[k], log_values[j])  # = -ln(u_j / u_k)
            np.minimum(f, 0.0, out=f)
            f *= -slope  # slope * ln(u_j / u_k), <= 0
            np.exp(f, out=f)
            np.subtract(1.0, f, out=f)  # F = 1 - (u_j/u_k)^(1-alpha)
            e = np.subtract.outer(less[k], less[j])
            np.minimum(e, 0.0, out=e)
            e *= -scale  # E = #{x in [u_k, u_j)} / n
            d = f - e
            np.maximum(lower[r0:r1], np.abs(d, out=d).max(axis=1), out=lower[r0:r1])
            if upper is not None:
                gap = np.maximum(f[:, 0] - prev_e, e[:, 0] - prev_f)
                if f.shape[1] > 1:
                    np.subtract(f[:, 1:], e[:, :-1], out=d[:, 1:])
                    np.maximum(gap, d[:, 1:].max(axis=1), out=gap)
                    np.subtract(e[:, 1:], f[:, :-1], out=d[:, 1:])
                    np.maximum(gap, d[:, 1:].max(axis=1), out=gap)
                np.maximum(upper[r0:r1], gap, out=upper[r0:r1])
                prev_f = f[:, -1].copy()
                prev_e = e[:, -1].copy()
        r0 = r1
    return lower, upper


def _fit_fixed_xmin(x: FloatArray, xmin: float, *, method: str) -> PowerLawFit:
    """alpha, sigma and D for a fixed x_min on sorted clean data ``x``, in O(n).

    The winner of a scan is re-fitted here too, so its reported alpha is the direct sum
    ``1 + n / sum ln(x_i / x_min)`` rather than the cumulative-sum value used to rank.
    """
    xmax_value = float(x[-1]) if x.size else math.nan
    start = int(np.searchsorted(x, xmin, side="left"))
    tail = x[start:]
    n = int(tail.size)
    if n == 0:
        reason = f"no data at or above xmin={xmin:g}"
        return _no_fit(method, reason, xmax_value=xmax_value, xmin=xmin)
    log_ratio_sum = float(np.sum(np.log(tail / xmin)))
    if not log_ratio_sum > 0.0:
        return _no_fit(method, "every tail value equals xmin", xmax_value=xmax_value, xmin=xmin)
    alpha = 1.0 + n / log_ratio_sum
    sigma = (alpha - 1.0) / math.sqrt(n)
    dist = math.nan
    if n >= 2:
        values, first = np.unique(tail, return_index=True)  # first[j] = #{tail < u_j}
        fitted_cdf = 1.0 - (values / xmin) ** (1.0 - alpha)
        dist = float(np.max(np.abs(fitted_cdf - first / n)))
    return PowerLawFit(alpha=alpha, xmin=xmin, xmax=xmax_value, D=dist, n_tail=n, sigma=sigma, method=method)


def _log_esd_peak(x: FloatArray) -> float:
    """Left edge (in eigenvalue units) of the fullest bin of a histogram of log10(x)."""
    hist, edges = np.histogram(np.log10(x), bins=_PEAK_BINS)
    return float(10.0 ** edges[int(np.argmax(hist))])


def _no_fit(
    method: str,
    reason: str,
    *,
    xmax_value: float,
    num_candidates: int = 0,
    xmin: float = math.nan,
) -> PowerLawFit:
    nan = math.nan
    return PowerLawFit(
        alpha=nan,
        xmin=xmin,
        xmax=xmax_value,
        D=nan,
        n_tail=0,
        sigma=nan,
        num_candidates=num_candidates,
        method=method,
        reason=reason,
    )


def _replace(fit: PowerLawFit, **changes: Any) -> PowerLawFit:
    return dataclasses.replace(fit, **changes)
